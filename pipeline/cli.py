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


def _add_publish_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage_dir", help="a finished stage of a run, e.g. runs/demo/sft (or runs/demo/sft/final)")
    parser.add_argument("--repo-id", required=True, help="Hub repo to publish to, ORG/NAME")
    parser.add_argument("--private", action="store_true", help="create the repo private (refused if it exists public)")
    parser.add_argument("--revision", default="main", help="branch to commit to; a new name creates it from main")
    parser.add_argument(
        "--dry-run", action="store_true", help="write the model card and list the files; upload nothing"
    )
    parser.add_argument("--license", default="apache-2.0", help="licence id for the card (match the base model's)")
    parser.add_argument("--data-cards", default=None, metavar="DIR", help="data cards folder (default: ./data_cards)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/demo.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. ppo.kl_target=4")
    parser.add_argument("--from", dest="start", metavar="STAGE", help="first stage to run")
    parser.add_argument("--until", metavar="STAGE", help="last stage to run")
    parser.add_argument("--only", nargs="+", metavar="STAGE", help="run just these stages")
    parser.add_argument("--rerun", action="store_true",
                        help="re-run changed stages (and the --from/--only stage) and every later one; old results are kept")  # fmt: skip
    parser.add_argument(
        "--accelerate-config", metavar="FILE", help="launch each stage with accelerate launch --config_file FILE"
    )
    parser.add_argument("--no-report", action="store_true", help="do not write the HTML report at the end")
    parser.add_argument("--dry-run", action="store_true", help="validate the recipe and print the plan; run nothing")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_status_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory, e.g. runs/demo")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_chat_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage_dir", help="a finished stage of a run, e.g. runs/demo/sft (or runs/demo/ppo/final)")
    parser.add_argument("--prompt", help="answer this one message and exit (no interactive session)")
    parser.add_argument("--system", help="a system message that opens the conversation")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest reply, in tokens")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold (1.0: off)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: off)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_report_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory, e.g. runs/demo")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


# Commands that are not a single stage: name -> ("module:function" (default function: main), help, argument adder).
EXTRA_COMMANDS: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None]]] = {
    "run": (
        "pipeline.driver:main_run",
        "run the whole pipeline (or --from/--until/--only), skipping finished stages",
        _add_run_args,
    ),
    "status": ("pipeline.driver:main_status", "show each stage's state and key metrics", _add_status_args),
    "publish": (
        "pipeline.publish",
        "upload a finished stage's adapter and a model card to the Hub",
        _add_publish_args,
    ),
    "report": (
        "pipeline.report",
        "write RUN_DIR/report/index.html (and report.md) with every stage's plots and the final table",
        _add_report_args,
    ),
    "chat": (
        "pipeline.chat",
        "talk to a finished stage's model in the terminal (or answer one --prompt)",
        _add_chat_args,
    ),
}


def stage_module(stage: str) -> Any:
    if stage not in STAGE_MODULES:
        raise UserError(f"unknown stage '{stage}' (valid stages: {', '.join(STAGE_MODULES)})")
    return importlib.import_module(STAGE_MODULES[stage])


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/demo.yaml")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. pretrain.max_steps=50"
    )
    parser.add_argument("--dry-run", action="store_true", help="validate the recipe and print the plan; run nothing")
    parser.add_argument(
        "--rerun", action="store_true", help="run again even if finished; the old result is moved aside"
    )
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
        state = (
            "finished"
            if is_finished(final)
            else "resumable"
            if newest_checkpoint(stage_dir(cfg, args.command))
            else "new"
        )
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
            module, _, function = EXTRA_COMMANDS[args.command][0].partition(":")
            getattr(importlib.import_module(module), function or "main")(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Preempted as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        sys.exit(143)  # 128 + SIGTERM, what schedulers expect of a pre-empted job
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
