"""Pre-emption: SIGTERM or SIGUSR1 (Slurm's `--signal`, a scheduler's stop) asks the running stage to save a
checkpoint and stop; the same command then resumes it. Exit code 143 (128 + SIGTERM) tells a scheduler so."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from pipeline.checkpoints import newest_checkpoint

logger = logging.getLogger(__name__)


class Preempted(Exception):
    """A stage stopped on SIGTERM after saving a checkpoint; running the same command again resumes it."""


_preempted = threading.Event()
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_forking_pid = [0]  # the pid of the process that forks, as its children see it


def children_die_with_parent() -> None:
    """Every process forked from here on (datatrove's local executor and its extractor's sandbox, DataLoader workers)
    gets SIGKILL when the process that forked it dies, so a killed command leaves no child asleep under init.

    Linux only (prctl PR_SET_PDEATHSIG); elsewhere nothing changes. A child whose parent died before the prctl took
    effect exits at once.
    """
    if not sys.platform.startswith("linux") or getattr(children_die_with_parent, "installed", False):
        return
    libc = ctypes.CDLL(None, use_errno=True)

    def before() -> None:
        _forking_pid[0] = os.getpid()

    def in_child() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != _forking_pid[0]:
            os._exit(1)

    os.register_at_fork(before=before, after_in_child=in_child)
    children_die_with_parent.installed = True


def install_preemption_handler() -> None:
    """On SIGTERM or SIGUSR1 (Slurm's `--signal`), ask the running stage to checkpoint and stop at the next step."""

    def handler(signum: int, frame: Any) -> None:
        logger.warning("received %s: saving a checkpoint and stopping", signal.Signals(signum).name)
        _preempted.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGUSR1, handler)


def preemption_signalled() -> bool:
    """True once this process got a pre-emption signal (no collective: for work one process does alone)."""
    return _preempted.is_set()


def preemption_requested() -> bool:
    """True once any process of the run got a pre-emption signal (agreed across ranks when distributed)."""
    import torch  # not at the top: the CLI imports this module, and `rlhf status` needs no torch
    import torch.distributed as dist

    flag = _preempted.is_set()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tensor = torch.tensor([1.0 if flag else 0.0])
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        flag = bool(tensor.item() > 0)
        if flag:
            _preempted.set()
    return flag


def raise_if_preempted(sdir: Path) -> None:
    """Call after training returns: if it stopped for a pre-emption, end the stage without finishing it."""
    if _preempted.is_set():
        newest = newest_checkpoint(sdir)
        raise Preempted(f"pre-empted; the newest complete checkpoint is {newest}. Run the same command to resume")
