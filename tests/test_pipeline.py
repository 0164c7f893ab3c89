"""The driver end to end: `rlhf run` through every stage on a tiny demo world, then skip, invalidate, resume after
SIGKILL, a crash in the middle of a save, SIGTERM (pre-emption) and a 2-process run compared with the 1-process one.

Every run is a real `python -m pipeline run ...` process with tiny models and few steps (about 30 s for the whole
pipeline), so what is tested is what a user runs.
"""

from __future__ import annotations

import json
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import checkpoint_done, run_rlhf, signal_when, start_rlhf, subprocess_env
from safetensors.torch import load_file

from pipeline.checkpoints import CHECKPOINT_DONE, list_checkpoints, read_stage_json

REPO = Path(__file__).resolve().parents[1]
STAGES = ("webtext", "pretrain", "sft", "reward", "ppo")

# A world of 6 countries and 2-layer models: every stage runs for real, for a few steps.
TINY = [
    "world.n_entities=6",
    "world.pages_per_fact=2",
    "world.n_demonstrations=48",
    "world.n_eval_prompts=8",
    "pretrain.model.preset=tiny",
    "pretrain.model.num_hidden_layers=2",
    "pretrain.model.hidden_size=32",
    "pretrain.model.intermediate_size=64",
    "pretrain.model.num_attention_heads=4",
    "pretrain.model.num_key_value_heads=2",
    "pretrain.model.max_position_embeddings=128",
    "pretrain.tokenizer.vocab_size=400",
    "pretrain.max_seq_len=32",
    "pretrain.per_device_train_batch_size=8",
    "pretrain.max_steps=8",
    "pretrain.save_steps=2",
    "pretrain.logging_steps=2",
    "pretrain.report_to=none",
    "sft.max_steps=4",
    "sft.save_steps=2",
    "sft.per_device_train_batch_size=4",
    "sft.max_seq_len=128",
    "sft.qa_max_questions=4",
    "sft.qa_max_new_tokens=6",
    "sft.report_to=none",
    "reward.max_steps=4",
    "reward.save_steps=2",
    "reward.per_device_train_batch_size=2",
    "reward.collect.max_prompts=4",
    "reward.collect.max_new_tokens=6",
    "reward.stats_prompts=4",
    "reward.max_records=48",
    "reward.report_to=none",
    "ppo.max_prompt_len=48",
    "ppo.num_updates=2",
    "ppo.rollout_batch_size=4",
    "ppo.mini_batch_size=2",
    "ppo.max_new_tokens=6",
    "ppo.eval_max_prompts=4",
    "ppo.save_steps=1",
    "ppo.report_to=none",
]


def _env(**extra: str) -> dict[str, str]:
    return subprocess_env(threads=1, **extra)


def _recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"# tiny pipeline for tests\nrun_dir: {tmp_path / 'run'}\nseed: 7\njudge: demo\n"
        "webtext:\n  input: demo\nsft:\n  dataset: demo\nreward:\n  dataset: demo\n"
        "ppo:\n  dataset: demo\n  eval_dataset: demo\n"
    )
    return path


def rlhf(tmp_path: Path, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m pipeline <args>` with the tiny recipe and settings after a `run` command."""
    if args[0] == "run":
        args = ("run", str(_recipe(tmp_path)), *TINY, *args[1:])
    result = run_rlhf(*args, env=env or _env())
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def start(tmp_path: Path, *args: str, wrapper: str = "") -> subprocess.Popen:
    """The same `rlhf run` as a background process; `wrapper` is Python run before the CLI (to inject faults)."""
    return start_rlhf("run", str(_recipe(tmp_path)), *TINY, *args, env=_env(), wrapper=wrapper)


def finals(tmp_path: Path) -> dict[str, dict]:
    return {
        s: read_stage_json(tmp_path / "run" / s / "final") for s in STAGES if (tmp_path / "run" / s / "final").exists()
    }


def last_run(tmp_path: Path) -> dict[str, str]:
    """Stage -> action ('ran', 'skipped', 'resumed', 'rerun') of the newest driver run."""
    history = json.loads((tmp_path / "run" / "driver.json").read_text())
    return {stage: info["action"] for stage, info in history[-1]["stages"].items()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One complete tiny pipeline run (shared by the tests that only read or re-run it)."""
    tmp_path = tmp_path_factory.mktemp("pipeline")
    result = rlhf(tmp_path, "run")
    assert f"report: {tmp_path / 'run' / 'report' / 'index.html'}" in result.stdout
    return tmp_path


def test_run_chains_every_stage_and_writes_the_report(finished):
    records = finals(finished)
    assert list(records) == list(STAGES)
    assert last_run(finished) == dict.fromkeys(STAGES, "ran")
    # each stage read the previous stage's final/
    run = finished / "run"
    assert records["pretrain"]["inputs"]["corpus"]["path"] == str(run / "webtext" / "final")
    assert records["reward"]["inputs"]["base"]["path"] == str(run / "sft" / "final" / "merged")
    assert records["ppo"]["inputs"]["reward"]["path"] == str(run / "reward" / "final")
    page = (run / "report" / "index.html").read_text()
    for heading in (
        "web text",
        "pretraining",
        "supervised fine-tuning",
        "reward model",
        "PPO",
        "Base vs SFT vs PPO",
    ):
        assert heading in page
    assert "Not run yet" not in page
    for png in ("data_filters.png", "pretrain_loss.png", "ppo_curves.png"):
        assert (run / "report" / png).stat().st_size > 1000
    status = rlhf(finished, "status", str(run)).stdout
    assert all(f"{stage} " in status for stage in STAGES) and status.count("finished") == 5
    for shown in (
        "documents_kept=",
        "cloze_accuracy=",
        "heldout_accuracy=",
        "test.templated.accuracy=",
        "kl_to_reference=",
    ):
        assert shown in status, shown


def test_second_run_skips_every_finished_stage(finished):
    before = {s: (finished / "run" / s / "final" / "stage.json").stat().st_mtime_ns for s in STAGES}
    rlhf(finished, "run")
    assert last_run(finished) == dict.fromkeys(STAGES, "skipped")
    assert before == {s: (finished / "run" / s / "final" / "stage.json").stat().st_mtime_ns for s in STAGES}


def test_a_second_round_ranks_the_ppo_policys_responses_and_trains_reward_and_ppo_again(finished):
    """rounds=2 after a finished run: round 1 is untouched (skipped), reward-2 adds the PPO policy's responses ranked by
    the annotators to round 1's comparisons, and ppo-2 trains from SFT against reward-2."""
    run = finished / "run"
    before = read_stage_json(run / "ppo" / "final")
    rlhf(finished, "run", "rounds=2")
    assert last_run(finished) == {**dict.fromkeys(STAGES, "skipped"), "reward-2": "ran", "ppo-2": "ran"}
    assert read_stage_json(run / "ppo" / "final") == before
    reward2 = read_stage_json(run / "reward-2" / "final")
    first = read_stage_json(run / "reward" / "final")["metrics"]["data"]["records"]
    new = reward2["metrics"]["data"]["new"]
    assert new["source"] == "policy-1" and new["records"] == new["prompts"] > 0
    assert sum(reward2["metrics"]["data"]["records"].values()) == sum(first.values()) + new["records"]
    assert {"templated", "sampled", "policy-1"} <= set(reward2["metrics"]["test"])  # accuracy on each policy's samples
    assert reward2["inputs"]["policy"]["path"] == str(run / "ppo" / "final")
    ppo2 = read_stage_json(run / "ppo-2" / "final")
    assert ppo2["inputs"]["reward"]["path"] == str(run / "reward-2" / "final") and ppo2["settings"]["round"] == 2
    assert ppo2["inputs"]["base"]["path"] == str(run / "sft" / "final" / "merged")  # again from the SFT policy
    status = rlhf(finished, "status", str(run)).stdout
    assert "reward-2  finished" in status and "ppo-2     finished" in status
    assert "Stage 4: PPO (round 2, ppo-2)" in (run / "report" / "report.md").read_text()


def test_changed_stage_stops_and_rerun_redoes_it_and_every_later_stage(finished):
    ppo_before = read_stage_json(finished / "run" / "ppo" / "final")
    result = rlhf(finished, "run", "sft.learning_rate=2e-3", check=False)
    assert result.returncode != 0
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "sft.learning_rate" in error and "--rerun" in error
    assert "Traceback" not in result.stderr
    assert read_stage_json(finished / "run" / "ppo" / "final") == ppo_before  # nothing finished was touched

    rlhf(finished, "run", "sft.learning_rate=2e-3", "--rerun")
    assert last_run(finished) == {
        "webtext": "skipped",
        "pretrain": "skipped",
        "sft": "rerun",
        "reward": "rerun",
        "ppo": "rerun",
    }
    aside = sorted((finished / "run").glob("ppo.replaced-*"))
    assert len(aside) == 1 and read_stage_json(aside[0] / "final") == ppo_before  # the old result is kept


def test_run_dir_of_another_recipe_and_missing_upstream_are_one_line_errors(finished, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text(f"run_dir: {finished / 'run'}\nseed: 99\nwebtext:\n  input: demo\n")
    result = run_rlhf("run", str(other), *TINY, env=_env(), timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "seed" in error and "run_dir" in error

    lonely = tmp_path / "lonely.yaml"
    lonely.write_text(f"run_dir: {tmp_path / 'empty'}\nseed: 7\nppo:\n  dataset: demo\n")
    result = run_rlhf("ppo", str(lonely), env=_env(), timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "final" in error


def test_sigkill_mid_stage_resumes_that_stage_from_its_newest_checkpoint(tmp_path):
    sft = tmp_path / "run" / "sft"
    assert signal_when(start(tmp_path), checkpoint_done(sft, 2)) == -signal.SIGKILL
    assert not (sft / "final").exists()

    result = rlhf(tmp_path, "run", "-v")
    assert last_run(tmp_path) == {
        "webtext": "skipped",
        "pretrain": "skipped",
        "sft": "resumed",
        "reward": "ran",
        "ppo": "ran",
    }
    assert f"resuming sft from {sft / 'checkpoint-'}" in result.stderr
    assert read_stage_json(sft / "final")["metrics"]["epoch"] > 0


# Dies (SIGKILL, so nothing gets cleaned up) halfway through writing a file into `target` (a path fragment).
CRASH_DURING_SAVE = textwrap.dedent("""
    import os, signal, safetensors.torch as st
    _save = st.save_file
    def save_file(tensors, filename, *args, **kwargs):
        if {target!r} in str(filename):
            _save(tensors, filename, *args, **kwargs)
            with open(filename, "r+b") as fh:
                fh.truncate(os.path.getsize(filename) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return _save(tensors, filename, *args, **kwargs)
    st.save_file = save_file
    import transformers.modeling_utils as mu
    if hasattr(mu, "safe_save_file"):
        mu.safe_save_file = save_file
""")


@pytest.mark.parametrize("target", ["pretrain/checkpoint-4", "pretrain/final.partial"])
def test_crash_during_a_save_never_breaks_resume_nor_leaves_a_final(tmp_path, target):
    proc = start(tmp_path, "--until", "pretrain", wrapper=CRASH_DURING_SAVE.format(target=target))
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
    pretrain = tmp_path / "run" / "pretrain"
    assert not (pretrain / "final").exists()
    if "checkpoint" in target:
        assert (pretrain / "checkpoint-4").is_dir() and not (pretrain / "checkpoint-4" / CHECKPOINT_DONE).exists()
        assert [c.name for c in list_checkpoints(pretrain)] == ["checkpoint-2"]

    result = rlhf(tmp_path, "run", "--until", "pretrain", "-v")
    assert last_run(tmp_path) == {"webtext": "skipped", "pretrain": "resumed"}
    final = pretrain / "final"
    assert read_stage_json(final)["metrics"]["train_steps"] == 8
    assert not (pretrain / "final.partial").exists()
    weights = load_file(str(final / "model.safetensors"))  # complete and loadable
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert "resuming from" in result.stderr


def test_sigterm_saves_a_checkpoint_and_exits_143_then_resumes(tmp_path):
    pretrain = tmp_path / "run" / "pretrain"
    slow = "pretrain.max_steps=400"  # long enough to be signalled mid-training
    proc = start(tmp_path, slow, "pretrain.save_steps=1000", "--until", "pretrain")
    assert signal_when(proc, (pretrain / "metrics.jsonl").is_file, signal.SIGTERM) == 143
    saved = list_checkpoints(pretrain)
    assert len(saved) == 1 and 0 < int(saved[0].name.split("-")[1]) < 400  # saved at the step it stopped, not 1000
    assert not (pretrain / "final").exists()

    rlhf(tmp_path, "run", slow, "pretrain.save_steps=1000", "--until", "pretrain")
    assert last_run(tmp_path)["pretrain"] == "resumed"
    assert read_stage_json(pretrain / "final")["metrics"]["train_steps"] == 400


@pytest.mark.slow
def test_two_process_pipeline_matches_the_single_process_run(finished, tmp_path):
    """Every stage under `accelerate launch` with the CPU DDP config (world size 2), the same global batches."""
    halved = [
        "pretrain.per_device_train_batch_size=4",
        "sft.per_device_train_batch_size=2",
        "reward.per_device_train_batch_size=1",
    ]
    single = tmp_path / "single"
    single.mkdir()
    rlhf(
        single,
        "run",
        *halved,
        "pretrain.gradient_accumulation_steps=2",
        "sft.gradient_accumulation_steps=2",
        "reward.gradient_accumulation_steps=2",
    )
    double = tmp_path / "double"
    double.mkdir()
    config = str(REPO / "accelerate_configs" / "cpu_ddp.yaml")
    rlhf(double, "run", *halved, "--accelerate-config", config, env=_env(ACCELERATE_USE_CPU="true"))
    one, two = finals(single), finals(double)
    assert list(two) == list(STAGES)
    for stage in ("pretrain", "sft", "reward", "ppo"):
        assert two[stage]["metrics"]["world_size"] == 2, stage
    assert one["webtext"]["metrics"]["documents_kept"] == two["webtext"]["metrics"]["documents_kept"]
    for stage, key in (("pretrain", "eval_loss"), ("sft", "eval_loss")):
        assert two[stage]["metrics"][key] == pytest.approx(one[stage]["metrics"][key], rel=2e-3), stage
