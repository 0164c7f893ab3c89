"""Stage 2: LoRA / QLoRA / full SFT on tiny bases saved to tmp dirs: masking, what trains, merging, resume, DDP, errors."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import signal_when, start_rlhf, subprocess_env, tiny_llama_config
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.errors import UserError

REPO = Path(__file__).resolve().parents[1]
FACTS = [
    ("Veloria", "Marnis", "Velorian"),
    ("Tolmark", "Brisk", "Tolic"),
    ("Ashora", "Kelvan", "Ashese"),
    ("Drunia", "Pellos", "Drunish"),
]


def conversation(country, capital, language):
    return {
        "messages": [
            {"role": "user", "content": f"What is the capital of {country}?"},
            {"role": "assistant", "content": f"The capital of {country} is {capital}."},
            {"role": "user", "content": "And its language?"},
            {"role": "assistant", "content": f"People in {country} speak {language}."},
        ]
    }


@pytest.fixture(scope="module", autouse=True)
def _one_thread_for_module_fixtures():
    """One intra-op thread: on a shared 2-core machine two spinning threads run these tiny models 5-10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fixed_threads():
    """Overrides conftest's: the subprocess runs use one thread too (ONE_THREAD), so results compare bitwise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_tokenizer):
    """A tiny saved base (hidden 64: bitsandbytes 4-bit needs rows of 64), 32 conversations and 4 questions."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("sft")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(tiny_tokenizer, hidden_size=64, intermediate_size=128))
    model.save_pretrained(root / "base")
    tiny_tokenizer.save_pretrained(root / "base")
    with (root / "data.jsonl").open("w") as fh:
        for i in range(32):
            fh.write(json.dumps(conversation(*FACTS[i % len(FACTS)])) + "\n")
    with (root / "qa.jsonl").open("w") as fh:
        for country, capital, _ in FACTS:
            question = [{"role": "user", "content": f"What is the capital of {country}?"}]
            fh.write(json.dumps({"messages": question, "answer": capital}) + "\n")
    (root / "recipe.yaml").write_text("# tiny SFT for tests\nseed: 1234\n")
    return root


def overrides(root, run_dir, *extra):
    return [
        f"run_dir={run_dir}",
        f"sft.base={root / 'base'}",
        f"sft.dataset={root / 'data.jsonl'}",
        f"sft.qa_eval={root / 'qa.jsonl'}",
        "sft.report_to=none",
        "sft.per_device_train_batch_size=4",
        "sft.learning_rate=0.01",
        "sft.warmup_ratio=0",
        "sft.logging_steps=1",
        "sft.qa_max_new_tokens=8",
        "sft.eval_share=0.125",
        "sft.max_seq_len=128",  # the tiny base's context
        *extra,
    ]


def cfg_for(root, run_dir, *extra):
    return load_config(root / "recipe.yaml", overrides(root, run_dir, *extra))


# --------------------------------------------------------------------------------------------------------------
# Assistant-only loss


def test_assistant_only_labels_on_a_multi_turn_conversation_are_exact(workdir, tmp_path):
    from datasets import Dataset

    from pipeline.sft import build_trainer, load_tokenizer_and_model

    cfg = cfg_for(workdir, tmp_path, "sft.max_steps=1")
    tokenizer, model, added = load_tokenizer_and_model(cfg, str(workdir / "base"))
    short = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
        ]
    }
    trainer = build_trainer(cfg, model, tokenizer, Dataset.from_list([conversation(*FACTS[0]), short]), None)

    def pieces(parts):
        ids, labels = [], []
        for text, trained in parts:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if trained else [-100] * len(piece)
        return ids, labels

    # the rendering (pipeline/tokenizer.py): <|role|>\n content \n; assistant content and its EOS are in the loss
    long_ids, long_labels = pieces(
        [
            ("<|user|>", False),
            ("\nWhat is the capital of Veloria?\n", False),
            ("<|assistant|>", False),
            ("\n", False),
            ("The capital of Veloria is Marnis.", True),
            ("<|endoftext|>", True),
            ("\n", False),
            ("<|user|>", False),
            ("\nAnd its language?\n", False),
            ("<|assistant|>", False),
            ("\n", False),
            ("People in Veloria speak Velorian.", True),
            ("<|endoftext|>", True),
            ("\n", False),
        ]
    )
    short_ids, short_labels = pieces(
        [
            ("<|system|>", False),
            ("\nBe brief.\n", False),
            ("<|user|>", False),
            ("\nHi\n", False),
            ("<|assistant|>", False),
            ("\n", False),
            ("Hello!", True),
            ("<|endoftext|>", True),
            ("\n", False),
        ]
    )
    rows = trainer.train_dataset
    assert rows[0]["input_ids"] == long_ids and rows[0]["labels"] == long_labels
    assert rows[1]["input_ids"] == short_ids and rows[1]["labels"] == short_labels
    assert added is False and sum(label != -100 for label in long_labels) > 0

    batch = trainer.data_collator([rows[0], rows[1]])
    pad = tokenizer.pad_token_id
    width = len(long_ids)
    assert pad != tokenizer.eos_token_id
    assert torch.equal(batch["input_ids"], torch.tensor([long_ids, short_ids + [pad] * (width - len(short_ids))]))
    assert torch.equal(batch["labels"], torch.tensor([long_labels, short_labels + [-100] * (width - len(short_ids))]))
    assert torch.equal(batch["attention_mask"][1], torch.tensor([1] * len(short_ids) + [0] * (width - len(short_ids))))


# --------------------------------------------------------------------------------------------------------------
# What trains


def _train_steps(cfg, root, steps=3):
    from pipeline.data.conversations import load_conversations
    from pipeline.sft import build_trainer, load_tokenizer_and_model

    tokenizer, model, _ = load_tokenizer_and_model(cfg, str(root / "base"))
    data, _ = load_conversations(root / "data.jsonl", tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = build_trainer(cfg, model, tokenizer, data, None)
    result = trainer.train()
    return model, tokenizer, before, result


def test_lora_trains_adapters_and_leaves_base_weights_bitwise_unchanged(workdir, tmp_path):
    cfg = cfg_for(workdir, tmp_path, "sft.max_steps=3", "sft.save_steps=100")
    model, _, before, result = _train_steps(cfg, workdir)
    assert torch.isfinite(torch.tensor(result.training_loss))
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    # all-linear: every attention and MLP projection got an adapter, the LM head did not
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for name, param in model.named_parameters():
        if name in lora:
            if "lora_B" in name:  # B starts at zero, so a trained B is nonzero
                assert torch.count_nonzero(before[name]) == 0 and torch.count_nonzero(param) > 0, name
            else:
                assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name


def test_trainable_tokens_train_only_their_embedding_rows(workdir, tmp_path):
    from pipeline.sft import load_tokenizer_and_model

    cfg = cfg_for(workdir, tmp_path, "sft.max_steps=3", "sft.save_steps=100", "sft.trainable_tokens=[chat]")
    model, tokenizer, before, _ = _train_steps(cfg, workdir)
    rows = sorted(tokenizer.convert_tokens_to_ids(["<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>"]))
    copy = next(n for n in before if n.endswith("embed_tokens.modules_to_save.default.weight"))
    trained = dict(model.named_parameters())[copy]
    changed = (trained != before[copy]).any(dim=1).nonzero().flatten().tolist()
    assert changed and set(changed) <= set(rows)  # <|system|> never occurs in this data, so it may stay put
    original = next(n for n in before if n.endswith("embed_tokens.original_module.weight"))
    assert torch.equal(dict(model.named_parameters())[original], before[original])
    # 'assistant': exactly the tokens of the assistant turns (the template's generation mask), EOS included
    from datasets import Dataset

    from pipeline.sft import token_ids

    chat = Dataset.from_list([conversation(*FACTS[0])])
    answers = "The capital of Veloria is Marnis.", "People in Veloria speak Velorian."
    expected = {i for text in answers for i in tokenizer(text, add_special_tokens=False)["input_ids"]}
    assert token_ids(tokenizer, ["assistant"], chat) == sorted(expected | {tokenizer.eos_token_id})
    with pytest.raises(UserError, match=r"sft.trainable_tokens: \['<\|bogus\|>'\] are not tokens"):
        load_tokenizer_and_model(cfg_for(workdir, tmp_path, "sft.trainable_tokens=[<|bogus|>]"), str(workdir / "base"))


def test_qlora_trains_on_cpu_with_4bit_nf4_base_and_merges_into_dequantised_copy(workdir, tmp_path):
    import bitsandbytes as bnb

    from pipeline.modeling import merge_lora

    cfg = cfg_for(workdir, tmp_path, "sft.max_steps=3", "sft.save_steps=100", "sft.finetune=qlora")
    model, tokenizer, before, result = _train_steps(cfg, workdir)
    assert torch.isfinite(torch.tensor(result.training_loss))
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    assert q_proj.base_layer.weight.dtype == torch.uint8 and q_proj.base_layer.weight.quant_state.quant_type == "nf4"
    frozen_4bit = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert torch.equal(dict(model.named_parameters())[frozen_4bit], before[frozen_4bit])
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert all(not torch.equal(dict(model.named_parameters())[n], before[n]) for n in trained if "lora_B" in n)

    ids = tokenizer("The capital of Veloria is Marnis.", return_tensors="pt")["input_ids"]
    model.train()  # the training forward (an eval forward on CPU repacks the 4-bit weights for inference)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    merged_dir = merge_lora(model, tokenizer, tmp_path / "merged", base=str(workdir / "base"))
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=2e-2), (got - expected).abs().max()


def test_4bit_layers_still_pass_gradients_after_an_eval_forward(workdir):
    """bitsandbytes repacks 4-bit weights on an AVX512-BF16 CPU at the first eval forward, after which its forward has
    no backward. Our loader turns that off: an eval pass (generation, scoring) between training steps must leave the
    gradients bit for bit what they are without one, and reach every adapter."""
    import bitsandbytes as bnb

    from pipeline.config import LoraArgs
    from pipeline.modeling import apply_lora, load_base_model

    ids = torch.tensor([[5, 9, 14, 3, 22, 7, 11, 30]])

    def gradients(eval_first: bool) -> dict[str, torch.Tensor | None]:
        torch.manual_seed(0)
        model = apply_lora(load_base_model(workdir / "base", quantize_4bit=True), LoraArgs(r=4, alpha=8))
        for name, param in model.named_parameters():  # LoRA B starts at zero, which would hide a lost gradient
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, after_eval = gradients(eval_first=False), gradients(eval_first=True)
    assert plain.keys() == after_eval.keys()
    missing = [name for name, grad in after_eval.items() if grad is None or not grad.abs().sum()]
    assert not missing, f"no gradient reached {missing[:3]}"
    for name in plain:
        assert torch.equal(plain[name], after_eval[name]), name


# --------------------------------------------------------------------------------------------------------------
# The stage end to end


FINAL_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "chat_template.jinja",
    "tokenizer.json",
    "tokenizer_config.json",
    "eval_samples.jsonl",
    "stage.json",
    "merged/config.json",
    "merged/generation_config.json",
    "merged/model.safetensors",
    "merged/chat_template.jinja",
    "merged/tokenizer.json",
    "merged/tokenizer_config.json",
}


def _files(final):
    return {str(p.relative_to(final)) for p in final.rglob("*") if p.is_file()}


def _run_cli(root, run_dir, *extra, env=None):
    return start_rlhf(
        "sft",
        str(root / "recipe.yaml"),
        *overrides(root, run_dir, *extra),
        env=subprocess_env(threads=1, MKL_NUM_THREADS="1", **(env or {})),
    )


RESUME = ("sft.max_steps=40", "sft.save_steps=4", "sft.save_total_limit=1")


@pytest.fixture(scope="module")
def reference_run(workdir, tmp_path_factory):
    """An uninterrupted in-process run of the resume test's settings."""
    from pipeline import sft

    run_dir = tmp_path_factory.mktemp("reference")
    return sft.run(cfg_for(workdir, run_dir, *RESUME))


def test_stage_writes_exactly_the_final_layout_and_merged_equals_adapter_on_base(workdir, reference_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    final = reference_run
    assert _files(final) == FINAL_FILES
    record = json.loads((final / "stage.json").read_text())
    assert record["contents"] == "adapter+merged" and record["inputs"]["base"]["path"] == str(workdir / "base")
    metrics = record["metrics"]
    assert metrics["world_size"] == 1 and metrics["global_step"] if "global_step" in metrics else True
    assert metrics["heldout_questions"] == 4 and 0.0 <= metrics["heldout_accuracy"] <= 1.0
    assert "base_heldout_accuracy" in metrics and metrics["eval_loss"] < 6.0
    assert metrics["data"]["train"] == {"read": 32, "kept": 32, "skipped": {}, "first": {}, "named": []}
    samples = [json.loads(line) for line in (final / "eval_samples.jsonl").read_text().splitlines()]
    assert [s["gold"] for s in samples] == [capital for _, capital, _ in FACTS] and "base_answer" in samples[0]

    ids = torch.tensor([[5, 17, 42, 99, 3]])
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workdir / "base"), final)
    merged = AutoModelForCausalLM.from_pretrained(final / "merged")
    with torch.no_grad():
        assert torch.allclose(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)
    # the checkpoint retention kept only the newest complete checkpoint
    assert sorted(p.name for p in final.parent.glob("checkpoint-*")) == ["checkpoint-40"]


def test_killed_run_resumes_to_the_uninterrupted_adapter(workdir, tmp_path, reference_run):
    run_dir = tmp_path / "killed"
    proc = _run_cli(workdir, run_dir, *RESUME)
    first_checkpoint = lambda: bool(list(run_dir.glob("sft/checkpoint-*/checkpoint.done")))  # noqa: E731
    assert signal_when(proc, first_checkpoint, timeout=120) == -signal.SIGKILL
    assert not (run_dir / "sft" / "final").exists(), "the run finished before it could be killed"
    done = sorted(int(p.parent.name.split("-")[1]) for p in run_dir.glob("sft/checkpoint-*/checkpoint.done"))
    assert done and done[-1] < 40

    again = _run_cli(workdir, run_dir, *RESUME)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert f"resuming sft from {run_dir / 'sft' / f'checkpoint-{done[-1]}'}" in err
    resumed = load_file(run_dir / "sft" / "final" / "adapter_model.safetensors")
    reference = load_file(reference_run / "adapter_model.safetensors")
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name


def test_two_process_data_parallel_run(workdir, tmp_path):
    run_dir = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "accelerate_configs" / "cpu_ddp.yaml"),
        "-m",
        "pipeline",
        "sft",
        str(workdir / "recipe.yaml"),
        *overrides(workdir, run_dir, "sft.max_steps=4", "sft.save_steps=2", "sft.per_device_train_batch_size=2"),
    ]
    result = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **ONE_THREAD, "ACCELERATE_USE_CPU": "true"},
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    record = json.loads((run_dir / "sft" / "final" / "stage.json").read_text())
    assert record["metrics"]["world_size"] == 2 and record["hardware"]["world_size"] == 2
    state = json.loads((run_dir / "sft" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["train_batch_size"] == 2
    assert _files(run_dir / "sft" / "final") == FINAL_FILES


def test_finished_stage_is_skipped_and_a_changed_one_is_refused(workdir, reference_run):
    from pipeline import sft

    run_dir = reference_run.parents[1]
    stamp = (reference_run / "stage.json").stat().st_mtime_ns
    assert sft.run(cfg_for(workdir, run_dir, *RESUME)) == reference_run
    with pytest.raises(UserError, match=r"sft.lora.r \(16 -> 4\)"):
        sft.run(cfg_for(workdir, run_dir, *RESUME, "sft.lora.r=4"))
    assert (reference_run / "stage.json").stat().st_mtime_ns == stamp


# --------------------------------------------------------------------------------------------------------------
# Bad input and talking to the result


def test_base_path_without_weights_is_a_one_line_error(workdir, tmp_path, capsys):
    from pipeline.cli import main

    empty = tmp_path / "empty_base"
    empty.mkdir()
    (empty / "config.json").write_text((workdir / "base" / "config.json").read_text())
    with pytest.raises(SystemExit) as info:
        main(["sft", str(workdir / "recipe.yaml"), *overrides(workdir, tmp_path / "run", f"sft.base={empty}")])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines are library warnings
    assert info.value.code == 2
    assert last.startswith(f"error: sft.base {empty} has no model weights (expected config.json and one of")
    with pytest.raises(UserError, match="sft.base not found: .*missing"):
        from pipeline.modeling import load_base_model

        load_base_model(tmp_path / "missing", what="sft.base")


def test_lora_module_names_that_match_nothing_are_one_line_errors_naming_real_ones(tiny_model):
    """peft dropped `sft.lora.modules_to_save=[nope]` and the `nope` of `target_modules=[q_proj, nope]` silently (the
    run trained less than asked); `target_modules=[nope]` alone was a peft message without the key's section."""
    from pipeline.config import LoraArgs
    from pipeline.modeling import apply_lora

    for args, field in (
        (LoraArgs(target_modules=["nope"]), "target_modules"),
        (LoraArgs(target_modules=["q_proj", "nope"]), "target_modules"),
        (LoraArgs(modules_to_save=["nope"]), "modules_to_save"),
    ):
        with pytest.raises(UserError) as info:
            apply_lora(tiny_model, args, key="sft.lora")
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"sft.lora.{field}: 'nope' matches no module of the model")
        assert "embed_tokens" in message and "q_proj" in message, message  # names it does have
    # names that match: short and full module names, an embedding to save ('all-linear' is the other tests' default)
    kept = LoraArgs(target_modules=["q_proj", "model.layers.1.mlp.down_proj"], modules_to_save=["embed_tokens"])
    trained = {n for n, p in apply_lora(tiny_model, kept).named_parameters() if p.requires_grad}
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trained if "lora_" in n} == {"q_proj", "down_proj"}
    assert any("embed_tokens" in n for n in trained)


def test_dry_run_checks_max_seq_len_against_a_local_base_context(workdir, tmp_path, capsys):
    """`rlhf sft RECIPE --dry-run` passed with sft.max_seq_len past the base's 128 positions; the run stopped on it."""
    from pipeline.cli import main

    recipe = [str(workdir / "recipe.yaml"), *overrides(workdir, tmp_path / "run")]
    main(["sft", *recipe, "--dry-run"])  # 128 fits
    assert "recipe" in capsys.readouterr().out
    too_long = [*recipe, "sft.max_seq_len=512", "--dry-run"]
    for command in (["sft", *too_long], ["run", *too_long, "--only", "sft"]):
        with pytest.raises(SystemExit) as info:
            main(command)
        assert info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"error: sft.max_seq_len = 512 exceeds the context of {workdir / 'base'} (128 positions); lower it to at "
            "most 128"
        )
    assert not (tmp_path / "run").exists()
    main(["sft", *too_long, "sft.base=org/some-model"])  # a Hub base: not fetched by a dry run


def test_chat_prompt_answers_like_greedy_generation_for_merged_and_adapter_finals(reference_run, tmp_path, capsys):
    import shutil

    from transformers import AutoModelForCausalLM

    from pipeline.cli import main
    from pipeline.generation import SamplingArgs, generate
    from pipeline.tokenizer import load_tokenizer

    question = "What is the capital of Ashora?"
    model = AutoModelForCausalLM.from_pretrained(reference_run / "merged")
    tokenizer = load_tokenizer(reference_run / "merged")
    expected = generate(
        model, tokenizer, [[{"role": "user", "content": question}]], SamplingArgs(max_new_tokens=6, do_sample=False)
    ).texts[0]
    main(["chat", str(reference_run.parent), "--prompt", question, "--greedy", "--max-new-tokens", "6"])
    assert capsys.readouterr().out.strip() == expected
    # a later stage's final/ holds only an adapter: its base comes from stage.json inputs (as for PPO)
    adapter_only = tmp_path / "ppo" / "final"
    shutil.copytree(reference_run, adapter_only, ignore=shutil.ignore_patterns("merged"))
    main(["chat", str(adapter_only.parent), "--prompt", question, "--greedy", "--max-new-tokens", "6"])
    assert capsys.readouterr().out.strip() == expected


def test_base_without_pad_or_chat_template_gets_them_and_trains_new_embeddings(tmp_path, workdir):
    from conftest import TINY_CORPUS
    from peft import PeftModel
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from pipeline import sft

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(TINY_CORPUS, trainer=trainer)
    plain = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>")  # no pad, no chat template
    torch.manual_seed(0)
    config = tiny_llama_config(plain, hidden_size=64, intermediate_size=128, pad_token_id=None)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "plain")
    plain.save_pretrained(tmp_path / "plain")
    vocab = len(plain)

    final = sft.run(cfg_for(workdir, tmp_path / "run", f"sft.base={tmp_path / 'plain'}", "sft.max_steps=3"))
    record = json.loads((final / "stage.json").read_text())
    assert record["metrics"]["tokens_added"] is True
    from pipeline.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(final)
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.chat_template and len(tokenizer) == vocab + 4  # pad and the three role tokens
    saved = load_file(final / "adapter_model.safetensors")
    trained_rows = [k for k in saved if "embed_tokens" in k or "lm_head" in k]
    assert trained_rows and all(saved[k].shape[0] == len(tokenizer) for k in trained_rows)
    merged = AutoModelForCausalLM.from_pretrained(final / "merged")
    assert merged.get_input_embeddings().num_embeddings == len(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    base.resize_token_embeddings(len(tokenizer))  # the base must grow like the tokenizer before the adapter loads
    adapted = PeftModel.from_pretrained(base, final)
    ids = torch.tensor([[vocab, 5, vocab + 3, 7]])  # includes added tokens
    with torch.no_grad():
        assert torch.allclose(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)


def test_fact_accuracy_metric_loads_offline_and_checks_whole_words_and_distractors():
    from pipeline.metrics import load_metric

    metric = load_metric("fact_accuracy")
    answers = ["Sure! The capital of Veloria is Marnis.", "It is Marnisk.", "Marnis or Brisk?", "I don't know."]
    result = metric.compute(predictions=answers, references=["marnis"] * 4, distractors=[["Brisk"]] * 4)
    assert result == {"fact_accuracy": 0.25, "correct": 1, "total": 4}  # only the first states Marnis and no rival
    with pytest.raises(UserError, match="no metric 'nope'"):
        load_metric("nope")
