"""The driver: `rlhf run RECIPE` chains webtext -> pretrain -> sft -> reward -> ppo; `rlhf status RUN_DIR` shows where a
run is; `rlhf <stage> RECIPE` runs one stage.

Each stage's `final/` feeds the next (the stages resolve their inputs from the run directory). A stage that finished
with the same settings is skipped; one whose settings changed stops the run with the changed keys, unless `--rerun` is
given: then it runs again, and so does every later stage (the old results are moved aside, never deleted). A stage
that was interrupted (SIGKILL, pre-emption) resumes from its newest complete checkpoint.

With `--accelerate-config FILE` each stage runs as its own `accelerate launch --config_file FILE -m pipeline <stage>`
job, so one recipe runs on a CPU, one GPU, 8 GPUs or several nodes without edits. The functions here return what
happened; `cli.py` prints it.

    rlhf run recipes/demo.yaml
    rlhf run recipes/demo.yaml --from sft --accelerate-config accelerate_configs/cpu_ddp.yaml
    rlhf status runs/demo
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from pipeline.checkpoints import (
    enclosing_run_dir,
    final_dir,
    identity_withdrawn_on_error,
    is_finished,
    metric,
    newest_checkpoint,
    read_stage_json,
    same_stage,
    stage_dir,
    stage_identity,
    stage_seconds,
    write_json_atomic,
)
from pipeline.config import PipelineConfig, build_config
from pipeline.errors import UserError
from pipeline.preemption import Preempted, install_preemption_handler, preemption_signalled
from pipeline.stages import STAGES, check_stage, pipeline_stages, round_arguments, split_stage, stage_module
from pipeline.tracking import is_main_process, process_rank

logger = logging.getLogger(__name__)


def select_stages(start: str | None, until: str | None, only: list[str] | None, rounds: int = 1) -> list[str]:
    """The stages to visit, in pipeline order (with `rounds` > 1, reward-2, ppo-2, ... after the first five)."""
    stages = pipeline_stages(rounds)
    for name in [start, until, *(only or [])]:
        if name is not None:
            check_stage(name)
            if name not in stages:
                raise UserError(f"stage '{name}' is not part of this recipe's {rounds} round(s) (raise rounds)")
    if only:
        if start or until:
            raise UserError("--only cannot be combined with --from/--until (use one or the other)")
        return [s for s in stages if s in only]
    first = stages.index(start) if start else 0
    last = stages.index(until) if until else len(stages) - 1
    if first > last:
        raise UserError(f"--from {start} comes after --until {until}; nothing to run")
    return stages[first : last + 1]


NOT_NEEDED = "not needed"


def needed_stages(cfg: PipelineConfig) -> dict[str, str]:
    """stage -> why it is needed: the run's last stage, and every stage whose `final/` a needed stage reads. With a
    base given (`sft.base`, `reward.base`, `ppo.policy_base`, `ppo.reward_model`, `pretrain.dataset`), the stages
    upstream of it that nothing else reads are left out (shown as "not needed" and not run)."""
    stages = pipeline_stages(cfg.rounds)
    finals = {final_dir(cfg, stage).resolve(): stage for stage in stages}
    needed = {stages[-1]: "the run's last stage"}
    for position in range(len(stages) - 1, -1, -1):
        stage = stages[position]
        if stage not in needed:
            continue
        try:
            inputs = stage_module(stage).resolve_inputs(cfg, **round_arguments(stage))
        except UserError:  # what it reads is unknown: every stage before it stays (its error shows when it runs)
            for upstream in stages[:position]:
                needed.setdefault(upstream, f"{stage}'s inputs are not resolved")
            continue
        for key, value in inputs.items():
            path = Path(str(value)).expanduser().resolve()
            upstream = next((finals[p] for p in (path, *path.parents) if p in finals), None)
            if upstream is not None and upstream != stage:
                needed.setdefault(upstream, f"{stage} reads it ({key})")
    return needed


def not_needed_reason(cfg: PipelineConfig, stage: str) -> str:
    """Why a stage is not needed, naming the key that makes it so."""
    bases = {
        "webtext": "pretrain.dataset or sft.base",
        "pretrain": "sft.base",
        "sft": "reward.base and ppo.policy_base",
        "reward": "ppo.reward_model",
    }
    given = bases.get(split_stage(stage)[0], "a base")
    return (
        f"{NOT_NEEDED}: no later stage reads its output ({given} given); `rlhf {split_stage(stage)[0]}` runs it alone"
    )


def stage_state(cfg: PipelineConfig, stage: str) -> tuple[str, dict[str, Any]]:
    """('finished' | 'changed' | 'damaged' | 'interrupted' | 'new', identity) of a stage under this config; a
    'damaged' one (its stage.json does not parse) stops the run with that error, or runs again under --rerun."""
    identity = stage_identity(cfg, stage, stage_module(stage).resolve_inputs(cfg, **round_arguments(stage)))
    final = final_dir(cfg, stage)
    if is_finished(final):
        try:
            same = same_stage(read_stage_json(final), identity, cfg)
        except UserError:
            return "damaged", identity
        return ("finished" if same else "changed"), identity
    if newest_checkpoint(stage_dir(cfg, stage)) or (stage_dir(cfg, stage) / "identity.json").is_file():
        return "interrupted", identity
    return "new", identity


def run_pipeline(
    cfg: PipelineConfig,
    stages: list[str],
    rerun: bool = False,
    recipe: str | None = None,
    overrides: list[str] | None = None,
    accelerate_config: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Run `stages` in order; return what happened to each (action, seconds, final path)."""
    summary: dict[str, dict[str, Any]] = {}
    upstream_ran = False
    needed = needed_stages(cfg)
    for position, stage in enumerate(stages):
        if stage not in needed:
            logger.info("%s: %s", stage, not_needed_reason(cfg, stage))
            summary[stage] = {"action": NOT_NEEDED, "seconds": 0.0, "final": "-"}
            continue
        state, _ = stage_state(cfg, stage)
        explicit = rerun and position == 0 and stages[0] != STAGES[0]  # `--from S --rerun` / `--only S --rerun`
        force = upstream_ran or explicit or (rerun and state in ("changed", "damaged"))
        if state == "finished" and not force:
            logger.info("%s: finished with the same settings, skipped", stage)
            summary[stage] = {"action": "skipped", "seconds": 0.0, "final": str(final_dir(cfg, stage))}
            continue
        action = (
            "rerun"
            if force and state in ("finished", "changed", "damaged")
            else "resumed"
            if state == "interrupted"
            else "ran"
        )
        logger.info("%s: %s", stage, {"rerun": "running again", "resumed": "resuming", "ran": "running"}[action])
        start = time.time()
        if accelerate_config and stage != "webtext":  # datatrove parallelises the webtext stage itself
            _launch(stage, recipe, overrides or [], force, accelerate_config)
            final = final_dir(cfg, stage)
        else:
            _reset_cuda_peak()
            with identity_withdrawn_on_error(cfg, stage):
                final = stage_module(stage).run(cfg, rerun=force, **round_arguments(stage))
        summary[stage] = {"action": action, "seconds": round(time.time() - start, 1), "final": str(final)}
        upstream_ran = True
    _record(cfg, summary)
    return summary


def _reset_cuda_peak() -> None:
    """Each stage's stage.json reports its own peak GPU memory, also when the driver runs several in one process."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _launch(stage: str, recipe: str | None, overrides: list[str], rerun: bool, accelerate_config: str) -> None:
    """Run one stage as its own `accelerate launch` job; its failure ends the pipeline with its exit code."""
    if recipe is None:
        raise UserError("--accelerate-config needs the recipe path (run the driver from the command line)")
    if not Path(accelerate_config).is_file():
        raise UserError(f"accelerate config not found: {accelerate_config} (see accelerate_configs/)")
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        accelerate_config,
        "-m",
        "pipeline",
        split_stage(stage)[0],
        recipe,
        *overrides,
    ]
    if split_stage(stage)[1] > 1:
        command += ["--round", str(split_stage(stage)[1])]
    if rerun:
        command.append("--rerun")
    logger.info("launching: %s", " ".join(command))
    result = subprocess.run(command, env=os.environ.copy())
    # accelerate launch exits 1 when its ranks exit 143; the driver saw the signal itself (Slurm signals every process)
    if result.returncode == 143 or (result.returncode != 0 and preemption_signalled()):
        raise Preempted(f"stage {stage} was pre-empted; run the same command to resume")
    if result.returncode != 0:
        raise UserError(
            f"stage {stage} failed under accelerate launch (exit code {result.returncode}); see its log above"
        )


def _record(cfg: PipelineConfig, summary: dict[str, dict[str, Any]]) -> None:
    if not is_main_process() or not summary:
        return
    path = cfg.run_path / "driver.json"
    history = json.loads(path.read_text()) if path.is_file() else []
    history.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "stages": summary})
    write_json_atomic(path, history)


def status_rows(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """One row per stage: state, key metrics, checkpoint step, time taken."""
    rows = []
    needed = needed_stages(cfg)
    for stage in pipeline_stages(cfg.rounds):
        row: dict[str, Any] = {"stage": stage}
        try:
            row["state"] = stage_state(cfg, stage)[0] if stage in needed else not_needed_reason(cfg, stage)
        except UserError as exc:
            row["state"] = f"blocked: {exc}"
        final = final_dir(cfg, stage)
        if is_finished(final):
            record = read_stage_json(final)
            metrics = record.get("metrics", {})
            values = {k: metric(metrics, k) for k in check_stage(stage).key_metrics}
            row["metrics"] = {k: v for k, v in values.items() if v is not None}
            row["seconds"] = stage_seconds(metrics)
        checkpoint = newest_checkpoint(stage_dir(cfg, stage))
        if checkpoint and row["state"] == "interrupted":
            row["checkpoint"] = checkpoint.name
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------------------
# Commands (cli.py parses and prints; these do the work)


def plan_run(cfg: PipelineConfig, stages: list[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """(stage, state, inputs) of each stage `rlhf run --dry-run` would visit; a stage that nothing needs is
    "not needed: ..." with no inputs."""
    rows = []
    needed, planned = needed_stages(cfg), []
    for stage in stages:
        if stage not in needed:
            rows.append((stage, not_needed_reason(cfg, stage), {}))
            continue
        state, identity = stage_state(cfg, stage)
        inputs = {k: v["path"] for k, v in identity["inputs"].items()}
        check_inputs_exist(cfg, stage, inputs, made_before=planned)
        planned.append(stage)
        rows.append((stage, state, inputs))
    return rows


_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".gz", ".warc", ".yaml")


def check_inputs_exist(cfg: PipelineConfig, stage: str, inputs: dict[str, Any], made_before: list[str]) -> None:
    """For --dry-run: every local input of `stage` exists, or is the result of a stage planned before it (a Hub id or
    'demo' is not checked). A missing one is a one-line error naming it and what makes it."""
    run = cfg.run_path.resolve()
    for name, value in inputs.items():
        if not isinstance(value, str) or not value or Path(value).exists():
            continue
        path = Path(value).expanduser().resolve()
        if path.is_relative_to(run):
            maker = path.relative_to(run).parts[0]
            if maker not in pipeline_stages(cfg.rounds) or path == run / maker:
                continue  # something the stage makes itself (the demo world, its own folders)
            if maker in made_before:
                continue
            raise UserError(
                f"{stage}: input '{name}' does not exist yet: {value} (run stage '{maker}' first, or name an existing "
                f"one in the recipe)"
            )
        if Path(value).is_absolute() or value.startswith((".", "~")) or value.endswith(_LOCAL_SUFFIXES):
            raise UserError(f"{stage}: input '{name}' not found: {value} (fix the path in the recipe)")


def start_command(cfg: PipelineConfig) -> None:
    """What a command does first: save on pre-emption signals. (The resolved config is recorded by the first stage
    that goes ahead, so a refused command leaves run_dir/config.yaml as it was.)"""
    install_preemption_handler()


LOCK_FILE = ".lock"
_LOCK_HELD = "RLHF_RUN_DIR_LOCK"  # set while a command holds the lock: the stages it launches run under it


@contextlib.contextmanager
def run_dir_lock(cfg: PipelineConfig) -> Iterator[None]:
    """One command at a time in a run directory: a second `rlhf run` (or stage command) on the same run_dir stops with
    a one-line error instead of writing the same stage folders. The lock is an flock on run_dir/.lock, so the kernel
    releases it when its holder dies (SIGKILL included): a killed run never blocks the command that resumes it. Held
    by the first process of a launch; the stages the driver launches under accelerate inherit it."""
    if process_rank() != 0 or os.environ.get(_LOCK_HELD):
        yield
        return
    if not cfg.run_path.is_dir():
        cfg.run_path.mkdir(parents=True, exist_ok=True)
    handle = open(cfg.run_path / LOCK_FILE, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(
                f"another rlhf command ({holder}) is running in {cfg.run_path}; wait for it to end (a stage it "
                "finishes is then skipped), or give this one another run_dir=..."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}: {' '.join(sys.argv[1:3])}")
        handle.flush()
        os.environ[_LOCK_HELD] = str(cfg.run_path)
        try:
            yield
        finally:
            os.environ.pop(_LOCK_HELD, None)
    finally:
        handle.close()


def plan_stage(cfg: PipelineConfig, stage: str) -> tuple[str, dict[str, str], Path]:
    """(state, inputs, final path) of one stage, for `rlhf <stage> --dry-run`."""
    inputs = stage_module(stage).resolve_inputs(cfg, **round_arguments(stage))
    check_inputs_exist(cfg, stage, {k: str(v) for k, v in inputs.items()}, made_before=[])
    final = final_dir(cfg, stage)
    state = "finished" if is_finished(final) else "resumable" if newest_checkpoint(stage_dir(cfg, stage)) else "new"
    return state, inputs, final


def run_stage(cfg: PipelineConfig, stage: str, rerun: bool = False) -> Path:
    """Run one stage (skipped when finished with the same settings); its `final/`."""
    start_command(cfg)
    with identity_withdrawn_on_error(cfg, stage):
        return stage_module(stage).run(cfg, rerun=rerun, **round_arguments(stage))


def load_run_dir(run_dir: str | Path) -> PipelineConfig:
    """The resolved config of an existing run directory (for `rlhf status`)."""
    resolved = Path(run_dir) / "config.yaml"
    if not resolved.is_file():
        above = enclosing_run_dir(run_dir)
        if above is not None:
            raise UserError(f"{run_dir} is not a run directory (no config.yaml) but lies in one: give {above}")
        raise UserError(f"{run_dir} is not a run directory (no config.yaml); start one with `rlhf run RECIPE`")
    cfg = build_config(PipelineConfig, yaml.safe_load(resolved.read_text()))
    cfg.run_dir = str(run_dir)
    return cfg
