"""`rlhf <command> RECIPE [key=value ...]`: the one entry point (also `python -m pipeline`, `accelerate launch -m pipeline`).

Stage commands: data | pretrain | sft | reward | ppo. Each loads the recipe, applies the dotted overrides, writes the
resolved config into the run directory and runs the stage (skipping it when it already finished with the same
settings). Mistakes a user can fix end in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.checkpoints import Preempted
from pipeline.errors import UserError

# Each stage module exposes `resolve_inputs(cfg) -> dict[str, str]` and `run(cfg, rerun=False) -> Path`.
STAGE_MODULES = {
    "data": "pipeline.data.webtext",
    "pretrain": "pipeline.pretrain",
    "sft": "pipeline.sft",
    "reward": "pipeline.reward",
    "ppo": "pipeline.ppo.loop",
}

STAGE_HELP = {
    "data": "stage 1a: extract, filter and deduplicate web text into parquet shards",
    "pretrain": "stage 1b: train a tokenizer and pretrain a causal LM on the filtered corpus",
    "sft": "stage 2: LoRA / QLoRA supervised fine-tuning on chat demonstrations",
    "reward": "stage 3: reward model from rankings with ties",
    "ppo": "stage 4: PPO of the policy against the reward model",
}

# Commands that are not a single stage: name -> (module, help, function that adds its arguments).
EXTRA_COMMANDS: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None]]] = {}


def stage_module(stage: str) -> Any:
    if stage not in STAGE_MODULES:
        raise UserError(f"unknown stage '{stage}' (valid stages: {', '.join(STAGE_MODULES)})")
    return importlib.import_module(STAGE_MODULES[stage])


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/demo.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. pretrain.max_steps=50")
    parser.add_argument("--dry-run", action="store_true", help="validate the recipe and print the plan; run nothing")
    parser.add_argument("--rerun", action="store_true", help="run again even if finished; the old result is moved aside")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for stage, help_text in STAGE_HELP.items():
        _add_recipe_args(sub.add_parser(stage, help=help_text, description=help_text))
    for name, (_, help_text, add_args) in EXTRA_COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def run_stage_command(args: argparse.Namespace) -> None:
    from pipeline.checkpoints import final_dir, install_preemption_handler, is_finished, newest_checkpoint, stage_dir
    from pipeline.config import load_config, save_config
    from pipeline.tracking import is_main_process

    cfg = load_config(args.recipe, args.overrides)
    module = stage_module(args.command)
    if args.dry_run:
        inputs = module.resolve_inputs(cfg)
        final = final_dir(cfg, args.command)
        state = "finished" if is_finished(final) else "resumable" if newest_checkpoint(stage_dir(cfg, args.command)) else "new"
        print(f"recipe {args.recipe} is valid")
        print(f"stage {args.command}: {state}; inputs: " + ", ".join(f"{k}={v}" for k, v in inputs.items()))
        print(f"output: {final}")
        return
    if is_main_process():
        save_config(cfg, cfg.run_path / "config.yaml")
    install_preemption_handler()
    final = module.run(cfg, rerun=args.rerun)
    if is_main_process():
        print(f"{args.command} finished: {final}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    from pipeline.tracking import setup_logging

    setup_logging(getattr(args, "verbose", False))
    try:
        if args.command in STAGE_MODULES:
            run_stage_command(args)
        else:
            importlib.import_module(EXTRA_COMMANDS[args.command][0]).main(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Preempted as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        sys.exit(143)  # 128 + SIGTERM, what schedulers expect of a pre-empted job
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
