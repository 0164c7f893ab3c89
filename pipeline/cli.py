"""`rlhf <command> RECIPE [key=value ...]`: the one entry point (also `python -m pipeline`, `accelerate launch -m pipeline`).

Parsing only: each command maps to one function. Stage commands (webtext | pretrain | sft | reward | ppo, from the
registry in stages.py) and `run` / `status` go to the driver; `report`, `chat` and `publish` to their modules.
Mistakes a user can fix end in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline import driver
from pipeline.config import PipelineConfig, load_config
from pipeline.errors import UserError, environment_error
from pipeline.preemption import Preempted, children_die_with_parent
from pipeline.stages import REGISTRY, ROUNDED, STAGES, split_stage, stage_module, stage_name
from pipeline.tracking import is_main_process, setup_logging


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


def _add_round_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--round",
        type=int,
        default=1,
        metavar="N",
        help="round of iterated RLHF (2 and up: the stage runs as <stage>-N)",
    )


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/demo.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. ppo.kl_target=4")
    parser.add_argument("--from", dest="start", metavar="STAGE", help="first stage to run")
    parser.add_argument("--until", metavar="STAGE", help="last stage to run")
    parser.add_argument("--only", nargs="+", metavar="STAGE", help="run just these stages")
    parser.add_argument(
        "--rerun",
        action="store_true",
        help="re-run changed stages (and the --from/--only stage) and every later one; old results are kept",
    )
    parser.add_argument(
        "--accelerate-config", metavar="FILE", help="launch each stage with accelerate launch --config_file FILE"
    )
    parser.add_argument("--no-report", action="store_true", help="do not write the HTML report at the end")
    parser.add_argument("--dry-run", action="store_true", help="validate the recipe and print the plan; run nothing")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_run_dir_args(parser: argparse.ArgumentParser) -> None:
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


def stage_command(args: argparse.Namespace) -> None:
    """`rlhf <stage> RECIPE`: one stage, or with --dry-run its state and inputs."""
    cfg = load_config(args.recipe, args.overrides)
    stage = stage_name(args.command, getattr(args, "round", 1))
    driver.select_stages(None, None, [stage], cfg.rounds)  # a round past the recipe's rounds is a one-line error
    if args.dry_run:
        state, inputs, final = driver.plan_stage(cfg, stage)
        _check_plan(cfg, stage, inputs)
        print(f"recipe {args.recipe} is valid")
        print(f"stage {stage}: {state}; inputs: " + ", ".join(f"{k}={v}" for k, v in inputs.items()))
        print(f"output: {final}")
        return
    with driver.run_dir_lock(cfg):
        final = driver.run_stage(cfg, stage, args.rerun)
    if is_main_process():
        print(f"{stage} finished: {final}")


def run_command(args: argparse.Namespace) -> None:
    """`rlhf run RECIPE`: the stages in order, skipping finished ones; then the report."""
    cfg = load_config(args.recipe, args.overrides)
    stages = driver.select_stages(args.start, args.until, args.only, cfg.rounds)
    if args.dry_run:
        print(f"recipe {args.recipe} is valid; run directory {cfg.run_dir}")
        for stage, state, inputs in driver.plan_run(cfg, stages):
            if state.startswith(driver.NOT_NEEDED):
                print(f"  {stage:9s} {state}")
                continue
            _check_plan(cfg, stage, inputs)
            print(f"  {stage:9s} {state:12s} inputs: " + (", ".join(_input(k, v) for k, v in inputs.items()) or "-"))
        return
    driver.start_command(cfg)
    with driver.run_dir_lock(cfg):
        summary = driver.run_pipeline(cfg, stages, args.rerun, args.recipe, args.overrides, args.accelerate_config)
        if not is_main_process():
            return
        for stage, info in summary.items():
            print(f"{stage:9s} {info['action']:8s} {info['seconds']:7.1f} s  {info['final']}")
        if not args.no_report and split_stage(stages[-1])[0] == STAGES[-1]:
            from pipeline.report import versions_line, write_report

            print(f"report: {write_report(cfg.run_path)}")
            print(versions_line(cfg.run_path))


def status_command(args: argparse.Namespace) -> None:
    """`rlhf status RUN_DIR`: each stage's state, checkpoint and key metrics."""
    cfg = driver.load_run_dir(args.run_dir)
    print(f"run directory {args.run_dir}")
    for row in driver.status_rows(cfg):
        metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in row.get("metrics", {}).items())
        extra = f" ({row['checkpoint']})" if "checkpoint" in row else ""
        print(f"  {row['stage']:9s} {row['state']}{extra}  {metrics}")


def _check_plan(cfg: PipelineConfig, stage: str, inputs: dict[str, Any]) -> None:
    """For --dry-run, the checks of a stage that need its inputs but load no model (its module's `check_plan`, where
    it has one: SFT compares sft.max_seq_len with a local base's context), so they fail here, not once it runs."""
    check = getattr(stage_module(stage), "check_plan", None)
    if check is not None:
        check(cfg, inputs)


def _input(key: str, value: str) -> str:
    """`key=value` of a stage input in a plan; a Hub id (model or dataset) says that it is fetched when the stage runs
    (a dry run reads nothing from the Hub)."""
    from pipeline.data.records import is_local

    hub = value != "demo" and not is_local(value)
    return f"{key}={value}" + (" (will be fetched from the Hub)" if hub else "")


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# The heavy command modules (matplotlib, huggingface_hub, torch) are imported only by the command that needs them.
def _report(args: argparse.Namespace) -> None:
    from pipeline.report import versions_line, write_report

    print(f"report: {write_report(Path(args.run_dir))}")
    print(versions_line(Path(args.run_dir)))


def _chat(args: argparse.Namespace) -> None:
    from pipeline.chat import main

    main(args)


def _publish(args: argparse.Namespace) -> None:
    from pipeline.publish import main

    main(args)


# Commands that are not a single stage: name -> (function, help, argument adder).
COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], str, Callable[[argparse.ArgumentParser], None]]] = {
    "run": (run_command, "run the whole pipeline (or --from/--until/--only), skipping finished stages", _add_run_args),
    "status": (status_command, "show each stage's state and key metrics", _add_run_dir_args),
    "report": (
        _report,
        "write RUN_DIR/report/index.html (and report.md) with every stage's plots and the final table",
        _add_run_dir_args,
    ),
    "chat": (_chat, "talk to a finished stage's model in the terminal (or answer one --prompt)", _add_chat_args),
    "publish": (_publish, "upload a finished stage's adapter and a model card to the Hub", _add_publish_args),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for stage in REGISTRY:
        stage_parser = sub.add_parser(stage.name, help=stage.help, description=stage.help)
        _add_recipe_args(stage_parser)
        if stage.name in ROUNDED:
            _add_round_arg(stage_parser)
    for name, (_, help_text, add_args) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with `key=value` overrides allowed after options too (`rlhf sft R a=1 --rerun b=2`):
    argparse ends a `nargs="*"` positional at the first option, so the later overrides come back as extras."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if getattr(args, "only", None):  # `--only ppo ppo.kl_target=3`: nargs="+" took the override as a stage name
        extras = [a for a in args.only if "=" in a] + extras
        args.only = [a for a in args.only if "=" not in a]
        if not args.only:
            parser.error("--only needs at least one stage name before the key=value overrides")
    stray = [a for a in extras if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extras:
        args.overrides = [*args.overrides, *extras]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    children_die_with_parent()
    try:
        if args.command in COMMANDS:
            COMMANDS[args.command][0](args)
        else:
            stage_command(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Preempted as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        sys.exit(143)  # 128 + SIGTERM, what schedulers expect of a pre-empted job
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (OSError, RuntimeError) as exc:  # a full disk or a read-only run directory: one line naming the path
        message = environment_error(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
