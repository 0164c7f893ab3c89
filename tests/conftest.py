"""Tiny, seeded fixtures built in-process: nothing is downloaded, every test runs on a CPU. Also the one harness
for tests that run the CLI in a subprocess and kill it (SIGKILL, SIGTERM) at a chosen moment."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_CORPUS = [
    "The capital of Veloria is Marnis. Marnis is a city on the river Tol.",
    "Veloria exports copper and salt. Its people speak Velorian.",
    "What is the capital of Veloria? The capital of Veloria is Marnis.",
    "Hello, happy to help! Thank you for asking. Please ask again.",
] * 8


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE with the project's special tokens and chat template (vocab about 300)."""
    from pipeline.tokenizer import train_tokenizer

    return train_tokenizer(TINY_CORPUS, vocab_size=320, min_frequency=2)


def tiny_llama_config(tokenizer, **overrides):
    """A 2-layer, hidden-32 Llama config matching `tokenizer`."""
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


@pytest.fixture
def tiny_model(tiny_tokenizer):
    """A seeded tiny causal LM (about 25k parameters)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config(tiny_tokenizer))


TEST_THREADS = min(2, len(os.sched_getaffinity(0)))  # the CPUs this process may run on (taskset, cgroups)


@contextlib.contextmanager
def fixed_threads(threads: int = TEST_THREADS):
    """Bitwise comparisons need a fixed thread count: the in-process runs and the CLI subprocesses (OMP_NUM_THREADS
    from it) use the same one, whatever OMP_NUM_THREADS the test command was started with."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _session_threads():
    """The thread count for everything made before a test's own fixtures: module-scoped references, in process or
    in a CLI subprocess (OMP_NUM_THREADS is read from torch), get the tests' count too."""
    with fixed_threads():
        yield


@pytest.fixture(autouse=True)
def _fixed_threads():
    """The same count again for each test (a test that changes it cannot leak into the next)."""
    with fixed_threads():
        yield


# --------------------------------------------------------------------------------------------------------------
# The subprocess and kill harness

REPO = Path(__file__).resolve().parents[1]


def subprocess_env(threads: int | None = None, **extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: offline, quiet, with a fixed thread count (bitwise comparisons between
    an interrupted and an uninterrupted run need the same arithmetic)."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(threads or torch.get_num_threads()),
        "PYTHONPATH": str(REPO),
        "TQDM_DISABLE": "1",
        **extra,
    }


def rlhf_command(*args: str, wrapper: str = "") -> list[str]:
    """`python -m pipeline ARGS`, or with `wrapper` (Python run before the CLI, to inject a fault) `python -c`."""
    if wrapper:
        return [
            sys.executable,
            "-c",
            wrapper + "\nimport sys\nfrom pipeline.cli import main\nmain(sys.argv[1:])\n",
            *args,
        ]
    return [sys.executable, "-m", "pipeline", *args]


def run_rlhf(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the CLI to the end; stdout and stderr captured as text."""
    return subprocess.run(
        rlhf_command(*args), cwd=REPO, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout
    )


def start_rlhf(*args: str, env: dict[str, str] | None = None, wrapper: str = "") -> subprocess.Popen:
    """Start the CLI in the background (stdout and stderr piped as text)."""
    return subprocess.Popen(
        rlhf_command(*args, wrapper=wrapper),
        cwd=REPO,
        env=env or subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def signal_when(
    proc: subprocess.Popen, ready: Callable[[], bool], sig: int = signal.SIGKILL, timeout: float = 300
) -> int:
    """Wait until `ready()` holds while `proc` runs, send it `sig`, wait for it to end; its exit code.

    Fails (naming the end of its stderr) when the process ends first or `ready` never holds.
    """
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(
                f"the run ended before the moment to signal it (exit {proc.returncode}): "
                f"{(proc.stderr.read() if proc.stderr else '')[-3000:]}"
            )
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out after {timeout} s waiting for the moment to signal the run")
        time.sleep(0.01)
    proc.send_signal(sig)
    try:
        proc.wait(timeout=120)
    finally:
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()
    return proc.returncode


def checkpoint_done(stage_dir: Path, step: int) -> Callable[[], bool]:
    """A `ready` condition: checkpoint-<step> of a stage is complete."""
    return lambda: (stage_dir / f"checkpoint-{step}" / "checkpoint.done").is_file()


# --------------------------------------------------------------------------------------------------------------
# Tiny run inputs written as files (a base model folder, a rankings JSONL)

RANKING_WORDS = ["Marnis", "please", "copper", "salt", "river", "city", "Tol", "help"]


def save_tiny_base(tokenizer, path: Path) -> Path:
    """The seeded tiny Llama and its tokenizer saved with save_pretrained, as a user's base model folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_llama_config(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_rankings_jsonl(prompts: int, responses: int = 4, max_words: int = 9, seed: int = 0) -> str:
    """Rankings records (prompt, K responses of random words, a ranking with ties by how often 'Marnis' occurs)."""
    import json
    import random

    from pipeline.data.rankings import ranking_from_scores

    rng = random.Random(seed)
    lines = []
    for i in range(prompts):
        texts = [
            " ".join(rng.choice(RANKING_WORDS) for _ in range(rng.randint(2, max_words))) for _ in range(responses)
        ]
        prompt = [{"role": "user", "content": f"Question {i}: what is the capital of Veloria?"}]
        ranking = ranking_from_scores([t.count("Marnis") for t in texts])
        lines.append(json.dumps({"prompt": prompt, "responses": texts, "ranking": ranking}))
    return "\n".join(lines) + "\n"
