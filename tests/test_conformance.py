"""Model-family conformance: each family of tests/families.py (tiny random weights, its real chat template and
special-token layout) goes SFT -> reward -> PPO -> chat -> publish --dry-run, a few steps each, and the checks of
issue 12 run on what the stages left. With CONFORMANCE_TABLE set, the family x check table is written to that
path when the module finishes (from this run's outcomes); a plain test run leaves the checkout as it was (the measured
figures move in their last digit with the thread count).

    CONFORMANCE_TABLE=benchmarks/results/conformance.md .venv/bin/python -m pytest tests/test_conformance.py -q
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import fixed_threads
from families import FAMILIES, TINY, build_family, scale_logits_past_cap

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parent.parent
TABLE = os.environ.get("CONFORMANCE_TABLE")  # e.g. benchmarks/results/conformance.md; unset: no table written
RESULTS: dict[tuple[str, str], str] = {}
FIGURES: dict[str, dict[str, float]] = {}  # family -> measured figures for the second table
CHECKS = {
    "template": "template after SFT (adapter, merged, PPO, chat) equals the original",
    "pad": "pad = an unused special token of the family (no new token but GPT-2's), never an end id",
    "bos": "one BOS where the family has one (none doubled)",
    "labels": "labels = assistant texts + end token, nothing else",
    "skips": "a record, ranking or PPO prompt the template cannot render / an over-long one: named skip / cut, counted",
    "first_update": "PPO stage's first update: KL 0, clip fraction 0, approx KL 0",
    "ratio_fp32": "rollout log-probs = training forward (fp32), logits past the cap where the family has one",
    "ratio_bf16": "the same under bf16 autocast",
    "end_ids": "generation and chat stop at each end id",
    "reward_input": "reward inputs end the way the template ends an assistant turn",
    "publish": "publish --dry-run card shows the family's template",
}

FIGURE_COLUMNS = {
    "kl": "first update KL",
    "clip_fraction": "first update clip fraction",
    "approx_kl": "first update approx KL",
    "ratio_fp32": "max abs log-ratio fp32",
    "kl_fp32": "max abs policy-ref fp32",
    "ratio_bf16": "max abs log-ratio bf16",
    "kl_bf16": "max abs policy-ref bf16",
    "uncapped_fp32": "uncapped gap fp32",
    "raw_max": "largest raw logit",
}

QUESTION, ANSWER = "What is the capital of Veloria?", "The capital is Marnis."
FOLLOW_UP, SECOND = "And its language?", "Velorian."
CONVERSATION = [
    {"role": "user", "content": QUESTION},
    {"role": "assistant", "content": ANSWER},
    {"role": "user", "content": FOLLOW_UP},
    {"role": "assistant", "content": SECOND},
]
# what each family's template puts in an assistant span besides the text, and the token that ends it
SPAN = {
    "llama3.1": ("", "", "<|eot_id|>"),
    "qwen2.5": ("", "", "<|im_end|>"),
    "qwen3": ("", "<think>\n\n</think>\n\n", "<|im_end|>"),  # the last turn gets the empty think block
    "gemma2": ("", "", "<end_of_turn>"),
    "gemma3": ("", "", "<end_of_turn>"),
    "mistral-v0.3": (" ", " ", "</s>"),
    "phi3-mini": ("", "", "<|end|>"),
    "gpt2": ("", "", "<|endoftext|>"),
}


def _record(family: str, check: str):
    """Context manager: marks the cell pass, or fail when the block raises."""

    class Cell:
        def __enter__(self):
            RESULTS[(family, check)] = "fail"

        def __exit__(self, kind, *_):
            RESULTS[(family, check)] = "pass" if kind is None else "fail"
            return False

    return Cell()


@pytest.fixture(scope="module", autouse=True)
def _write_table():
    yield
    if len(RESULTS) < len(FAMILIES) * len(CHECKS):  # a partial run (-k) leaves the last full table as it is
        return
    families = [f for f in FAMILIES if any(k[0] == f for k in RESULTS)]
    lines = [
        "# Model-family conformance (tests/test_conformance.py)",
        "",
        "Written by `CONFORMANCE_TABLE=benchmarks/results/conformance.md pytest tests/test_conformance.py` from that",
        "run's outcomes; tiny random-weight models with each family's released chat template and special tokens",
        "(tests/families.py).",
        "",
        "| family | " + " | ".join(CHECKS) + " |",
        "|---|" + "---|" * len(CHECKS),
    ]
    for family in families:
        cells = [RESULTS.get((family, c), "not run") for c in CHECKS]
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    lines += ["", "Checks:", ""] + [f"- `{k}`: {v}" for k, v in CHECKS.items()]
    columns = list(FIGURE_COLUMNS)
    lines += [
        "",
        "Measured (max over response tokens; `uncapped` is the gap a PPO forward without the family's soft-cap",
        "would have had, the failure this guards against):",
        "",
        "| family | " + " | ".join(FIGURE_COLUMNS.values()) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for family in families:
        row = FIGURES.get(family, {})
        lines.append(f"| {family} | " + " | ".join(f"{row[c]:.3g}" if c in row else "-" for c in columns) + " |")
    text = "\n".join(lines) + "\n"
    if TABLE:
        path = Path(TABLE) if Path(TABLE).is_absolute() else ROOT / TABLE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


# --------------------------------------------------------------------------------------------------------------
# Data written for the tests, with the flaws real data has


def _write_data(root: Path) -> dict[str, Path]:
    conversations = []
    for i in range(10):
        conversations.append({"messages": CONVERSATION if i % 2 else CONVERSATION[:2]})
    system = [{"role": "system", "content": "Be brief."}]
    conversations.append({"messages": system + CONVERSATION})  # Gemma 2: no system role; Mistral: system moves
    long = " ".join(["Marnis is a city on the river Tol."] * 60)
    conversations.append({"messages": [CONVERSATION[0], {"role": "assistant", "content": long}]})  # over-long
    think = "<think>\nrecall the atlas\n</think>\n\n" + ANSWER
    conversations.append({"messages": [CONVERSATION[0], {"role": "assistant", "content": think}, *CONVERSATION[2:]]})
    rankings = [
        {
            "prompt": [{"role": "user", "content": f"Question {i}: {QUESTION}"}],
            "responses": [ANSWER, "I do not know.", "Marnis, on the river Tol."],
            "ranking": "A > C > B" if i % 2 else "C > A = B",
        }
        for i in range(12)
    ]
    system = [{"role": "system", "content": "Be brief."}]  # Gemma 2's template refuses it: a named skip
    rankings.append({**rankings[0], "prompt": system + rankings[0]["prompt"]})
    prompts = [{"messages": [{"role": "user", "content": f"Question {i}: {QUESTION}"}]} for i in range(10)]
    # first: held out or not, it is read (evaluation keeps the first ppo.eval_max_prompts of its prompts)
    prompts.insert(0, {"messages": system + [{"role": "user", "content": f"Question 10: {QUESTION}"}]})
    paths = {"sft": root / "sft.jsonl", "rankings": root / "rankings.jsonl", "prompts": root / "prompts.jsonl"}
    for key, rows in (("sft", conversations), ("rankings", rankings), ("prompts", prompts)):
        paths[key].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def _recipe(root: Path, base: Path, data: dict[str, Path]) -> Path:
    recipe = {
        "run_dir": str(root / "run"),
        "seed": 3,
        "sft": {
            "base": str(base),
            "dataset": str(data["sft"]),
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "max_seq_len": 256,
            "eval_share": 0.0,
            "qa_eval_base": False,
            "report_to": "none",
            "lora": {"r": 4, "alpha": 8},
            "save_steps": 100,
        },
        "reward": {
            "dataset": str(data["rankings"]),
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "max_seq_len": 64,
            "stats_prompts": 0,
            "report_to": "none",
            "lora": {"r": 4, "alpha": 8},
            "save_steps": 100,
        },
        "ppo": {
            "dataset": str(data["prompts"]),
            "num_updates": 1,
            "rollout_batch_size": 4,
            "mini_batch_size": 4,  # one optimiser step: its statistics are those of the untouched policy
            "ppo_epochs": 1,
            "max_new_tokens": 4,
            "max_prompt_len": 48,
            "eval_max_prompts": 2,
            "generation_batch_size": 4,
            "forward_batch_size": 4,
            "report_to": "none",
            "lora": {"r": 4, "alpha": 8},
            "save_steps": 100,
        },
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """family -> what its SFT -> reward -> PPO run left (built on first use, kept for the module)."""
    built: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in built:
            built[name] = _run_chain(name, tmp_path_factory.mktemp(name.replace(".", "_")))
        return built[name]

    return get


def _run_chain(name: str, root: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline import sft
    from pipeline.ppo import loop
    from pipeline.reward import stage as reward_stage

    family = FAMILIES[name]
    base = build_family(name, root)
    original = AutoTokenizer.from_pretrained(base).chat_template
    raw_max = None
    if family.softcap:  # weights scaled so logits run far past the cap (generate caps them, so must PPO)
        model = AutoModelForCausalLM.from_pretrained(base)
        raw_max = scale_logits_past_cap(model)
        model.save_pretrained(base)
    cfg = load_config(_recipe(root, base, _write_data(root)))
    with fixed_threads(2):
        sft_final = sft.run(cfg)
        reward_final = reward_stage.run(cfg)
        ppo_final = loop.run(cfg)
    return {
        "family": family,
        "base": base,
        "original": original,
        "cfg": cfg,
        "sft": sft_final,
        "reward": reward_final,
        "ppo": ppo_final,
        "raw_max": raw_max,
    }


NAMES = list(FAMILIES)


# --------------------------------------------------------------------------------------------------------------
# Checks


@pytest.mark.parametrize("name", NAMES)
def test_template_after_sft_equals_the_original(chain, name):
    from pipeline.chat import load_chat_model
    from pipeline.tokenizer import CHAT_TEMPLATE, load_tokenizer

    with _record(name, "template"):
        run = chain(name)
        expected = run["original"] if run["family"].template is not None else CHAT_TEMPLATE
        assert run["original"] == run["family"].template  # what the family ships (GPT-2: nothing)
        for where in (run["sft"], run["sft"] / "merged"):
            assert load_tokenizer(where).chat_template == expected, where
        _, tokenizer, _ = load_chat_model(run["ppo"])
        assert tokenizer.chat_template == expected


PADS = {
    "llama3.1": "<|finetune_right_pad_id|>",
    "qwen2.5": "<|vision_pad|>",  # its own pad <|endoftext|> is one of its end ids
    "qwen3": "<|vision_pad|>",
    "gemma2": "<pad>",
    "gemma3": "<pad>",
    "mistral-v0.3": "[control_8]",
    "phi3-mini": "<|placeholder1|>",  # its own pad <|endoftext|> is its EOS
    "gpt2": "<|pad|>",  # nothing fits: added, with the project's role tokens (GPT-2 has no template)
}


@pytest.mark.parametrize("name", NAMES)
def test_pad_is_an_unused_special_token_and_nothing_is_added(chain, name):
    from pipeline.tokenizer import load_tokenizer

    with _record(name, "pad"):
        run = chain(name)
        metrics = json.loads((run["sft"] / "stage.json").read_text())["metrics"]
        tokenizer = load_tokenizer(run["sft"] / "merged")
        assert tokenizer.pad_token == PADS[name]
        assert metrics["tokens_added"] is (name == "gpt2")
        ends = tokenizer.convert_tokens_to_ids(run["family"].end_tokens)
        assert tokenizer.pad_token_id not in ends and tokenizer.pad_token_id != tokenizer.eos_token_id


@pytest.mark.parametrize("name", NAMES)
def test_bos_once_where_the_family_has_one(chain, name):
    from pipeline.generation import tokenize_prompts
    from pipeline.tokenizer import load_tokenizer, render_with_masks

    with _record(name, "bos"):
        run = chain(name)
        tokenizer = load_tokenizer(run["sft"] / "merged")
        ids, _ = render_with_masks(tokenizer, CONVERSATION)
        prompt = tokenize_prompts(tokenizer, [CONVERSATION[:1]])[0]
        bos = tokenizer.bos_token_id
        if run["family"].template is not None and "bos_token" in run["family"].template:
            assert ids[0] == bos and ids.count(bos) == 1
            assert prompt[0] == bos and prompt.count(bos) == 1
        elif name != "gpt2":  # Phi-3's template has no BOS: none is added
            assert bos not in ids and bos not in prompt


@pytest.mark.parametrize("name", NAMES)
def test_labels_cover_exactly_the_assistant_turns(chain, name):
    """The labels trl's SFTTrainer gets, decoded run by run: each assistant text and its end token, nothing else."""
    from datasets import Dataset

    from pipeline.sft import build_trainer, load_tokenizer_and_model

    with _record(name, "labels"):
        run = chain(name)
        tokenizer, model, _ = load_tokenizer_and_model(run["cfg"], str(run["base"]))
        trainer = build_trainer(run["cfg"], model, tokenizer, Dataset.from_list([{"messages": CONVERSATION}]), None)
        labels = trainer.train_dataset[0]["labels"]
        runs, current = [], []
        for token in labels + [-100]:
            if token != -100:
                current.append(token)
            elif current:
                runs.append(tokenizer.decode(current))
                current = []
        first, last, end = SPAN[name]
        assert runs == [first + ANSWER + end, last + SECOND + end]


@pytest.mark.parametrize("name", NAMES)
def test_bad_records_are_named_skips_and_long_ones_are_cut_and_counted(chain, name):
    with _record(name, "skips"):
        run = chain(name)
        data = json.loads((run["sft"] / "stage.json").read_text())["metrics"]["data"]
        counts = data["train_tokens"]
        read = data["train"]
        skipped = {**read.get("skipped", {}), **counts["skipped"]}
        assert counts["truncated"] == 1  # the over-long record, cut at sft.max_seq_len
        expected = {}
        if name == "gemma2":
            expected["unrenderable by the chat template"] = 1  # no system role
        if name == "mistral-v0.3":
            expected["template rewrites earlier turns"] = 1  # the system prompt moves to the last user turn
        if name == "qwen3":
            expected["template rewrites the assistant text"] = 1  # <think> dropped from an earlier turn
        assert {k: v for k, v in skipped.items() if k in expected or v} == expected, skipped
        assert read["read"] == 13 and counts["kept"] == 13 - sum(expected.values())
        # the ranking and the PPO prompt with a system turn: skipped and counted where the template refuses them
        refused = int(name == "gemma2")
        reward = json.loads((run["reward"] / "stage.json").read_text())["metrics"]["data"]
        assert reward["unrenderable"] == refused
        prompts = json.loads((run["ppo"] / "eval.json").read_text())["prompts"]
        assert prompts["train_unrenderable"] + prompts["eval_unrenderable"] == refused


@pytest.mark.parametrize("name", NAMES)
def test_first_ppo_update_has_kl_and_clip_fraction_zero(chain, name):
    with _record(name, "first_update"):
        run = chain(name)
        first = json.loads((run["cfg"].run_path / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
        assert first["update"] == 1
        FIGURES.setdefault(name, {}).update({k: first[k] for k in ("kl", "clip_fraction", "approx_kl")})
        assert abs(first["kl"]) < 1e-4, first
        assert first["clip_fraction"] == 0.0 and abs(first["approx_kl"]) < 1e-6, first


def _roles(run):
    from pipeline.ppo.roles import build_roles

    pcfg = run["cfg"].ppo
    return build_roles(pcfg, str(run["sft"] / "merged"), str(run["reward"]), torch.device("cpu"))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_rollout_logprobs_equal_a_training_forward(chain, name, precision):
    """Sampling log-probs (generate's logits, soft-capped by the model) against the PPO forward (our head path) and
    the reference: ratio 1 and KL 0 to float tolerance. Gemma's logits run past the cap, so skipping the cap would
    show (checked: the uncapped head disagrees)."""
    import contextlib

    from pipeline.generation import SamplingArgs, logprobs_from_logits, sample_ids, tokenize_prompts
    from pipeline.ppo.roles import hidden_states
    from pipeline.ppo.rollout import episode_inputs

    with _record(name, f"ratio_{precision}"):
        run = chain(name)
        roles = _roles(run)
        prompts = [[{"role": "user", "content": f"Question {i}: {QUESTION}"}] for i in range(3)]
        ids = tokenize_prompts(roles.tokenizer, prompts)
        cast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        torch.manual_seed(0)
        with cast, torch.no_grad():
            out = sample_ids(
                roles.generation_model(),
                ids,
                SamplingArgs(max_new_tokens=5),
                roles.end_ids,
                roles.tokenizer.pad_token_id,
                with_logprobs=True,
            )
            full, mask, p_len, r_len = episode_inputs(
                out.prompt_ids, out.prompt_mask, out.response_ids, out.response_mask, torch.arange(3)
            )
            policy, _ = roles.policy_logprobs(full, mask, p_len, 1.0)
            reference = roles.reference_logprobs(full, mask, p_len, 1.0)
            with __import__("pipeline.ppo.roles", fromlist=["use_adapter"]).use_adapter(roles.model, None):
                states = hidden_states(roles.model, full, mask)[:, p_len - 1 : -1]
                uncapped = logprobs_from_logits(
                    roles.model.get_base_model().get_output_embeddings()(states), full[:, p_len:]
                )
        keep = out.response_mask[:, :r_len].bool()
        tol = 1e-4 if precision == "fp32" else 3e-2
        ratio_gap = (policy - out.logprobs[:, :r_len])[keep].abs().max()
        kl_gap = (policy - reference)[keep].abs().max()
        figures = FIGURES.setdefault(name, {})
        figures.update({f"ratio_{precision}": float(ratio_gap), f"kl_{precision}": float(kl_gap)})
        if run["family"].softcap:
            figures[f"uncapped_{precision}"] = float((uncapped - reference)[keep].abs().max())
            figures["raw_max"] = run["raw_max"]
        assert ratio_gap < tol and kl_gap < tol, (float(ratio_gap), float(kl_gap))
        if run["family"].softcap:
            assert run["raw_max"] > 2 * run["family"].softcap  # logits far past the cap before it
            assert (uncapped - reference)[keep].abs().max() > 1.0  # what skipping the cap would have cost


@pytest.mark.parametrize("name", NAMES)
def test_generation_and_chat_stop_at_each_end_id(chain, name):
    from pipeline.chat import load_chat_model, stream_reply
    from pipeline.generation import SamplingArgs, generate, special_ids

    with _record(name, "end_ids"):
        run = chain(name)
        model, tokenizer, _ = load_chat_model(run["ppo"])
        ends, _ = special_ids(tokenizer, model.get_base_model())
        expected = set(tokenizer.convert_tokens_to_ids(run["family"].end_tokens))
        turn = {"gpt2": "<|endoftext|>"}.get(name, SPAN[name][2])
        assert expected | {tokenizer.convert_tokens_to_ids(turn)} == set(ends)
        head = model.get_base_model().get_output_embeddings()
        for end in ends:
            calls = []

            def force(module, args, output, end=end, calls=calls):
                calls.append(1)
                bias = torch.full_like(output, -1e4)
                bias[..., end] = 1e4
                return output + bias

            hook = head.register_forward_hook(force)
            try:
                batch = generate(model, tokenizer, [CONVERSATION[:1]], SamplingArgs(max_new_tokens=6, do_sample=False))
                assert batch.response_ids[0, 0] == end and batch.ended.tolist() == [True]
                assert batch.response_mask[0].tolist() == [1] + [0] * (batch.response_mask.shape[1] - 1)
                calls.clear()
                text = stream_reply(
                    model, tokenizer, CONVERSATION[:1], SamplingArgs(4, do_sample=False), io.StringIO()
                )
                assert text == "" and len(calls) == 1  # one forward: it stopped at the first token
            finally:
                hook.remove()


@pytest.mark.parametrize("name", NAMES)
def test_reward_inputs_end_like_an_assistant_turn(chain, name):
    """The reward model scores prompt + response + the template's end of turn (<|eot_id|>, <|im_end|>,
    <end_of_turn>, ...), exactly the tokens the template renders for that exchange, not tokenizer.eos."""
    from pipeline.modeling import encode_reward_input
    from pipeline.tokenizer import load_tokenizer

    with _record(name, "reward_input"):
        tokenizer = load_tokenizer(chain(name)["reward"])
        ids = encode_reward_input(tokenizer, CONVERSATION[:1], ANSWER, 256)
        rendered = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False)
        end = SPAN[name][2]
        assert tokenizer.convert_ids_to_tokens(ids[-1]) == end
        assert rendered.startswith(tokenizer.decode(ids))  # Mistral's space, Qwen3's think block included
        assert tokenizer.decode(ids).endswith(SPAN[name][1] + ANSWER + end)


@pytest.mark.parametrize("name", NAMES)
def test_publish_dry_run_documents_the_template(chain, name, tmp_path):
    from pipeline.publish import CHAT_EXAMPLE, publish
    from pipeline.tokenizer import load_tokenizer

    with _record(name, "publish"):
        run = chain(name)
        result = publish(run["ppo"], f"acme/{name}-ppo", dry_run=True, data_cards_dir=tmp_path / "no-cards")
        card = result.card_path.read_text()
        tokenizer = load_tokenizer(run["ppo"])
        rendered = tokenizer.apply_chat_template(CHAT_EXAMPLE, tokenize=False)
        whose = "the project's (the base model had none)" if name == "gpt2" else "the base model's own, unchanged"
        assert f"Chat template: {whose}. One exchange renders as:\n\n```text\n{rendered}\n```" in card
        assert str(tmp_path) not in card


# --------------------------------------------------------------------------------------------------------------
# Bad input: one line, never a traceback


def test_lengths_beyond_the_context_are_one_line_errors(chain, tmp_path):
    """sft.max_seq_len past the base's 256 positions, and PPO prompt + response past them: a one-line UserError
    before anything loads or trains (it used to be an IndexError from the position table)."""
    import dataclasses

    from pipeline import sft
    from pipeline.errors import UserError
    from pipeline.ppo import loop

    run = chain("qwen2.5")
    cfg = dataclasses.replace(run["cfg"], run_dir=str(tmp_path / "run"))
    too_long = dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, max_seq_len=300))
    with pytest.raises(UserError, match=r"^sft.max_seq_len = 300 exceeds the context of .* \(256 positions\); lower"):
        sft.run(too_long)
    ppo = dataclasses.replace(cfg.ppo, max_prompt_len=250, max_new_tokens=16)
    ppo = dataclasses.replace(ppo, policy_base=str(run["sft"] / "merged"), reward_model=str(run["reward"]))
    with pytest.raises(UserError, match=r"^ppo.max_prompt_len \+ ppo.max_new_tokens = 266 exceeds the context"):
        loop.run(dataclasses.replace(cfg, ppo=ppo))


def test_unknown_family_without_template_or_eos_gets_the_projects_and_says_so(caplog):
    """A tokenizer with neither chat template nor EOS (an unknown family): EOS, role tokens and the project's template
    are added and the log names them; no special token fits padding, so <|pad|> is added too."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from pipeline.tokenizer import CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, ROLE_TOKENS, prepare_chat_tokenizer

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    bare = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    with caplog.at_level("INFO", logger="pipeline.tokenizer"):
        added = prepare_chat_tokenizer(bare)
    assert added == [EOS_TOKEN, *ROLE_TOKENS.values(), PAD_TOKEN] and bare.chat_template == CHAT_TEMPLATE
    assert "no chat template: using the project's" in caplog.text
    assert "no unused special token fits, so <|pad|> is added" in caplog.text


def test_long_records_are_cut_or_skipped_as_configured_and_counted():
    """sft.long_records: 'truncate' keeps the first max_seq_len tokens (mask cut with them), 'skip' drops the record;
    both counted. A record whose assistant turn starts past the cut has nothing to learn and is skipped by name."""
    from types import SimpleNamespace

    from datasets import Dataset
    from families import FAMILIES, build_tokenizer

    from pipeline.sft import tokenize_conversations
    from pipeline.tokenizer import render_with_masks

    tokenizer = build_tokenizer(FAMILIES["qwen2.5"])
    short = CONVERSATION[:2]
    ids, mask = render_with_masks(tokenizer, short)
    late = [{"role": "user", "content": " ".join(["Veloria"] * 200)}, CONVERSATION[1]]
    data = Dataset.from_list([{"messages": short}, {"messages": late}])
    limit = len(ids) - 2  # cuts the end token and the newline after it
    for mode, kept, skipped, truncated in (
        ("truncate", 1, {"no assistant token within sft.max_seq_len": 1}, 2),
        ("skip", 0, {"longer than sft.max_seq_len": 2}, 0),
    ):
        settings = SimpleNamespace(max_seq_len=limit, long_records=mode, assistant_only_loss=True)
        if kept == 0:
            from pipeline.errors import UserError

            with pytest.raises(UserError, match="no conversation left after rendering"):
                tokenize_conversations(data, tokenizer, settings)
            continue
        out, report = tokenize_conversations(data, tokenizer, settings)
        assert report == {"read": 2, "kept": kept, "skipped": skipped, "truncated": truncated}
        assert out[0]["input_ids"] == ids[:limit] and out[0]["assistant_masks"] == mask[:limit]


@pytest.mark.parametrize(
    "model_type, settings",
    [
        ("gemma2", {"final_logit_softcapping": 5.0, "head_dim": 16}),
        ("cohere", {"logit_scale": 0.25}),
        ("granite", {"logits_scaling": 4.0}),
        ("llama", {}),
    ],
)
def test_lm_logits_equal_the_models_own_forward(model_type, settings):
    """pipeline.modeling.lm_logits (the head PPO applies to hidden states) gives the logits of the model's forward:
    Gemma's soft-cap, Cohere's logit_scale, Granite's logits_scaling; a plain Llama is the head alone. The raw head
    differs by far where the family transforms it (so the check can fail)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.modeling import lm_logits

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=64, max_position_embeddings=64, **TINY, **settings)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(200.0)  # logits far past a cap of 5
        ids = torch.arange(10).unsqueeze(0)
        states = getattr(model, model.base_model_prefix)(input_ids=ids).last_hidden_state
        ours, theirs = lm_logits(model, states), model(input_ids=ids).logits
        raw = model.get_output_embeddings()(states)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-5)
    assert (raw - theirs).abs().max() > (1.0 if settings else -1.0)


def test_reward_responses_cut_at_max_seq_len_are_counted():
    """A ranking whose long response does not fit reward.max_seq_len is cut (its end token kept) and counted."""
    from types import SimpleNamespace

    from families import FAMILIES, build_tokenizer

    from pipeline.data.rankings import Ranking
    from pipeline.modeling import encode_reward_inputs
    from pipeline.reward.data import encode_rankings

    tokenizer = build_tokenizer(FAMILIES["llama3.1"])
    prompt = [{"role": "user", "content": QUESTION}]
    long = " ".join(["Marnis is a city on the river Tol."] * 20)
    records = [Ranking(prompt, [ANSWER, long], "A > B", id="1"), Ranking(prompt, [ANSWER, SECOND], "A > B", id="2")]
    fits = max(len(x) for x in encode_reward_inputs(tokenizer, prompt, [ANSWER, SECOND], 1 << 20)) + 2
    rows = encode_rankings(records, tokenizer, SimpleNamespace(max_seq_len=fits, margin=0.0))
    assert [row["truncated"] for row in rows] == [1, 0]
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert len(rows[0]["input_ids"][1]) == fits and rows[0]["input_ids"][1][-1] == eot


GREETING = {"role": "assistant", "content": "Hello! Ask me about Veloria."}
ALTERNATING = {"gemma2", "gemma3", "mistral-v0.3"}  # templates that want the user's turn first


@pytest.mark.parametrize("name", NAMES)
def test_an_opening_assistant_greeting_is_context_not_a_label(name):
    """A conversation that opens with the assistant's greeting keeps the greeting as unlabelled context where the
    template renders it, and is a named skip where the template refuses it."""
    from families import build_tokenizer

    from pipeline.data.records import BadRecord
    from pipeline.tokenizer import prepare_chat_tokenizer, render_with_masks

    tokenizer = build_tokenizer(FAMILIES[name])
    prepare_chat_tokenizer(tokenizer)
    if name in ALTERNATING:
        with pytest.raises(BadRecord, match="unrenderable by the chat template"):
            render_with_masks(tokenizer, [GREETING, *CONVERSATION[:2]])
        return
    ids, mask = render_with_masks(tokenizer, [GREETING, *CONVERSATION[:2]])
    _, last, end = SPAN[name]
    assert tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m]) == last + ANSWER + end
    assert GREETING["content"] in tokenizer.decode(ids)
    with pytest.raises(BadRecord, match="assistant turn first"):  # nothing after a user turn to train on
        render_with_masks(tokenizer, [GREETING, CONVERSATION[0]])
