"""The reward stage end to end on a tiny base: collation, a run with its outputs, resume after SIGKILL, 2-process DDP,
ranking tasks for people, and bad records."""

import csv
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import checkpoint_done, save_tiny_base, signal_when, start_rlhf, subprocess_env, tiny_llama_config
from safetensors.torch import load_file

from pipeline.checkpoints import read_stage_json
from pipeline.config import load_config
from pipeline.data.rankings import Ranking, ranking_from_scores
from pipeline.errors import UserError
from pipeline.reward.data import RankingCollator, read_split, split_by_prompt
from pipeline.reward.stage import run

REPO = Path(__file__).resolve().parents[1]
WORDS = ["Marnis", "please", "copper", "salt", "river", "city", "Tol", "help"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tiny_tokenizer):
    """A tiny causal LM with the project's tokenizer, saved like the SFT stage's merged/."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_llama_config(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def write_rankings(path: Path, n: int = 40, bad: bool = True) -> Path:
    """K=4 responses per prompt, ranked by how often they say "Marnis" (equal counts are ties), and two bad records."""
    rng = random.Random(0)
    lines = []
    for i in range(n):
        responses = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) for _ in range(4)]
        ranking = ranking_from_scores([r.count("Marnis") for r in responses])
        prompt = [{"role": "user", "content": f"Question {i}: what is the capital of Veloria?"}]
        lines.append(json.dumps({"prompt": prompt, "responses": responses, "ranking": ranking}))
    if bad:
        lines.insert(3, json.dumps({"prompt": "p", "responses": ["a", "b", "c"], "ranking": "A > B > A"}))
        lines.insert(7, json.dumps({"prompt": "p", "responses": ["only one"], "ranking": "A"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def overrides(tmp_path: Path, base: Path, dataset: Path | str, *extra: str) -> list[str]:
    return [
        f"run_dir={tmp_path / 'run'}",
        f"reward.base={base}",
        f"reward.dataset={dataset}",
        "reward.report_to=none",
        "reward.per_device_train_batch_size=4",
        "reward.max_steps=6",
        "reward.save_steps=2",
        "reward.lora.r=4",
        "reward.stats_prompts=4",
        "reward.collect.max_new_tokens=8",
        "reward.logging_steps=1",
        *extra,
    ]


# --------------------------------------------------------------------------------------------------------------
# Batches


def test_collator_batches_whole_prompts_with_exact_tensors():
    features = [
        {"input_ids": [[5, 6, 7], [8], [9, 10]], "tiers": [1, 0, 1], "margin": 0.5},
        {"input_ids": [[11, 12], [13, 14, 15, 16]], "tiers": [0, 1], "margin": 0.0},
    ]
    batch = RankingCollator(pad_token_id=0)(features)
    assert torch.equal(
        batch["input_ids"],
        torch.tensor([[5, 6, 7, 0], [8, 0, 0, 0], [9, 10, 0, 0], [11, 12, 0, 0], [13, 14, 15, 16]]),
    )
    assert torch.equal(
        batch["attention_mask"],
        torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]),
    )
    assert torch.equal(batch["tiers"], torch.tensor([[1, 0, 1], [0, 1, -1]]))
    assert torch.equal(batch["margin"], torch.tensor([0.5, 0.0]))


def test_splits_keep_every_ranking_of_a_prompt_together():
    records = [Ranking(f"prompt {i % 10}", ["a", "b"], "A > B", id=str(i)) for i in range(30)]
    splits = split_by_prompt(records, 0.1, 0.2, seed=1)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [21, 3, 6]
    prompts = {s: {r.prompt for r in rows} for s, rows in splits.items()}
    assert not (prompts["train"] & prompts["test"]) and not (prompts["validation"] & prompts["test"])


# --------------------------------------------------------------------------------------------------------------
# The stage


def test_stage_trains_saves_and_skips_a_finished_run(tmp_path, tiny_base):
    from pipeline.metrics import load_metric
    from pipeline.modeling import load_reward_model
    from pipeline.reward.data import read_split
    from pipeline.reward.evaluation import pairwise_accuracy, score_rankings

    cfg = load_config(None, overrides(tmp_path, tiny_base, write_rankings(tmp_path / "rankings.jsonl")))
    final = run(cfg)
    assert final == tmp_path / "run" / "reward" / "final"
    assert sorted(p.name for p in final.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "chat_template.jinja",
        "eval.json",
        "reward_stats.json",
        "stage.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    stage = read_stage_json(final)
    metrics = stage["metrics"]
    assert stage["contents"] == "adapter" and stage["inputs"]["base"]["path"] == str(tiny_base)
    assert metrics["train_steps"] == 6 and metrics["world_size"] == 1 and math_finite(metrics["train_loss"])
    # the two bad records were skipped and counted; the 40 good prompts split 32 / 4 / 4
    assert metrics["data"]["skipped"]["skipped"] == {"repeated label": 1, "fewer than two responses": 1}
    assert metrics["data"]["records"] == {"train": 32, "validation": 4, "test": 4}
    test = metrics["test"]["all"]
    for key in ("accuracy", "judgement_accuracy", "judgement_tie_f1", "kendall_tau", "reward_std"):
        assert math_finite(test[key])
    assert 0.0 <= test["accuracy"] <= 1.0 and test["pairs"] == metrics["data"]["pairs"]["test"]
    assert set(test["baselines"]) == {"length", "keyword"}

    # the adapter holds the trained score head; the LoRA B matrices moved away from their zero init
    adapter = load_file(final / "adapter_model.safetensors")
    assert any("score" in name for name in adapter)
    assert any("lora_B" in name and tensor.abs().sum() > 0 for name, tensor in adapter.items())

    # reloading the saved model reproduces the held-out accuracy; the base weights were left alone
    model, tokenizer = load_reward_model(final)
    test_records = read_split(cfg, "test")
    rewards = score_rankings(model, tokenizer, test_records, cfg.reward)
    again = pairwise_accuracy(test_records, rewards, load_metric("pairwise_accuracy"))
    assert again["accuracy"] == pytest.approx(test["accuracy"]) and again["pairs"] == test["pairs"]
    base_weights = load_file(tiny_base / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(
        model.get_base_model().state_dict()[name.replace(".weight", ".base_layer.weight")], base_weights[name]
    )
    stats = json.loads((final / "reward_stats.json").read_text())
    assert set(stats) == {"mean", "std"} and stats["std"] > 0

    # a second run with the same settings returns the finished stage without training
    started = time.time()
    assert run(cfg) == final and time.time() - started < 5
    assert read_stage_json(final)["finished_at"] == stage["finished_at"]


def math_finite(x) -> bool:
    return isinstance(x, (int, float)) and x == x and abs(x) != float("inf")


def _recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text("# test recipe: everything comes from the overrides\nseed: 1234\n")
    return path


def test_run_killed_with_sigkill_mid_epoch_resumes_to_the_same_result(tmp_path, tiny_base):
    """20 prompts (16 for training, batch 4: 4 steps an epoch), 8 steps; killed at checkpoint 6, mid-way through the
    second epoch, where the data order of a resumed run must come from (seed, epoch), not the process's RNG."""
    rankings = write_rankings(tmp_path / "rankings.jsonl", n=20, bad=False)
    reference = tmp_path / "reference"
    ref_final = run(load_config(None, overrides(reference, tiny_base, rankings, "reward.max_steps=8")))

    args = overrides(tmp_path, tiny_base, rankings, "reward.max_steps=8")
    proc = start_rlhf("reward", str(_recipe(tmp_path)), *args)
    assert signal_when(proc, checkpoint_done(tmp_path / "run" / "reward", 6), timeout=120) == -signal.SIGKILL
    assert not (tmp_path / "run" / "reward" / "final").exists()

    final = run(load_config(None, args))
    stage = read_stage_json(final)
    assert stage["metrics"]["data"]["records"]["train"] == 16
    assert stage["metrics"]["resumed_from_step"] >= 6 and stage["metrics"]["train_steps"] == 8
    resumed, uninterrupted = (
        load_file(final / "adapter_model.safetensors"),
        load_file(ref_final / "adapter_model.safetensors"),
    )
    assert resumed.keys() == uninterrupted.keys()
    assert [name for name in resumed if not torch.equal(resumed[name], uninterrupted[name])] == []
    reference_metrics = read_stage_json(ref_final)["metrics"]
    for key in ("test", "reward_stats", "train_loss"):
        assert stage["metrics"][key] == reference_metrics[key]


def test_two_process_data_parallel_run(tmp_path, tiny_base):
    rankings = write_rankings(tmp_path / "rankings.jsonl", bad=False)
    launcher = Path(sys.executable).parent / "accelerate"
    command = [
        str(launcher),
        "launch",
        "--config_file",
        str(REPO / "accelerate_configs" / "cpu_ddp.yaml"),
        "-m",
        "pipeline",
        "reward",
        str(_recipe(tmp_path)),
        *overrides(tmp_path, tiny_base, rankings, "reward.max_steps=-1", "reward.num_train_epochs=1"),
    ]
    result = subprocess.run(
        command,
        cwd=REPO,
        env=subprocess_env(threads=1, ACCELERATE_USE_CPU="true"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_stage_json(tmp_path / "run" / "reward" / "final")["metrics"]
    assert metrics["world_size"] == 2
    # 32 training prompts, 4 per process per step, 2 processes: one epoch is 4 steps (8 in a single process)
    assert metrics["data"]["records"]["train"] == 32 and metrics["train_steps"] == 4


def test_tasks_exported_for_people_come_back_as_training_data(tmp_path, tiny_base):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"messages": [{"role": "user", "content": f"Capital {i}?"}]}) + "\n" for i in range(6))
    )
    args = overrides(tmp_path, tiny_base, "collect", f"reward.collect.prompts={prompts}", "reward.max_steps=2")
    with pytest.raises(UserError, match="fill in its 'ranking' column") as info:
        run(load_config(None, args))
    tasks = tmp_path / "run" / "ranking_tasks.csv"
    assert str(tasks) in str(info.value)
    with tasks.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and all(row["ranking"] == "" for row in rows)
    with pytest.raises(UserError, match="already exported"):  # a file people may be filling in is never replaced
        run(load_config(None, args))
    for row in rows:
        row["ranking"] = "C > B > A = D"  # what people type in
    with tasks.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    args = overrides(tmp_path, tiny_base, tasks, "reward.max_steps=2", "reward.stats_prompts=0")
    final = run(load_config(None, args))
    assert read_stage_json(final)["metrics"]["data"]["pairs"]["train"] == 5 * 4  # 4 training prompts x 5 pairs


def _fill_in(tasks: Path, ranking: str, skip: int = 0) -> int:
    """What people do with an exported ranking-tasks CSV: type a ranking into every row but the last `skip`."""
    with tasks.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows[: len(rows) - skip]:
        row["ranking"] = ranking
    with tasks.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def test_a_second_round_exports_the_ppo_policys_responses_for_people_then_trains_on_every_comparison(
    tmp_path, tiny_base
):
    """Iterated RLHF with people: round 2 samples the round-1 PPO policy, exports ranking tasks and stops with what to
    do; once they are filled in, reward-2 trains on round 1's comparisons plus the new ones."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.checkpoints import finishing, stage_identity, write_stage_json

    rankings = write_rankings(tmp_path / "rankings.jsonl", n=20, bad=False)
    args = overrides(tmp_path, tiny_base, rankings, "rounds=2", "reward.max_steps=2", "reward.collect.max_prompts=4")
    cfg = load_config(None, args)
    first = run(cfg)
    with finishing(cfg, "ppo") as out:  # round 1's PPO policy: a LoRA adapter on the same base
        torch.manual_seed(1)
        config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), config).save_pretrained(out)
        write_stage_json(out, stage_identity(cfg, "ppo", {"base": str(tiny_base)}), {}, contents="adapter")
    with pytest.raises(UserError, match="round 2 needs rankings of the previous policy's responses") as info:
        run(cfg, round_no=2)
    tasks = tmp_path / "run" / "ranking_tasks-round2.csv"
    assert str(tasks) in str(info.value) and not (tmp_path / "run" / "reward-2" / "final").exists()
    held_out = {r.prompt_key() for name in ("validation", "test") for r in read_split(cfg, name)}
    assert _fill_in(tasks, "D > C > B = A", skip=1) == 4 + len(held_out)  # the first 4 prompts and the held-out ones
    second = run(cfg, round_no=2)
    assert second == tmp_path / "run" / "reward-2" / "final"
    record = read_stage_json(second)
    data, before = record["metrics"]["data"], read_stage_json(first)["metrics"]["data"]["records"]
    assert data["new"] == {"source": "policy-1", "records": 3 + len(held_out), "prompts": 4 + len(held_out)}
    assert sum(data["records"].values()) == sum(before.values()) + 3 + len(held_out)  # one row left blank: skipped
    assert record["inputs"]["policy"]["path"] == str(tmp_path / "run" / "ppo" / "final")
    assert record["settings"]["round"] == 2 and "policy-1" in record["metrics"]["test"]


def test_bad_record_stops_the_stage_with_one_line_when_asked(tmp_path, tiny_base):
    rankings = write_rankings(tmp_path / "rankings.jsonl")
    cfg = load_config(None, overrides(tmp_path, tiny_base, rankings, "reward.on_bad_record=error"))
    with pytest.raises(UserError) as info:
        run(cfg)
    assert str(info.value).startswith(f"{rankings}:4: repeated label: ranking 'A > B > A' names A twice")
    assert "\n" not in str(info.value)


def test_qlora_reward_model_trains_a_full_precision_head_on_a_4bit_base(tmp_path, tiny_tokenizer):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from pipeline.modeling import build_scalar_model, load_reward_model

    base = tmp_path / "base64"  # bitsandbytes 4-bit needs rows of 64
    torch.manual_seed(0)
    config = tiny_llama_config(tiny_tokenizer, hidden_size=64, intermediate_size=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    model = build_scalar_model(base, tiny_tokenizer, "qlora")
    assert isinstance(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trained) and all("lora_" in n or "score" in n for n in trained)

    rankings = write_rankings(tmp_path / "rankings.jsonl", n=12, bad=False)
    cfg = load_config(
        None,
        overrides(
            tmp_path,
            base,
            rankings,
            "reward.finetune=qlora",
            "reward.max_steps=2",
            "reward.stats_prompts=0",
            "reward.validation_share=0",
            "reward.test_share=0",
        ),
    )
    final = run(cfg)
    assert read_stage_json(final)["contents"] == "adapter"
    reloaded, _ = load_reward_model(final)  # the adapter goes on the full-precision base
    head = load_file(final / "adapter_model.safetensors")
    saved = next(t for n, t in head.items() if "score" in n)
    assert torch.equal(reloaded.score.modules_to_save["default"].weight.detach(), saved)


def test_scalar_model_on_a_causal_lm_reports_only_unexpected_weights_in_one_line(
    tmp_path, tiny_tokenizer, caplog, request
):
    """The new score head and the unused LM head are the design: no warning, and never transformers' table. A
    checkpoint that lacks a layer's weights is told in one line naming them."""
    import logging

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    from pipeline.modeling import build_scalar_model

    base = save_tiny_base(tiny_tokenizer, tmp_path / "base")
    transformers_logging.enable_propagation()  # its records reach caplog (transformers stops them by default)
    request.addfinalizer(transformers_logging.disable_propagation)
    with caplog.at_level(logging.INFO):
        build_scalar_model(base, tiny_tokenizer, finetune="full")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == []

    state = AutoModelForCausalLM.from_pretrained(base).state_dict()
    gone = sorted(k for k in state if k.startswith("model.layers.1.mlp."))
    save_file({k: v.contiguous() for k, v in state.items() if k not in gone}, str(base / "model.safetensors"))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        build_scalar_model(base, tiny_tokenizer, finetune="full")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "LOAD REPORT" not in warnings[0], warnings
    assert f"{len(gone)} weights not in the checkpoint" in warnings[0] and "layers.1.mlp.down_proj" in warnings[0]
