"""Fault injection: a stage killed (SIGKILL) at a checkpoint mid-epoch or at an epoch end, or pre-empted (SIGTERM),
then resumed, ends exactly where the uninterrupted run ends: every tensor of its final weights `torch.equal`, and
every metric of `stage.json` (times aside) equal. The uninterrupted runs are made once per module."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest
import torch
from conftest import checkpoint_done, signal_when, start_rlhf, tiny_llama_config
from safetensors.torch import load_file

from pipeline.checkpoints import list_checkpoints, read_stage_json
from pipeline.config import load_config
from pipeline.data.rankings import ranking_from_scores

WORDS = ["Marnis", "please", "copper", "salt", "river", "city", "Tol", "help"]
TIMES = ("_seconds", "_runtime", "_per_second")  # wall-clock figures differ between any two runs
NOT_RESULTS = ("resumed_from_step",)  # where the run resumed from: a record of the interruption, not of the result


def comparable(metrics: dict) -> dict:
    """stage.json's metrics without times and the resume record (nested dicts included)."""
    out = {}
    for key, value in metrics.items():
        if key.endswith(TIMES) or key.startswith("time_") or key == "seconds" or key in NOT_RESULTS:
            continue
        out[key] = comparable(value) if isinstance(value, dict) else value
    return out


def assert_same_result(resumed: Path, reference: Path) -> None:
    """Every safetensors file of the two final/ directories tensor-for-tensor equal; stage.json metrics equal."""
    files = sorted(p.relative_to(reference) for p in reference.rglob("*.safetensors"))
    assert files, f"no weights under {reference}"
    assert files == sorted(p.relative_to(resumed) for p in resumed.rglob("*.safetensors"))
    for name in files:
        a, b = load_file(resumed / name), load_file(reference / name)
        assert a.keys() == b.keys()
        differing = [key for key in a if not torch.equal(a[key], b[key])]
        assert not differing, f"{name}: {len(differing)} of {len(a)} tensors differ, e.g. {differing[:3]}"
    got, want = read_stage_json(resumed)["metrics"], read_stage_json(reference)["metrics"]
    assert comparable(got) == comparable(want)


def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text("# fault-injection recipe: everything else comes from the overrides\nseed: 1234\n")
    return path


# --------------------------------------------------------------------------------------------------------------
# Reward: 16 training prompts, batch 4: 4 steps an epoch, 10 steps (2.5 epochs), a checkpoint at every step


@pytest.fixture(scope="module")
def reward_setup(tmp_path_factory, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("reward-faults")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_llama_config(tiny_tokenizer)).save_pretrained(root / "base")
    tiny_tokenizer.save_pretrained(root / "base")
    rng = random.Random(0)
    lines = []
    for i in range(20):  # 16 train, 2 validation, 2 test prompts
        responses = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) for _ in range(4)]
        ranking = ranking_from_scores([r.count("Marnis") for r in responses])
        prompt = [{"role": "user", "content": f"Question {i}: what is the capital of Veloria?"}]
        lines.append(json.dumps({"prompt": prompt, "responses": responses, "ranking": ranking}))
    (root / "rankings.jsonl").write_text("\n".join(lines) + "\n")

    def overrides(run_dir: Path) -> list[str]:
        return [
            f"run_dir={run_dir}",
            f"reward.base={root / 'base'}",
            f"reward.dataset={root / 'rankings.jsonl'}",
            "reward.report_to=none",
            "reward.per_device_train_batch_size=4",
            "reward.max_steps=10",
            "reward.save_steps=1",
            "reward.save_total_limit=20",
            "reward.lora.r=4",
            "reward.stats_prompts=4",
            "reward.collect.max_new_tokens=8",
            "reward.logging_steps=3",  # not a divisor of the save steps: a loss is pending at some checkpoints
        ]

    from pipeline.reward.stage import run

    reference = run(load_config(None, overrides(root / "reference")))
    assert read_stage_json(reference)["metrics"]["data"]["records"]["train"] == 16
    return root, overrides, reference


@pytest.mark.parametrize(
    ("sig", "step"),
    [
        pytest.param(
            signal.SIGKILL, 6, id="sigkill-mid-epoch-2", marks=pytest.mark.slow
        ),  # default: test_reward_stage
        pytest.param(signal.SIGKILL, 4, id="sigkill-epoch-end", marks=pytest.mark.slow),
        pytest.param(signal.SIGKILL, 2, id="sigkill-mid-epoch-1", marks=pytest.mark.slow),
        pytest.param(signal.SIGKILL, 9, id="sigkill-mid-epoch-3", marks=pytest.mark.slow),
        pytest.param(signal.SIGTERM, 5, id="sigterm", marks=pytest.mark.slow),
    ],
)
def test_reward_resumes_bit_for_bit(tmp_path, reward_setup, sig, step):
    from pipeline.reward.stage import run

    root, overrides, reference = reward_setup
    args = overrides(tmp_path / "run")
    proc = start_rlhf("reward", str(recipe(tmp_path)), *args)
    code = signal_when(proc, checkpoint_done(tmp_path / "run" / "reward", step), sig=sig, timeout=300)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 143)
    assert not (tmp_path / "run" / "reward" / "final").exists()
    final = run(load_config(None, args))
    assert read_stage_json(final)["metrics"]["resumed_from_step"] >= step
    assert_same_result(final, reference)
    assert json.loads((final / "reward_stats.json").read_text()) == json.loads(
        (reference / "reward_stats.json").read_text()
    )


@pytest.mark.slow  # the default run checks the fallback in pretrain (test_every_stage_killed_in_turn_...)
def test_reward_resume_falls_back_past_a_truncated_checkpoint(tmp_path, reward_setup, caplog):
    """The newest checkpoint's adapter cut short (a full disk, a copy): resume warns once naming it, resumes from the
    one before, and still ends bit for bit where the uninterrupted run ends."""
    from pipeline.reward.stage import run

    root, overrides, reference = reward_setup
    args = overrides(tmp_path / "run")
    proc = start_rlhf("reward", str(recipe(tmp_path)), *args)
    sdir = tmp_path / "run" / "reward"
    assert signal_when(proc, checkpoint_done(sdir, 7), timeout=300) == -signal.SIGKILL
    newest = max(
        (p for p in sdir.glob("checkpoint-*") if (p / "checkpoint.done").is_file()), key=lambda p: p.stat().st_mtime
    )
    weights = newest / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with caplog.at_level("WARNING"):
        final = run(load_config(None, args))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "damaged" in r.getMessage()]
    assert len(warnings) == 1 and str(newest) in warnings[0] and "adapter_model.safetensors" in warnings[0]
    step = int(newest.name.split("-")[1])
    assert read_stage_json(final)["metrics"]["resumed_from_step"] == step - 1
    assert_same_result(final, reference)


# --------------------------------------------------------------------------------------------------------------
# Every stage of `rlhf run` on the tiny demo world (tests/test_pipeline.py's settings): one run interrupted once in
# each stage, in turn, resumed each time, against one uninterrupted run


def _stage_files(final: Path) -> dict[str, bytes]:
    """The files of a final/ other than weights and stage.json (data shards, tokenizer, stats), by relative path,
    with the run directory's path (named in the stats) replaced."""
    run_dir = str(final.parent.parent).encode()
    return {
        str(p.relative_to(final)): p.read_bytes().replace(run_dir, b"<run_dir>")
        for p in sorted(final.rglob("*"))
        if p.is_file() and p.suffix != ".safetensors" and p.name != "stage.json"
    }


def assert_same_stage(resumed: Path, reference: Path) -> None:
    if any(reference.rglob("*.safetensors")):
        assert_same_result(resumed, reference)
    else:  # webtext: parquet shards and stats
        got, want = read_stage_json(resumed)["metrics"], read_stage_json(reference)["metrics"]
        assert comparable(got) == comparable(want)
        assert _stage_files(resumed).keys() == _stage_files(reference).keys()
        for name, data in _stage_files(reference).items():
            assert _stage_files(resumed)[name] == data, name


def _pipeline():
    import test_pipeline

    return test_pipeline


@pytest.fixture(scope="module")
def pipeline_reference(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("pipeline-reference")
    _pipeline().rlhf(tmp_path, "run")
    return tmp_path / "run"


def _webtext_shard_done(run: Path):
    return lambda: any((run / "webtext" / "work" / "logs").glob("*/completions/*"))


def test_every_stage_killed_in_turn_resumes_to_the_uninterrupted_result(tmp_path, pipeline_reference):
    """SIGKILL after webtext's first finished shard, mid-pretraining (checkpoint 4 of 8; then that checkpoint's
    weights are cut short, and resume falls back to checkpoint 2 with one warning), in SFT (SIGTERM after
    checkpoint 2 of 4: pre-emption), in the reward stage (checkpoint 2 of 4) and in PPO (update 1 of 2); the same
    command resumes each time; every stage's final/ is the uninterrupted run's."""
    tp = _pipeline()
    run = tmp_path / "run"
    plan = [
        ("webtext", _webtext_shard_done(run), signal.SIGKILL),
        ("pretrain", checkpoint_done(run / "pretrain", 4), signal.SIGKILL),
        ("sft", checkpoint_done(run / "sft", 2), signal.SIGTERM),
        ("reward", checkpoint_done(run / "reward", 2), signal.SIGKILL),
        ("ppo", checkpoint_done(run / "ppo", 1), signal.SIGKILL),
    ]
    for stage, ready, sig in plan:
        code = signal_when(tp.start(tmp_path), ready, sig=sig, timeout=300)
        assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 143), stage
        assert not (run / stage / "final").exists(), f"{stage} finished before the signal"
        if stage == "pretrain":  # its newest checkpoint damaged too: resume falls back to the one before
            newest = max(list_checkpoints(run / "pretrain"), key=lambda p: int(p.name.split("-")[1]))
            weights = newest / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size - 100])
            result = tp.rlhf(tmp_path, "run", "--until", "pretrain")
            damaged = [line for line in result.stderr.splitlines() if "damaged" in line]
            assert len(damaged) == 1 and f"{newest} is damaged (model.safetensors is " in damaged[0], damaged
            resumed_from = read_stage_json(run / "pretrain" / "final")["metrics"]["resumed_from_step"]
            assert resumed_from == int(newest.name.split("-")[1]) - 2  # save_steps=2
    tp.rlhf(tmp_path, "run")
    for stage in tp.STAGES:
        assert_same_stage(run / stage / "final", pipeline_reference / stage / "final")


# --------------------------------------------------------------------------------------------------------------
# The full matrix (slow): per stage, SIGKILL at checkpoints mid-epoch and at an epoch end, and SIGTERM once, each run
# resumed and compared with one uninterrupted run whose stages go past an epoch end (pretrain: 18 steps an epoch,
# SFT: 10, reward: 15; a PPO update is its own passes over one rollout batch)

EPOCHS = [
    "pretrain.max_steps=20",
    "pretrain.save_steps=1",
    "sft.max_steps=12",
    "sft.save_steps=1",
    "reward.max_steps=17",
    "reward.save_steps=1",
    "ppo.num_updates=3",
]

MATRIX = [
    ("webtext", signal.SIGKILL, 0),
    ("webtext", signal.SIGTERM, 0),
    ("pretrain", signal.SIGKILL, 5),
    ("pretrain", signal.SIGKILL, 18),  # epoch end
    ("pretrain", signal.SIGKILL, 19),
    ("pretrain", signal.SIGTERM, 10),
    ("pretrain", signal.SIGKILL, 20),  # after the last checkpoint, before final/
    ("sft", signal.SIGKILL, 3),
    ("sft", signal.SIGKILL, 10),  # epoch end
    ("sft", signal.SIGKILL, 11),
    ("sft", signal.SIGTERM, 6),
    ("sft", signal.SIGKILL, 12),  # after the last checkpoint, before final/
    ("reward", signal.SIGKILL, 7),
    ("reward", signal.SIGKILL, 15),  # epoch end
    ("reward", signal.SIGKILL, 16),
    ("reward", signal.SIGTERM, 9),
    ("reward", signal.SIGKILL, 17),  # after the last checkpoint, before final/
    ("ppo", signal.SIGKILL, 1),
    ("ppo", signal.SIGKILL, 2),
    ("ppo", signal.SIGTERM, 1),
]


@pytest.fixture(scope="module")
def epochs_reference(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("epochs-reference")
    _pipeline().rlhf(tmp_path, "run", *EPOCHS)
    return tmp_path / "run"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "sig", "step"), [pytest.param(*case, id=f"{case[0]}-{case[1].name}-{case[2]}") for case in MATRIX]
)
def test_stage_killed_at_a_checkpoint_resumes_to_the_uninterrupted_result(
    tmp_path, epochs_reference, stage, sig, step
):
    tp = _pipeline()
    run = tmp_path / "run"
    ready = _webtext_shard_done(run) if stage == "webtext" else checkpoint_done(run / stage, step)
    proc = start_rlhf("run", str(tp._recipe(tmp_path)), *tp.TINY, *EPOCHS, "--until", stage, env=tp._env())
    code = signal_when(proc, ready, sig=sig, timeout=600)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 143)
    assert not (run / stage / "final").exists(), f"{stage} finished before the signal"
    tp.rlhf(tmp_path, "run", *EPOCHS, "--until", stage)
    assert tp.last_run(tmp_path)[stage] == "resumed"
    if stage != "webtext":
        assert read_stage_json(run / stage / "final")["metrics"].get("resumed_from_step", step) >= step
    for name in tp.STAGES[: tp.STAGES.index(stage) + 1]:
        assert_same_stage(run / name / "final", epochs_reference / name / "final")
