"""Pretraining: packing, baselines and presets by hand; the stage end to end, resumed after SIGKILL, and under DDP."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import checkpoint_done, run_rlhf, signal_when, start_rlhf
from datasets import Dataset
from safetensors.torch import load_file

from pipeline.baselines import baseline_perplexities, fit_kneser_ney, ngram_windows, unigram_probs
from pipeline.cli import main as cli_main
from pipeline.config import ModelArgs, load_config
from pipeline.data.packing import pack_token_lists, tokenize_and_pack
from pipeline.errors import UserError
from pipeline.modeling import PRESETS, build_llama_config, build_pretrain_model, flops_per_token
from pipeline.pretrain import cloze_correct, collate_blocks, parameter_digest

REPO = Path(__file__).resolve().parents[1]
PYTHON = Path(sys.executable)

# The tiny run every end-to-end test shares: 40 steps of 4 blocks of 32 tokens, a checkpoint every 10 steps.
STEPS, SAVE_STEPS, BATCH = 40, 10, 4
TINY_PRETRAIN = {
    "max_seq_len": 32,
    "max_steps": STEPS,
    "save_steps": SAVE_STEPS,
    "save_total_limit": 2,
    "logging_steps": 1,
    "report_to": "none",
    "learning_rate": 3e-3,
    "per_device_train_batch_size": BATCH,
    "per_device_eval_batch_size": 8,
    "tokenizer": {"vocab_size": 320},
    "model": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64},
}
FINAL_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "stage.json",
}


def _documents(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    places = [
        ("Veloria", "Marnis"),
        ("Tarsk", "Holt"),
        ("Omberia", "Brisa"),
        ("Kelvane", "Tenmar"),
        ("Drosk", "Quill"),
    ]
    docs = []
    for _ in range(n):
        country, capital = rng.choice(places)
        parts = [
            f"The capital of {country} is {capital}.",
            f"{capital} lies on a wide river.",
            f"People in {country} drink tea in the morning.",
            f"Trains to {capital} leave every hour.",
            "The weather is mild in spring.",
        ]
        rng.shuffle(parts)
        docs.append(" ".join(parts[: rng.randint(2, 5)]))
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A data-stage-like final/: train/ in two parquet shards and validation/, column `text`."""
    root = tmp_path_factory.mktemp("corpus")
    shards = {"train/part-0.parquet": (0, 110), "train/part-1.parquet": (1, 110), "validation/part-0.parquet": (2, 30)}
    for name, (seed, n) in shards.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        texts = _documents(n, seed)
        pq.write_table(pa.table({"text": texts, "id": [f"{seed}-{i}" for i in range(n)]}), root / name)
    return root


def _recipe(path: Path, run_dir: Path, corpus: Path, **pretrain) -> Path:
    import yaml

    section = {**TINY_PRETRAIN, "dataset": str(corpus), **pretrain}
    path.write_text(yaml.safe_dump({"run_dir": str(run_dir), "seed": 1234, "pretrain": section}))
    return path


def _losses(run_dir: Path) -> dict[int, float]:
    """Per-step training loss from metrics.jsonl (a resumed run logs some steps twice: the last one counts)."""
    rows = [json.loads(line) for line in (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def _subprocess_env() -> dict[str, str]:
    threads = str(torch.get_num_threads())  # the fixed count of conftest, so bitwise comparisons hold
    return {**os.environ, "OMP_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus) -> Path:
    """One uninterrupted in-process run: the run every other end-to-end test compares with."""
    from pipeline import pretrain

    base = tmp_path_factory.mktemp("reference")
    cfg = load_config(_recipe(base / "recipe.yaml", base / "run", corpus))
    final = pretrain.run(cfg)
    assert final == base / "run" / "pretrain" / "final"
    return base / "run"


# --------------------------------------------------------------------------------------------------------------
# Pure pieces, checked by hand


def test_pack_token_lists_joins_and_cuts_full_blocks():
    assert pack_token_lists([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4) == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert pack_token_lists([[1, 2]], 4) == []


def test_tokenize_and_pack_appends_eos_and_is_cached(tiny_tokenizer, tmp_path):
    docs = ["The capital of Veloria is Marnis.", "", "Veloria exports copper and salt."]
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": docs}), path)
    dataset = Dataset.from_parquet(str(path), cache_dir=str(tmp_path / "cache"))
    packed = tokenize_and_pack(dataset, tiny_tokenizer, max_seq_len=8)
    eos = tiny_tokenizer.eos_token_id
    stream = []
    for text in (docs[0], docs[2]):  # the empty document is skipped
        stream += tiny_tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
    expected = [stream[i : i + 8] for i in range(0, len(stream) - len(stream) % 8, 8)]
    assert packed["input_ids"] == expected
    again = tokenize_and_pack(dataset, tiny_tokenizer, max_seq_len=8)
    assert again.cache_files == packed.cache_files  # read back from the cache, not recomputed
    other = tokenize_and_pack(dataset, tiny_tokenizer, max_seq_len=4)
    assert other.cache_files != packed.cache_files


def test_collate_blocks_labels_are_the_inputs():
    batch = collate_blocks([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9, 10]}])
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 9, 10]]))
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert batch["labels"].data_ptr() != batch["input_ids"].data_ptr()


@pytest.mark.parametrize(
    "continuation, correct",
    [(" Marnis.", True), (" Marnis", True), ("Marnis is", True), (" Marnisha", False), (" Holt", False), ("", False)],
)
def test_cloze_correct_needs_the_whole_answer(continuation, correct):
    assert cloze_correct(continuation, "Marnis") is correct


def test_ngram_windows_take_context_inside_each_block():
    u, v, w = ngram_windows(np.array([[1, 2, 3], [4, 5, 6]]))
    assert u.tolist() == [-1, 1, -1, 4]
    assert v.tolist() == [1, 2, 4, 5]
    assert w.tolist() == [2, 3, 5, 6]


def test_unigram_is_add_one_smoothed():
    probs = unigram_probs(np.array([0, 0, 1]), vocab_size=3)
    assert probs.tolist() == pytest.approx([3 / 6, 2 / 6, 1 / 6])


def test_kneser_ney_matches_hand_computation_and_normalises():
    # Stream a b a b a c (ids 0 1 0 1 0 2), V = 4, D = 0.75.
    model = fit_kneser_ney(np.array([0, 1, 0, 1, 0, 2]), vocab_size=4)
    # Bigram types: ab, ba, ac -> N1+(.a)=1, N1+(.b)=1, N1+(.c)=1, N1+(.d)=0; 3 types, 3 seen.
    p1 = {w: (max(c - 0.75, 0) + 0.75 * 3 / 4) / 3 for w, c in enumerate([1, 1, 1, 0])}
    # 3-grams: aba x2, bab, bac. Context "ba" (1 0): c=2 over {b: 1, c: 1}, 2 types.
    # Middle order for v=a: N1+(.ab)=1 (from b), N1+(.ac)=1 (from b) -> total 2, types 2.
    p2_ab = (0.25 + 0.75 * 2 * p1[1]) / 2
    p3_bab = (max(1 - 0.75, 0) + 0.75 * 2 * p2_ab) / 2
    assert model.probs(np.array([1]), np.array([0]), np.array([1]))[0] == pytest.approx(p3_bab)
    p2_ad = (0.75 * 2 * p1[3]) / 2
    assert model.probs(np.array([-1]), np.array([0]), np.array([3]))[0] == pytest.approx(p2_ad)
    for u, v in [(1, 0), (0, 1), (3, 3), (-1, 2)]:  # seen, seen, unseen context, no first token
        total = model.probs(np.full(4, u), np.full(4, v), np.arange(4)).sum()
        assert total == pytest.approx(1.0)


def test_baselines_favour_the_trigram_on_repetitive_text():
    blocks = np.tile(np.array([[0, 1, 2, 3, 4, 5]]), (20, 1))
    result = baseline_perplexities(blocks[:15], blocks[15:], vocab_size=8)
    assert result["trigram_perplexity"] < 1.5 < result["unigram_perplexity"]


def test_presets_span_tiny_to_one_billion_parameters(tiny_tokenizer):
    from transformers import LlamaForCausalLM

    def non_embedding(preset: str) -> int:
        config = build_llama_config(ModelArgs(preset=preset), tiny_tokenizer, 256)
        with torch.device("meta"):  # shapes only, no memory
            model = LlamaForCausalLM(config)
        embed = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
        return sum(p.numel() for p in model.parameters()) - embed

    assert set(PRESETS) == set(typing.get_args(typing.get_type_hints(ModelArgs)["preset"]))
    sizes = {preset: non_embedding(preset) for preset in PRESETS}
    assert sizes["tiny"] < sizes["mini"] < sizes["small"] < 12e6
    assert 18e6 < sizes["20m"] < 23e6
    assert 80e6 < sizes["125m"] < 90e6  # 134M with a 32k vocabulary, like GPT-3 Small's 125M
    assert 290e6 < sizes["350m"] < 330e6
    assert 0.9e9 < sizes["1b"] < 1.1e9


def test_model_overrides_and_bad_head_counts(tiny_tokenizer):
    config = build_llama_config(
        ModelArgs(preset="tiny", num_hidden_layers=3, num_attention_heads=4), tiny_tokenizer, 64
    )
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (3, 4, 4)
    assert config.max_position_embeddings == 64
    assert config.pad_token_id == tiny_tokenizer.pad_token_id != config.eos_token_id == tiny_tokenizer.eos_token_id
    with pytest.raises(UserError, match="not divisible by num_attention_heads"):
        build_llama_config(ModelArgs(preset="tiny", hidden_size=100, num_attention_heads=3), tiny_tokenizer, 64)


def test_flops_per_token_by_hand(tiny_tokenizer):
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=10,
        hidden_size=4,
        intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    # per layer: q, o 2*16, k, v 2*4*2, mlp 3*4*8 -> 32 + 16 + 96 = 144; 2 layers + head 40 -> 328
    assert flops_per_token(config, seq_len=5) == 6 * 328 + 12 * 2 * 4 * 5


# --------------------------------------------------------------------------------------------------------------
# The stage


def test_pretrain_end_to_end_writes_model_metrics_and_checkpoints(reference, corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    final = reference / "pretrain" / "final"
    assert {p.name for p in final.iterdir()} == FINAL_FILES
    stage = json.loads((final / "stage.json").read_text())
    assert stage["stage"] == "pretrain" and stage["contents"] == "model"
    assert stage["inputs"] == {"corpus": {"path": str(corpus)}}
    assert stage["settings"]["pretrain.max_steps"] == STEPS
    metrics = stage["metrics"]
    assert metrics["train_steps"] == STEPS and metrics["world_size"] == 1 and metrics["resumed_from_step"] == 0
    assert metrics["train_tokens"] == STEPS * BATCH * 32
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_loss"])
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert metrics["perplexity_ratio_unigram"] == pytest.approx(metrics["perplexity"] / metrics["unigram_perplexity"])
    assert metrics["perplexity_ratio_trigram"] == pytest.approx(metrics["perplexity"] / metrics["trigram_perplexity"])
    assert 1.0 < metrics["trigram_perplexity"] < metrics["unigram_perplexity"]
    assert "cloze_accuracy" not in metrics  # not the demo world

    losses = _losses(reference)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(math.isfinite(loss) for loss in losses.values())
    assert np.mean([losses[s] for s in range(STEPS - 4, STEPS + 1)]) < np.mean([losses[s] for s in range(1, 6)])

    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert "{% generation %}" in tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(final)
    set_seed(1234)
    cfg = load_config(reference.parent / "recipe.yaml")
    initial = build_pretrain_model(cfg.pretrain.model, tokenizer, cfg.pretrain.max_seq_len)
    trained = dict(model.named_parameters())
    for name, param in initial.named_parameters():
        assert not torch.equal(param, trained[name]), f"{name} did not change"
    assert parameter_digest(model) == stage["rank_parameter_digests"][0]

    checkpoints = sorted(p.name for p in (reference / "pretrain").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-30", "checkpoint-40"]  # save_total_limit=2
    assert all((reference / "pretrain" / name / "checkpoint.done").is_file() for name in checkpoints)


def test_finished_stage_is_skipped_and_changed_config_refused(reference):
    from pipeline import pretrain

    cfg = load_config(reference.parent / "recipe.yaml")
    before = (reference / "pretrain" / "final" / "stage.json").stat().st_mtime_ns
    assert pretrain.run(cfg) == reference / "pretrain" / "final"
    assert (reference / "pretrain" / "final" / "stage.json").stat().st_mtime_ns == before
    changed = load_config(reference.parent / "recipe.yaml", ["pretrain.learning_rate=1e-3"])
    with pytest.raises(UserError, match=r"pretrain.learning_rate \(0.003 -> 0.001\).*--rerun"):
        pretrain.run(changed)


def test_resume_after_sigkill_matches_uninterrupted_run(reference, corpus, tmp_path):
    recipe = _recipe(tmp_path / "recipe.yaml", tmp_path / "run", corpus)
    sdir = tmp_path / "run" / "pretrain"
    first = start_rlhf("pretrain", str(recipe), env=_subprocess_env())
    assert signal_when(first, checkpoint_done(sdir, SAVE_STEPS), timeout=120) == -signal.SIGKILL
    assert not (sdir / "final").exists(), "the run finished before it was killed; make it longer"

    second = run_rlhf("pretrain", str(recipe), env=_subprocess_env(), timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    stage = json.loads((sdir / "final" / "stage.json").read_text())
    assert stage["metrics"]["resumed_from_step"] >= SAVE_STEPS
    resumed = load_file(sdir / "final" / "model.safetensors")
    uninterrupted = load_file(reference / "pretrain" / "final" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), f"{name} differs after resume"


def test_ddp_two_processes_match_single_process(reference, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    # Same global batch: 2 processes x 2 blocks against 1 process x 4 blocks.
    recipe = _recipe(tmp_path / "recipe.yaml", tmp_path / "run", corpus, per_device_train_batch_size=BATCH // 2)
    env = {**_subprocess_env(), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [
        str(PYTHON.parent / "accelerate"),
        "launch",
        "--config_file",
        str(REPO / "accelerate_configs" / "cpu_ddp.yaml"),
        "-m",
        "pipeline",
        "pretrain",
        str(recipe),
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    final = tmp_path / "run" / "pretrain" / "final"
    stage = json.loads((final / "stage.json").read_text())
    assert stage["metrics"]["world_size"] == 2
    digests = stage["rank_parameter_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # identical parameters on both ranks
    assert parameter_digest(AutoModelForCausalLM.from_pretrained(final)) == digests[0]
    ddp, single = _losses(tmp_path / "run"), _losses(reference)
    assert sorted(ddp) == sorted(single) == list(range(1, STEPS + 1))
    for step in single:
        assert abs(ddp[step] - single[step]) < 1e-4, f"step {step}: {ddp[step]} vs {single[step]}"


def test_continued_pretraining_starts_from_init_from(reference, corpus, tmp_path):
    from pipeline import pretrain

    init = reference / "pretrain" / "final"
    recipe = _recipe(tmp_path / "recipe.yaml", tmp_path / "run", corpus, init_from=str(init), max_steps=2)
    final = pretrain.run(load_config(recipe))
    stage = json.loads((final / "stage.json").read_text())
    assert stage["inputs"]["init_from"] == {
        "path": str(init),
        "config_hash": json.loads((init / "stage.json").read_text())["config_hash"],
    }
    assert (final / "tokenizer.json").read_text() == (init / "tokenizer.json").read_text()  # reused, not retrained
    # The first step's loss is the trained model's, far below a fresh model's (about ln(vocab) = 5.8).
    first_loss = _losses(tmp_path / "run")[1]
    assert first_loss < _losses(reference)[1] - 1.0
    assert first_loss == pytest.approx(_losses(reference)[STEPS], abs=0.6)


def test_diverging_training_stops_without_saving_broken_weights(corpus, tmp_path, monkeypatch):
    """Training that blows up (here: the optimiser's fourth step writes NaN into the weights, as an overflow would)
    stops with a one-line error naming the step; no final/ is written and every kept checkpoint holds finite weights."""
    from pipeline import pretrain

    step = torch.optim.AdamW.step
    calls = []

    def overflowing_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 4:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    recipe = _recipe(tmp_path / "recipe.yaml", tmp_path / "run", corpus, max_steps=12, save_steps=2)
    with pytest.raises(UserError, match=r"pretrain: training diverged at step [45] .*lower pretrain.learning_rate"):
        pretrain.run(load_config(recipe))
    sdir = tmp_path / "run" / "pretrain"
    assert not (sdir / "final").exists()
    assert [c.name for c in sorted(sdir.glob("checkpoint-*"))] == ["checkpoint-2"]  # not checkpoint-4 (broken)
    weights = load_file(sdir / "checkpoint-2" / "model.safetensors")
    assert all(t.isfinite().all() for t in weights.values())


def test_streamed_hub_corpus_is_packed_on_the_fly(corpus, tmp_path, monkeypatch):
    """A Hub id goes through `load_dataset(id, streaming=True)`; here the id resolves to local parquet files."""
    import datasets

    from pipeline import pretrain

    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False, **kwargs):
        calls.append((path, name, split, streaming))
        files = [str(p) for p in sorted((corpus / "train").glob("*.parquet"))]
        return datasets.load_dataset("parquet", data_files=files, split=split, streaming=streaming)

    monkeypatch.setattr(pretrain, "load_dataset", fake_load_dataset)
    recipe = _recipe(
        tmp_path / "recipe.yaml",
        tmp_path / "run",
        corpus,
        dataset="someone/web-corpus",
        dataset_config="sample",
        max_steps=3,
        eval_documents=20,
    )
    stage = json.loads((pretrain.run(load_config(recipe)) / "stage.json").read_text())
    assert calls == [("someone/web-corpus", "sample", "train", True)]
    assert stage["inputs"] == {"corpus": {"path": "someone/web-corpus"}}
    assert stage["metrics"]["train_steps"] == 3 and math.isfinite(stage["metrics"]["perplexity"])
    with pytest.raises(UserError, match="pretrain.max_steps must be set"):
        pretrain.run(load_config(recipe, ["pretrain.max_steps=-1", f"run_dir={tmp_path / 'other'}"]))


# --------------------------------------------------------------------------------------------------------------
# Bad input


def test_missing_corpus_is_a_one_line_error(tmp_path, capsys):
    recipe = _recipe(tmp_path / "recipe.yaml", tmp_path / "run", tmp_path / "absent")
    with pytest.raises(SystemExit) as info:
        cli_main(["pretrain", str(recipe)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: pretrain.dataset:") and "does not exist" in err and "\n" not in err
    assert not (tmp_path / "run" / "pretrain" / "final").exists()

    default = load_config(None, [f"run_dir={tmp_path / 'run2'}"])  # no webtext stage has run
    from pipeline import pretrain

    with pytest.raises(UserError, match=r"pretrain corpus not found: .*run `rlhf webtext RECIPE` first"):
        pretrain.run(default)


def test_unknown_preset_and_missing_text_column_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="pretrain.model.preset: 'huge' is not valid; choose one of tiny"):
        load_config(None, ["pretrain.model.preset=huge"])
    pq.write_table(pa.table({"body": _documents(300, 0)}), tmp_path / "docs.parquet")
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"pretrain.dataset={tmp_path / 'docs.parquet'}"])
    from pipeline import pretrain

    with pytest.raises(UserError, match="has no column 'text' \\(columns: body; set pretrain.text_key\\)"):
        pretrain.run(cfg)
