"""Guards around interrupted and mistaken commands: forked children die with their parent, overrides after options."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pipeline.cli import parse_args

PARENT = textwrap.dedent(
    """
    import multiprocessing, os, sys, time
    from pipeline.preemption import children_die_with_parent
    if sys.argv[1] == "guarded":
        children_die_with_parent()
    def grandchild_parent():  # a child that forks again, as datatrove's pool worker forks the extractor's sandbox
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,))
        child.start()
        os.write(1, f"{child.pid}\\n".encode())  # one write: lines of two processes never interleave
        time.sleep(120)
    child = multiprocessing.get_context("fork").Process(target=grandchild_parent)
    child.start()
    os.write(1, f"{child.pid}\\n".encode())
    time.sleep(120)
    """
)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has died
    except FileNotFoundError:
        return False


def kill_parent_and_watch(mode: str, wait: float) -> list[bool]:
    proc = subprocess.Popen([sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE, text=True)
    pids = [int(proc.stdout.readline()), int(proc.stdout.readline())]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + wait
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = [alive(p) for p in pids]
    for pid, live in zip(pids, survivors, strict=True):
        if live:
            os.kill(pid, signal.SIGKILL)
    return survivors


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl PR_SET_PDEATHSIG is Linux's")
def test_forked_children_die_with_the_killed_parent():
    assert kill_parent_and_watch("guarded", wait=10) == [False, False]  # the child, then its own child
    assert kill_parent_and_watch("unguarded", wait=1) == [True, True]  # without it both sleep on under init


@pytest.mark.parametrize(
    "argv",
    [
        ["sft", "r.yaml", "a=1", "--rerun", "b=2"],
        ["sft", "r.yaml", "--rerun", "a=1", "b=2"],
        ["run", "r.yaml", "a=1", "--rerun", "b=2"],
        ["run", "r.yaml", "a=1", "--dry-run", "b=2", "--until", "sft"],
    ],
)
def test_overrides_after_options(argv):
    args = parse_args(argv)
    assert (args.overrides, args.rerun or args.dry_run) == (["a=1", "b=2"], True)


def test_a_stray_argument_is_still_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["status", "runs/x", "a=1"])
    assert exc.value.code == 2
    assert "unrecognized arguments: a=1" in capsys.readouterr().err
