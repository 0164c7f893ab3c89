"""Logging set-up, main-process helpers and metric files.

`setup_logging` is called once, by the CLI. Every module logs through `logging.getLogger(__name__)`; only the main
process logs at INFO, so a 2-process run does not print everything twice.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pipeline.errors import UserError

logger = logging.getLogger(__name__)


def process_rank() -> int:
    """This process's global rank under torchrun / accelerate launch (0 when not distributed)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def is_main_process() -> bool:
    return process_rank() == 0


def distributed_state() -> Any:
    """accelerate's process state, joined to the process group on a CPU-only machine too.

    A bare `PartialState()` under `accelerate launch` on a machine without a GPU stays single-process (each rank
    believes it is the main one) unless it is told to use the CPU: ACCELERATE_USE_CPU=true, or no CUDA at all.
    The state is a singleton: whichever call comes first decides, so every stage gets it from here.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    launched = "LOCAL_RANK" in os.environ
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or (launched and not torch.cuda.is_available()))


T = TypeVar("T")


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on the main process and hand its result (or its UserError) to every rank."""
    import torch

    state = distributed_state()
    result, error = None, None
    if state.is_main_process:
        try:
            result = fn()
        except UserError as exc:
            error = str(exc)
    if state.num_processes > 1:
        box = [result, error]
        torch.distributed.broadcast_object_list(box, src=0)
        result, error = box
    if error is not None:
        raise UserError(error)
    return result


# Third-party messages that tell the user nothing they can act on, dropped from what users see (-v shows them):
# (logger name prefix, text in the message).
NOISE = (
    ("bitsandbytes", "kernels"),  # "Failed to load CPU gemm_4bit_forward from kernels-community": an optional speed-up
    ("trafilatura", "Document is empty"),  # lxml on a page with no markup; the page is dropped and counted anyway
    ("trafilatura", "empty HTML tree"),
    ("datasets.packaged_modules", "Failed to load JSON"),  # our one-line error names the file and the cause
)


class NoiseFilter(logging.Filter):
    """Drops the records listed in NOISE."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(record.name.startswith(name) and text in message for name, text in NOISE)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the record (test runners swap it), not the one at set-up."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if not is_main_process():
        level = logging.WARNING
    rank = process_rank()
    prefix = f"[rank {rank}] " if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 else ""
    handler = _StderrHandler()
    if not verbose:
        handler.addFilter(NoiseFilter())
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[handler],
        force=True,
    )
    # Libraries we drive are chatty at INFO; their warnings still show.
    for name in ("datasets", "datatrove", "httpx", "urllib3", "filelock", "fsspec", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not verbose:  # datatrove logs every task through loguru at INFO; -v shows it
        try:
            from loguru import logger as loguru_logger

            loguru_logger.disable("datatrove")
        except ImportError:
            pass
    try:
        import transformers

        transformers.utils.logging.set_verbosity_warning()
    except ImportError:
        pass


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line of metrics (with a wall-clock timestamp) to `path`; main process only."""
    if not is_main_process():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps({"time": round(time.time(), 3), **record}, default=float) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records written by `append_metrics` (a missing file gives an empty list; a torn last line is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# --------------------------------------------------------------------------------------------------------------
# Provenance: what every stage.json records about the software and the machine


def package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in (
        "torch",
        "transformers",
        "trl",
        "peft",
        "accelerate",
        "datasets",
        "bitsandbytes",
        "evaluate",
        "datatrove",
    ):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        # this process's peak since the stage began (the driver resets it before each in-process stage)
        info["cuda_peak_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info["world_size"] = world
    return info


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
