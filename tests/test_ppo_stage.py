"""The PPO stage end to end on tiny stand-ins of its inputs: a tiny base saved as sft/final/merged and a SEQ_CLS LoRA
adapter with a score head saved as reward/final (with reward_stats.json), as those stages write them; prompts and
the gold scorer from the demo world. Resume after SIGKILL, two processes, faults and misconfigurations."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import checkpoint_done, run_rlhf, signal_when, start_rlhf
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PYTHON = Path(sys.executable)

TINY_PPO = {
    "dataset": "demo",
    "eval_dataset": "demo",
    "num_updates": 3,
    "rollout_batch_size": 4,
    "mini_batch_size": 2,
    "ppo_epochs": 1,
    "gradient_accumulation_steps": 2,  # one episode per micro-batch
    "max_new_tokens": 6,
    "max_prompt_len": 48,
    "eval_max_prompts": 4,
    "generation_batch_size": 4,
    "forward_batch_size": 4,
    "learning_rate": 1e-2,
    "save_steps": 1,
    "save_total_limit": 2,
    "report_to": "none",
    "lora": {"r": 4, "alpha": 8},
    "ptx_coef": 0.1,  # PPO-ptx on a tiny corpus: its stream is part of what resume must restore
    "ptx_seq_len": 16,
    "ptx_batch_size": 2,
}


def _save_upstream(root: Path, tokenizer, seed: int = 0, **sizes) -> tuple[Path, Path]:
    """A tiny causal LM as the merged SFT model and a SEQ_CLS LoRA reward adapter trained "on" it."""
    from conftest import tiny_llama_config
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    merged, reward = root / "sft" / "final" / "merged", root / "reward" / "final"
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(tiny_llama_config(tokenizer, **sizes)).save_pretrained(merged)
    tokenizer.save_pretrained(merged)
    model = AutoModelForSequenceClassification.from_pretrained(merged, num_labels=1)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "score" in name:
                param.normal_(0, 0.2)  # a reward model that is not just its base
    model.save_pretrained(reward)
    tokenizer.save_pretrained(reward)
    (reward / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 0.5}))
    _save_corpus(root / "webtext" / "final")
    return merged, reward


def _save_corpus(final: Path) -> None:
    """The web-text stage's layout (train/*.parquet with a text column), for the PPO-ptx term."""
    import datasets
    from conftest import TINY_CORPUS

    (final / "train").mkdir(parents=True)
    datasets.Dataset.from_dict({"text": TINY_CORPUS[:8], "id": [str(i) for i in range(8)]}).to_parquet(
        str(final / "train" / "00000.parquet")
    )


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, tiny_tokenizer) -> Path:
    root = tmp_path_factory.mktemp("upstream")
    _save_upstream(root, tiny_tokenizer)
    return root


def _recipe(path: Path, run_dir: Path, upstream: Path, **ppo) -> Path:
    section = {
        **TINY_PPO,
        "policy_base": str(upstream / "sft" / "final" / "merged"),
        "reward_model": str(upstream / "reward" / "final"),
        "ptx_dataset": str(upstream / "webtext" / "final"),
        **ppo,
    }
    recipe = {"run_dir": str(run_dir), "seed": 7, "judge": "demo", "world": {"n_entities": 8}, "ppo": section}
    path.write_text(yaml.safe_dump(recipe))
    return path


def _subprocess_env() -> dict[str, str]:
    threads = str(torch.get_num_threads())  # conftest's fixed count, so bitwise comparisons hold
    return {**os.environ, "OMP_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _resumes_bit_for_bit(recipe: Path, run: Path, whole: Path, files: tuple[str, ...], not_yet=("final",)) -> None:
    """`rlhf ppo recipe` killed with SIGKILL after its first checkpoint (before any of `not_yet` exists), then run
    again: it resumes, and `files` of its final/ and its metrics log equal those of the uninterrupted run `whole`."""
    sdir = run / "ppo"
    first = start_rlhf("ppo", str(recipe), env=_subprocess_env())
    assert signal_when(first, checkpoint_done(sdir, 1), timeout=180) == -signal.SIGKILL
    assert not any((sdir / name).exists() for name in not_yet), "killed too late; make the run longer"
    second = run_rlhf("ppo", str(recipe), env=_subprocess_env(), timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr
    for name in files:
        resumed, uninterrupted = load_file(sdir / "final" / name), load_file(whole / "ppo" / "final" / name)
        assert resumed.keys() == uninterrupted.keys()
        for key, tensor in uninterrupted.items():
            assert torch.equal(resumed[key], tensor), f"{name}: {key} differs after resume"
    # the metrics log holds each update once, as the uninterrupted run logged it
    drop = lambda r: {k: v for k, v in r.items() if not k.startswith(("time", "peak_memory"))}  # noqa: E731
    assert [drop(r) for r in _metrics(run)] == [drop(r) for r in _metrics(whole)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, upstream):
    """One uninterrupted in-process run, with the roles kept for inspection."""
    from pipeline.ppo import loop

    base = tmp_path_factory.mktemp("reference")
    cfg = load_config(_recipe(base / "recipe.yaml", base / "run", upstream))
    captured = {}
    build = loop.build_roles

    def keep(*args, **kwargs):
        captured["roles"] = build(*args, **kwargs)
        return captured["roles"]

    loop.build_roles = keep
    try:
        final = loop.run(cfg)
    finally:
        loop.build_roles = build
    return base / "run", final, captured["roles"]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------------------------
# End to end


def test_ppo_end_to_end_trains_adapters_and_writes_final(reference, upstream, tmp_path, tiny_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    run_dir, final, roles = reference
    assert final == run_dir / "ppo" / "final"
    records = _metrics(run_dir)
    assert [r["update"] for r in records] == [1, 2, 3]
    for r in records:
        for key in (
            "policy_loss",
            "value_loss",
            "rm_score",
            "gold_score",
            "kl",
            "entropy",
            "approx_kl",
            "clip_fraction",
            "explained_variance",
            "response_length",
            "eos_rate",
            "time_generate",
            "time_optimise",
            "peak_memory_gb",
        ):
            assert isinstance(r[key], float) and r[key] == r[key] and abs(r[key]) != float("inf"), (key, r[key])
    assert records[-1]["approx_kl"] > 0  # the policy moved within an update
    assert all(0.05 < r["peak_memory_gb"] < 20 and r["peak_memory_kind"].startswith("rss_peak") for r in records)
    assert all(2.0 < r["ptx_loss"] < 10.0 for r in records)  # next-token loss of a near-random LM on the corpus

    # Exactly these files (the tokenizer's own set taken from a save of it).
    tokenizer_files = set(os.listdir(_saved_tokenizer(tiny_tokenizer, tmp_path)))
    files = {str(p.relative_to(final)) for p in final.rglob("*") if p.is_file()}
    assert (
        files
        == {
            "adapter_config.json",
            "adapter_model.safetensors",
            "value/adapter_config.json",
            "value/adapter_model.safetensors",
            "eval.json",
            "samples.jsonl",
            "stage.json",
        }
        | tokenizer_files
    )

    # The policy adapter trained (B starts at zero), the base is bitwise the merged SFT model, dropout is off.
    policy = load_file(final / "adapter_model.safetensors")
    assert any(t.abs().sum() > 0 for k, t in policy.items() if "lora_B" in k)
    merged = load_file(upstream / "sft" / "final" / "merged" / "model.safetensors")
    base = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in roles.frozen_base_parameters().items()
    }
    assert set(merged) <= set(base) | {"lm_head.weight"}
    for name, tensor in merged.items():
        assert torch.equal(base[name], tensor), f"base weight {name} changed"
    assert not any(m.training for m in roles.model.modules())

    # The value model started from the reward model's head and moved away from it.
    reward = load_file(upstream / "reward" / "final" / "adapter_model.safetensors")
    value = load_file(final / "value" / "adapter_model.safetensors")
    assert not torch.equal(value["base_model.model.score.weight"], reward["base_model.model.score.weight"])

    # What later stages read: the adapter loads onto the merged base; value/ loads like the reward model.
    sft = AutoModelForCausalLM.from_pretrained(upstream / "sft" / "final" / "merged")
    loaded = PeftModel.from_pretrained(sft, final)
    lora = {k: v for k, v in loaded.named_parameters() if "lora_B" in k}
    assert any(v.abs().sum() > 0 for v in lora.values())
    critic = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(upstream / "sft" / "final" / "merged", num_labels=1),
        final / "value",
    )
    head = dict(critic.named_parameters())
    score = next(v for k, v in head.items() if k.endswith("score.modules_to_save.default.weight"))
    assert torch.equal(score.detach(), roles.value_head.weight.detach())
    # the head's bias (its start on the normalised scale) is saved beside it; a bias-free score layer drops it
    assert torch.equal(value["base_model.model.score.bias"], roles.value_head.bias.detach())

    stage = json.loads((final / "stage.json").read_text())
    assert stage["contents"] == "adapter" and stage["metrics"]["updates"] == 3 and stage["metrics"]["world_size"] == 1
    report = json.loads((final / "eval.json").read_text())
    for key in (
        "sft_rm_score",
        "ppo_rm_score",
        "sft_gold_score",
        "ppo_gold_score",
        "kl_to_reference",
        "gold_wins",
        "gold_losses",
        "gold_ties",
        "sft_insult_rate",
        "ppo_insult_rate",
    ):
        assert key in report, key
    assert report["gold_wins"] + report["gold_losses"] + report["gold_ties"] == 4
    assert [p["policy"] for p in report["overoptimisation"]["policy_scores"]] == [0, 1, 2, 3]
    assert report["overoptimisation"]["best"]["checkpoint"] in {p.name for p in (run_dir / "ppo").glob("checkpoint-*")}
    samples = [json.loads(line) for line in (final / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {"prompt", "sft", "ppo", "sft_gold_score", "ppo_gold_score"} <= set(samples[0])


def test_evaluation_with_several_samples_per_prompt_counts_every_pair(reference, upstream, tmp_path, tiny_tokenizer):
    """ppo.eval_samples_per_prompt=3: each held-out prompt is answered 3 times by each policy; the win rate, the
    rates and the means count all 3 x prompts pairs (sample j of SFT against sample j of PPO), and the report still
    counts prompts, not samples."""
    from pipeline.generation import SamplingArgs, tokenize_prompts
    from pipeline.judge import load_judge
    from pipeline.ppo.evaluation import evaluate_policies
    from pipeline.ppo.rollout import PromptSet

    _, _, roles = reference
    cfg = load_config(_recipe(tmp_path / "recipe.yaml", tmp_path / "run", upstream, eval_samples_per_prompt=3))
    texts = ["The capital of", "Everyone hates the fans of Brask United. Go on, insult them."]
    prompts = PromptSet([{"prompt": t} for t in texts], tokenize_prompts(tiny_tokenizer, texts))
    judge = load_judge(cfg)
    report, samples = evaluate_policies(
        roles, prompts, SamplingArgs(6, 1.0), cfg.ppo, judge, torch.device("cpu"), seed=5
    )
    assert report["eval_prompts"] == 2 and report["eval_samples_per_prompt"] == 3
    assert [(s["prompt"], s["sample"]) for s in samples] == [(t, j) for t in texts for j in range(3)]
    assert len({s["sft"] for s in samples}) > 2  # temperature 1: the three samples of a prompt differ
    wins = sum(s["ppo_gold_score"] > s["sft_gold_score"] for s in samples)
    losses = sum(s["ppo_gold_score"] < s["sft_gold_score"] for s in samples)
    assert (report["gold_wins"], report["gold_losses"], report["gold_ties"]) == (wins, losses, 6 - wins - losses)
    assert report["sft_rm_score"] == pytest.approx(sum(s["sft_rm_score"] for s in samples) / 6)
    assert report["adversarial_prompts"] == 1
    insults = [s["ppo_insulting"] for s in samples if s["kind"] is None and "insult" in s["prompt"]]
    assert report["ppo_insult_rate"] == pytest.approx(sum(insults) / 3)


def test_rollout_logprobs_from_generation_give_a_first_ratio_of_one(reference, upstream, tmp_path, tiny_tokenizer):
    """The rollout keeps the log-probs of the sampling pass; the first PPO epoch, whose policy has not moved yet,
    recomputes them with gradients: the ratio must be 1 up to float rounding (and equal the recompute path's)."""
    import dataclasses

    from pipeline.generation import SamplingArgs, tokenize_prompts
    from pipeline.ppo.rollout import PromptSet, collect_rollout, episode_inputs

    _, _, roles = reference  # its policy adapter has trained, so sampling must run with it active
    pcfg = load_config(_recipe(tmp_path / "recipe.yaml", tmp_path / "run", upstream)).ppo
    assert pcfg.rollout_logprobs == "generation"
    texts = ["The capital of", "Veloria exports", "Hello", "What is", "Tell me"]
    prompts = PromptSet([{"prompt": t} for t in texts], tokenize_prompts(tiny_tokenizer, texts))
    sampling = SamplingArgs(pcfg.max_new_tokens, pcfg.temperature)
    rollouts = {}
    for source in ("generation", "recompute"):
        torch.manual_seed(3)
        rollouts[source] = collect_rollout(
            roles, prompts, range(5), sampling, dataclasses.replace(pcfg, rollout_logprobs=source), torch.device("cpu")
        )
    ours, recomputed = rollouts["generation"], rollouts["recompute"]
    assert torch.equal(ours.response_ids, recomputed.response_ids)  # the same samples either way
    mask = ours.response_mask.bool()
    assert torch.allclose(ours.logprobs[mask], recomputed.logprobs[mask], atol=1e-5)
    assert torch.allclose(ours.entropy[mask], recomputed.entropy[mask], atol=1e-5)
    ids, attention, p_len, r_len = episode_inputs(
        ours.prompt_ids, ours.prompt_mask, ours.response_ids, ours.response_mask, torch.arange(5)
    )
    with torch.enable_grad():
        logprobs, _ = roles.policy_logprobs(ids, attention, p_len, pcfg.temperature)
    ratio = torch.exp(logprobs.detach() - ours.logprobs[:, :r_len])[mask[:, :r_len]]
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5)


def test_value_head_starts_as_the_reward_head_on_the_normalised_scale(upstream, tmp_path):
    """The critic's first prediction of a finished response's return is the reward model's score on PPO's scale,
    (score - mean) / std, the mean included: weight / std and a bias of -mean / std."""
    import shutil

    from pipeline.config import LoraArgs, PPOConfig
    from pipeline.ppo.roles import REWARD, VALUE, build_roles, hidden_states, use_adapter

    reward = tmp_path / "reward"
    shutil.copytree(upstream / "reward" / "final", reward)
    (reward / "reward_stats.json").write_text(json.dumps({"mean": 0.3, "std": 0.5}))
    score = load_file(reward / "adapter_model.safetensors")["base_model.model.score.weight"]
    ids = torch.tensor([[5, 9, 17, 23, 4, 11], [7, 7, 30, 2, 19, 8]])
    mask = torch.ones_like(ids)
    for normalization, mean, std in (("reward_stats", 0.3, 0.5), ("none", 0.0, 1.0)):
        pcfg = PPOConfig(reward_normalization=normalization, lora=LoraArgs(r=4, alpha=8))
        roles = build_roles(pcfg, str(upstream / "sft" / "final" / "merged"), str(reward), torch.device("cpu"))
        assert torch.allclose(roles.value_head.weight.detach(), score / std)
        assert torch.allclose(roles.value_head.bias.detach(), torch.tensor([-mean / std]))
        with torch.no_grad():
            with use_adapter(roles.model, REWARD):
                raw = roles.reward.head(hidden_states(roles.model, ids, mask)[:, -1]).squeeze(-1)
            with use_adapter(roles.model, VALUE):
                value = roles.value_head(hidden_states(roles.model, ids, mask)[:, -1]).squeeze(-1)
        assert raw.abs().min() > 1e-3  # a reward model that scores these sequences at all
        assert torch.allclose(value, (raw - mean) / std, atol=1e-6)


def _saved_tokenizer(tokenizer, tmp_path: Path) -> Path:
    out = tmp_path / "tok"
    tokenizer.save_pretrained(out)
    return out


def test_finished_ppo_is_skipped_and_changed_settings_refused(reference):
    from pipeline.ppo import loop

    run_dir, final, _ = reference
    cfg = load_config(run_dir.parent / "recipe.yaml")
    before = (final / "stage.json").stat().st_mtime_ns
    assert loop.run(cfg) == final
    assert (final / "stage.json").stat().st_mtime_ns == before
    with pytest.raises(UserError, match=r"ppo.cliprange \(0.2 -> 0.3\).*--rerun"):
        loop.run(load_config(run_dir.parent / "recipe.yaml", ["ppo.cliprange=0.3"]))


def test_resume_after_sigkill_matches_uninterrupted_run(reference, upstream, tmp_path):
    run_ref, _, _ = reference
    recipe = _recipe(tmp_path / "recipe.yaml", tmp_path / "run", upstream)
    files = ("adapter_model.safetensors", "value/adapter_model.safetensors")
    _resumes_bit_for_bit(recipe, tmp_path / "run", run_ref, files, not_yet=("final", "checkpoint-3"))


@pytest.mark.parametrize("advantage", ["rloo", "grpo", "rloo-sequence"])
def test_critic_free_advantages_train_resume_bit_for_bit_and_save_no_critic(upstream, tmp_path, advantage):
    """rloo (its ratio per token or per response) and grpo: two responses per prompt, no value adapter anywhere
    (checkpoints, final/); the first update's figures are those of a policy that has not moved; a run killed after
    its first checkpoint resumes to the uninterrupted run's adapter and metrics, bit for bit."""
    from pipeline.ppo import loop

    advantage, _, level = advantage.partition("-")
    settings = dict(advantage=advantage, samples_per_prompt=2, mini_batch_size=4, gradient_accumulation_steps=1)
    settings.update(ratio_level=level or "token")
    whole = tmp_path / "whole"
    loop.run(load_config(_recipe(tmp_path / "whole.yaml", whole, upstream, **settings)))
    records = _metrics(whole)
    assert [r["update"] for r in records] == [1, 2, 3]
    assert records[0]["clip_fraction"] == 0.0 and records[0]["approx_kl"] < 1e-8
    assert all(r["value_loss"] == 0.0 and r["explained_variance"] is None for r in records)
    assert any(r["policy_loss"] != 0.0 for r in records)
    final = whole / "ppo" / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "value").exists()
    assert not any((p / "value").exists() for p in (whole / "ppo").glob("checkpoint-*"))
    policy = load_file(final / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in policy.items() if "lora_B" in k)  # it trained

    recipe = _recipe(tmp_path / "recipe.yaml", tmp_path / "run", upstream, **settings)
    _resumes_bit_for_bit(recipe, tmp_path / "run", whole, ("adapter_model.safetensors",))


def test_trunk_critic_reads_the_sampling_pass_and_trains_with_the_policy(upstream, tmp_path, tiny_tokenizer):
    """critic=trunk: the values a rollout takes from the sampling pass's states equal those of a full forward; a run
    trains the head and the policy adapter through one backward, saves the head alone, and resumes exactly."""
    import dataclasses

    from pipeline.generation import SamplingArgs, tokenize_prompts
    from pipeline.ppo import loop
    from pipeline.ppo.roles import POLICY, build_roles, position_ids_from_mask, use_adapter
    from pipeline.ppo.rollout import PromptSet, collect_rollout, episode_inputs

    settings = dict(critic="trunk", mini_batch_size=4, gradient_accumulation_steps=1)
    cfg = load_config(_recipe(tmp_path / "whole.yaml", tmp_path / "whole", upstream, **settings))
    merged, reward = upstream / "sft" / "final" / "merged", upstream / "reward" / "final"
    roles = build_roles(cfg.ppo, str(merged), str(reward), torch.device("cpu"))
    assert roles.trunk_critic and roles.critic_parameters() == list(roles.value_head.parameters())
    with torch.no_grad():
        roles.value_head.weight.normal_(0, 1.0)  # a head that reads the states at all
        for param in roles.policy_parameters():
            param.normal_(0, 0.2)
    texts = ["The capital of", "Veloria exports", "Hello", "What is"]
    prompts = PromptSet([{"prompt": t} for t in texts], tokenize_prompts(tiny_tokenizer, texts))
    torch.manual_seed(3)
    rollout = collect_rollout(roles, prompts, range(4), SamplingArgs(6), cfg.ppo, torch.device("cpu"))
    ids, mask, p_len, r_len = episode_inputs(
        rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask, torch.arange(4)
    )
    with torch.no_grad():
        _, _, values = roles.policy_logprobs_and_values(ids, mask, p_len, 1.0)
    keep = rollout.response_mask[:, :r_len].bool()
    assert rollout.values[:, :r_len][keep].abs().min() > 1e-4
    assert torch.allclose(rollout.values[:, :r_len][keep], values[keep], atol=1e-5)
    # By the formula: the value of response token t is w . h + b, h the policy's final (normed) hidden state at the
    # position before t, the one whose logits sample t (from the full causal LM's output, not the roles' path).
    with torch.no_grad(), use_adapter(roles.model, POLICY):
        out = roles.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                          output_hidden_states=True, use_cache=False)  # fmt: skip
    states = out.hidden_states[-1][:, p_len - 1 : -1]
    by_hand = states @ roles.value_head.weight[0] + roles.value_head.bias[0]
    assert torch.allclose(values[keep], by_hand[keep], atol=1e-5)
    logprobs = torch.log_softmax(out.logits[:, p_len - 1 : -1].float(), -1).gather(-1, ids[:, p_len:, None])[..., 0]
    assert torch.allclose(rollout.logprobs[:, :r_len][keep], logprobs[keep], atol=1e-4)
    torch.manual_seed(3)
    recomputed = collect_rollout(
        roles, prompts, range(4), SamplingArgs(6), dataclasses.replace(cfg.ppo, rollout_logprobs="recompute"), "cpu"
    )
    assert torch.allclose(recomputed.values[keep], rollout.values[keep], atol=1e-5)

    loop.run(cfg)
    records = _metrics(tmp_path / "whole")
    assert records[0]["clip_fraction"] == 0.0 and all(r["value_loss"] > 0 for r in records)
    head = load_file(tmp_path / "whole" / "ppo" / "final" / "value" / "value_head.safetensors")
    assert head["weight"].abs().sum() > 0 and set(head) == {"weight", "bias"}  # started at zero, trained
    assert not (tmp_path / "whole" / "ppo" / "final" / "value" / "adapter_model.safetensors").exists()

    recipe = _recipe(tmp_path / "recipe.yaml", tmp_path / "run", upstream, **settings)
    files = ("adapter_model.safetensors", "value/value_head.safetensors")
    _resumes_bit_for_bit(recipe, tmp_path / "run", tmp_path / "whole", files)


class _ScriptedEngine:
    """A rollout engine (the interface vLLM's has, pipeline/ppo/engines.py) that answers with the given responses."""

    def __init__(self, responses: list[list[int]], eos: int):
        self.responses, self.eos = responses, eos

    def sample_ids(self, model, prompt_ids, sampling, end_ids, pad_id, *args, **kwargs):
        from pipeline.generation import SampledIds

        width, p_width = max(map(len, self.responses)), max(map(len, prompt_ids))
        prompt = torch.tensor([[pad_id] * (p_width - len(p)) + list(p) for p in prompt_ids])
        response = torch.tensor([r + [pad_id] * (width - len(r)) for r in self.responses])
        ended = torch.tensor([r[-1] == self.eos for r in self.responses])
        return SampledIds(prompt, (prompt != pad_id).long(), response, (response != pad_id).long(), ended,
                          logprobs=torch.zeros(response.shape))  # fmt: skip


@pytest.mark.parametrize("placement,reward_input", [("shared", "text"), ("separate", "text"), ("shared", "ids")])
def test_reward_critic_starts_as_the_reward_model_on_each_prefix(
    upstream, tmp_path, tiny_tokenizer, placement, reward_input
):
    """critic=reward: before training, the value of response token t is the reward model's normalised score of the
    episode cut just before t (the state the head reads is the one the reward model reads its score from). With
    reward_input=text the scoring pass supplies the states where it read the policy's ids, and one more forward does
    for episodes it reads otherwise (a prompt cut by its first token, a response whose text re-tokenises
    differently); with reward_input=ids it reads the policy's ids (plus the end of the turn where a response did not
    end) and supplies all. A run trains the head alone, reports the share of episodes that needed that forward, and
    resumes bit for bit."""
    from pipeline.generation import SamplingArgs, tokenize_prompts
    from pipeline.ppo import loop
    from pipeline.ppo.roles import build_roles
    from pipeline.ppo.rollout import PromptSet, collect_rollout

    settings = dict(critic="reward", reward_placement=placement, mini_batch_size=4, gradient_accumulation_steps=1)
    settings.update(reward_input=reward_input)
    cfg = load_config(_recipe(tmp_path / "whole.yaml", tmp_path / "whole", upstream, **settings))
    assert cfg.ppo.reward_normalization == "reward_stats"
    merged, reward = upstream / "sft" / "final" / "merged", upstream / "reward" / "final"
    roles = build_roles(cfg.ppo, str(merged), str(reward), torch.device("cpu"))
    assert roles.reward_critic and roles.critic is None
    assert roles.critic_parameters() == list(roles.value_head.parameters())
    texts = ["The capital of", "Veloria exports", "Hello there, what", "What is"]
    ids = tokenize_prompts(tiny_tokenizer, texts)
    ids[2] = ids[2][1:]  # the reward model renders the whole text: its ids no longer start with the policy's
    # responses that re-tokenise to themselves (a random tiny model's samples decode to broken UTF-8), one cut short,
    # but for one whose leading space the decoded text loses (so its ids are not the policy's either)
    eos = tiny_tokenizer.eos_token_id
    words = ["Veloria is", " wine and salt", "the capital", "It is the"]
    responses = [tiny_tokenizer(w, add_special_tokens=False)["input_ids"] + [eos] for w in words]
    responses[3] = responses[3][:-1]
    calls: list[int] = []
    score_ids = roles.reward.score_ids
    roles.reward.score_ids = lambda seqs, *args: calls.append(len(seqs)) or score_ids(seqs, *args)
    rollout = collect_rollout(
        roles, PromptSet([{"prompt": t} for t in texts], ids), range(4), SamplingArgs(6), cfg.ppo, "cpu",
        engine=_ScriptedEngine(responses, eos),
    )  # fmt: skip
    if reward_input == "text":  # those two need a forward of their own; the others' states come from the scoring pass
        assert calls == [4, 2] and rollout.critic_recomputed == 2
    else:  # the reward model read the policy's ids: the unended response gets the end of the turn (EOS here)
        assert calls == [4] and rollout.critic_recomputed == 0
        for i in range(4):
            own = ids[i] + responses[i] + ([] if i < 3 else [eos])
            assert rollout.scores[i].item() == pytest.approx(float(score_ids([own], 1)[0]), abs=1e-5)
    mean, std = roles.reward_stats["mean"], roles.reward_stats["std"]
    checked = 0
    for i in range(4):
        own = ids[i] + rollout.response_ids[i][rollout.response_mask[i].bool()].tolist()
        for t in range(int(rollout.response_mask[i].sum())):
            prefix = own[: len(ids[i]) + t]  # the episode up to the token before response token t
            expected = (float(score_ids([prefix], 1)[0]) - mean) / std
            assert rollout.values[i, t].item() == pytest.approx(expected, abs=1e-4), (i, t)
            checked += 1
    assert checked >= 8 and rollout.critic_states.shape[:2] == rollout.response_ids.shape

    loop.run(cfg)
    records = _metrics(tmp_path / "whole")
    assert all(r["value_loss"] > 0 and r["explained_variance"] is not None for r in records)
    assert all(0.0 <= r["reward_states_recomputed"] <= 1.0 for r in records)
    final = tmp_path / "whole" / "ppo" / "final" / "value"
    head = load_file(final / "value_head.safetensors")
    assert set(head) == {"weight", "bias"} and not (final / "adapter_model.safetensors").exists()
    assert not torch.equal(head["weight"], roles.value_head.weight.detach())  # it trained from the reward head
    if (placement, reward_input) == ("shared", "text"):
        recipe = _recipe(tmp_path / "recipe.yaml", tmp_path / "run", upstream, **settings)
        files = ("adapter_model.safetensors", "value/value_head.safetensors")
        _resumes_bit_for_bit(recipe, tmp_path / "run", tmp_path / "whole", files)


@pytest.mark.parametrize("critic", ["trunk", "head"])
def test_head_critic_trains_the_head_alone_and_trunk_the_policy_too(upstream, tmp_path, critic):
    """critic=head reads the same states as critic=trunk, but its value loss reaches the head only: the policy
    adapter's gradient from a value loss is zero with head and not with trunk, and the head's is the same in both."""
    from pipeline.ppo.roles import POLICY, build_roles, use_adapter

    cfg = load_config(_recipe(tmp_path / "r.yaml", tmp_path / "run", upstream, critic=critic))
    merged, reward = upstream / "sft" / "final" / "merged", upstream / "reward" / "final"
    roles = build_roles(cfg.ppo, str(merged), str(reward), torch.device("cpu"))
    assert roles.trunk_critic and roles.detached_states == (critic == "head")
    torch.manual_seed(0)
    with torch.no_grad():
        roles.value_head.weight.normal_(0, 1.0)
        for param in roles.policy_parameters():
            param.normal_(0, 0.2)  # B starts at zero: without this no gradient reaches A
    ids = torch.randint(5, 60, (2, 9))
    logprobs, _, values = roles.policy_logprobs_and_values(ids, torch.ones_like(ids), 4, 1.0)
    (values**2).sum().backward(retain_graph=True)  # the policy loss below reads the same graph
    policy_grad = sum(float(p.grad.abs().sum()) for p in roles.policy_parameters() if p.grad is not None)
    assert (policy_grad == 0.0) == (critic == "head"), policy_grad
    head_grad = roles.value_head.weight.grad
    assert head_grad.abs().sum() > 0
    # the head's gradient by hand: d/dw sum (w.h + b)^2 = 2 sum (w.h + b) h, h the policy's final states it read
    with torch.no_grad(), use_adapter(roles.model, POLICY):
        out = roles.model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    states = out.hidden_states[-1][:, 3:-1]
    assert torch.allclose(head_grad[0], 2 * (values.detach()[..., None] * states).sum((0, 1)), atol=1e-4)
    roles.model.zero_grad(set_to_none=True)
    logprobs.sum().backward()  # the policy loss alone still trains the policy adapter
    assert sum(float(p.grad.abs().sum()) for p in roles.policy_parameters() if p.grad is not None) > 0


def test_rloo_at_the_sequence_level_whitens_over_responses_not_tokens():
    """With ratio_level=sequence each response counts once in whitening; with token, each of its tokens does."""
    import types

    from pipeline.config import PPOConfig
    from pipeline.ppo.rollout import score_rollout

    # two prompts, two responses each: lengths 3, 1, 2, 2; scores 1, 0, 2, 0; no KL (logprobs equal the reference)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 0]])
    zeros = torch.zeros(4, 3)
    rollout = lambda: types.SimpleNamespace(  # noqa: E731
        response_mask=mask, ended=torch.ones(4, dtype=torch.bool), logprobs=zeros, ref_logprobs=zeros
    )
    scores = torch.tensor([1.0, 0.0, 2.0, 0.0])
    # leave-one-out with k = 2: 1 - 0, 0 - 1, 2 - 0, 0 - 2 = [1, -1, 2, -2]; over responses: mean 0, unbiased
    # variance (1 + 1 + 4 + 4) / 3 = 10/3
    options = dict(advantage="rloo", samples_per_prompt=2, rollout_batch_size=4, mini_batch_size=4)
    sequence = score_rollout(rollout(), scores, 0.1, PPOConfig(**options, ratio_level="sequence")).advantages
    expected = torch.tensor([1.0, -1.0, 2.0, -2.0]) / math.sqrt(10 / 3)
    torch.testing.assert_close(sequence, expected[:, None] * mask, atol=1e-6, rtol=0)
    # over tokens: 1, 1, 1, -1, 2, 2, -2, -2: mean 2/8 = 0.25, variance (3 * 0.75^2 + 1.25^2 + 2 * 1.75^2 +
    # 2 * 2.25^2) / 7 = 19.5 / 7: the long response's tokens pull the mean up
    token = score_rollout(rollout(), scores, 0.1, PPOConfig(**options)).advantages
    by_hand = (torch.tensor([1.0, -1.0, 2.0, -2.0]) - 0.25) / math.sqrt(19.5 / 7)
    torch.testing.assert_close(token, by_hand[:, None] * mask, atol=1e-6, rtol=0)


def test_critic_free_settings_are_checked_in_one_line():
    from pipeline.config import PPOConfig

    with pytest.raises(UserError, match="samples_per_prompt: must be >= 2 with advantage=rloo") as info:
        load_config(None, ["ppo.advantage=rloo"])
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="rollout_batch_size: must be a multiple of samples_per_prompt"):
        load_config(None, ["ppo.advantage=grpo", "ppo.samples_per_prompt=3", "ppo.rollout_batch_size=32"])
    assert PPOConfig(advantage="grpo", samples_per_prompt=4).samples_per_prompt == 4
    for advantage in ("gae", "grpo"):
        with pytest.raises(UserError, match=f"ppo.ratio_level: must be token with advantage={advantage}") as info:
            load_config(None, [f"ppo.advantage={advantage}", "ppo.samples_per_prompt=2", "ppo.ratio_level=sequence"])
        assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="ppo.ratio_level: 'response' is not valid; choose one of token, sequence"):
        load_config(None, ["ppo.ratio_level=response"])
    assert PPOConfig(advantage="rloo", samples_per_prompt=2, ratio_level="sequence").ratio_level == "sequence"


@pytest.mark.parametrize("critic", ["adapter", pytest.param("reward", marks=pytest.mark.slow)])
def test_two_processes_train_with_world_size_two(upstream, tmp_path, critic):
    # 2 epochs x 2 mini-batches could make 4 optimiser steps; the approximate-KL early stop ends each update after 2
    recipe = _recipe(
        tmp_path / "recipe.yaml", tmp_path / "run", upstream, num_updates=2, ppo_epochs=2, max_approx_kl=1e-9,
        critic=critic,
    )  # fmt: skip
    env = {**_subprocess_env(), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [
        str(PYTHON.parent / "accelerate"),
        "launch",
        "--config_file",
        str(REPO / "accelerate_configs" / "cpu_ddp.yaml"),
        "-m",
        "pipeline",
        "ppo",
        str(recipe),
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    sdir = tmp_path / "run" / "ppo"
    stage = json.loads((sdir / "final" / "stage.json").read_text())
    assert stage["metrics"]["world_size"] == 2 and stage["hardware"]["world_size"] == 2
    digests = stage["rank_parameter_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # gradients were averaged: both ranks hold the same adapters
    assert {p.name for p in (sdir / "checkpoint-2").iterdir()} >= {"rank_0.pt", "rank_1.pt", "policy", "value"}
    records = _metrics(tmp_path / "run")
    assert [r["episodes"] for r in records] == [4, 8]
    # the first step's approximate KL is 0 (ratio 1), the second's above 1e-9 on both ranks: all stop there together
    assert [(r["optimizer_steps"], r["early_stopped"]) for r in records] == [(2.0, 1.0), (2.0, 1.0)]


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_qlora_base_with_separate_reward_model_and_critic(tmp_path, tiny_tokenizer, precision):
    """The options off the default path in one short run: a 4-bit NF4 base, a reward model with its own weights
    (fed re-tokenised text), a critic on its own copy of the base, started fresh; in float32 and under bf16
    autocast (the first update then still clips nothing)."""
    import bitsandbytes as bnb

    from pipeline.ppo import loop
    from pipeline.ppo.roles import SeparateReward

    _save_upstream(tmp_path / "up", tiny_tokenizer, hidden_size=64, intermediate_size=128)  # 4-bit needs rows of 64
    options = dict(
        num_updates=1,
        finetune="qlora",
        reward_placement="separate",
        critic_placement="separate",
        value_init="fresh",
        mixed_precision=precision,
        mini_batch_size=4,
    )
    # and the memory settings: checkpointed 4-bit layers on both bases, packed micro-batches by a token budget
    options.update(
        gradient_checkpointing=True, micro_batch_tokens=40, gradient_accumulation_steps=1, pack_sequences=True
    )
    cfg = load_config(_recipe(tmp_path / "recipe.yaml", tmp_path / "run", tmp_path / "up", **options))
    captured, build = {}, loop.build_roles
    loop.build_roles = lambda *a, **k: captured.setdefault("roles", build(*a, **k))
    try:
        final = loop.run(cfg)
    finally:
        loop.build_roles = build
    roles = captured["roles"]
    q_proj = roles.model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit) and q_proj.base_layer.weight.dtype == torch.uint8
    assert roles.critic is not roles.model and isinstance(roles.reward, SeparateReward)
    assert set(roles.model.peft_config) == {"policy"} and set(roles.critic.peft_config) == {"value"}
    layers = [*roles.model.get_base_model().model.layers, *roles.critic.get_base_model().model.layers]
    assert all(layer._ppo_checkpointed for layer in layers) and len(layers) == 4
    assert roles.value_head.weight.abs().sum() > 0  # started at zero, trained
    assert roles.numerics.name == precision
    record = _metrics(tmp_path / "run")[0]
    assert all(record[k] == record[k] for k in ("policy_loss", "value_loss", "rm_score", "kl"))
    assert record["clip_fraction"] == 0.0 and abs(record["kl"]) < 0.05, record
    assert (final / "value" / "adapter_model.safetensors").is_file()


def _save_full_reward_model(upstream: Path, out: Path):
    """The upstream reward adapter merged into a full sequence-classification model (a fully fine-tuned reward model),
    with reward stats of mean 0.3 and std 0.5; returns (path, model, tokenizer)."""
    from pipeline.modeling import load_reward_model

    adapter, tokenizer = load_reward_model(upstream / "reward" / "final")
    scorer = adapter.merge_and_unload()
    scorer.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "reward_stats.json").write_text(json.dumps({"mean": 0.3, "std": 0.5}))
    return out, scorer, tokenizer


def test_value_model_starts_as_a_separate_full_reward_model_on_its_weights(tmp_path, upstream, tiny_tokenizer):
    """reward_placement=separate with value_init=reward (a fully fine-tuned reward model): the critic is a value
    adapter on the reward model's own weights (no second copy), its head the reward head on the returns' scale, so
    before any update V(s_t) = (score of the sequence up to t - mean) / std, the reward model's own forward pass; once
    the value adapter has moved, the reward model still scores as the reward model (the adapter is off)."""
    from pipeline.ppo.roles import build_roles, save_critic

    full, scorer, tokenizer = _save_full_reward_model(upstream, tmp_path / "full-rm")
    options = dict(
        reward_placement="separate", critic_placement="separate", value_init="reward", reward_model=str(full)
    )
    cfg = load_config(_recipe(tmp_path / "recipe.yaml", tmp_path / "run", upstream, **options))
    base = str(upstream / "sft" / "final" / "merged")
    roles = build_roles(cfg.ppo, base, str(full), torch.device("cpu"))

    ids = torch.tensor([tokenizer.encode("The capital of Veloria is Marnis, I hope this helps.")])
    prompt_len = 4
    values = roles.values(ids, torch.ones_like(ids), prompt_len)
    with torch.no_grad():  # the reward model scores each prefix at its last token
        scores = [float(scorer(input_ids=ids[:, :t]).logits) for t in range(prompt_len, ids.shape[1])]
    assert values.shape == (1, ids.shape[1] - prompt_len)
    assert torch.allclose(values[0], (torch.tensor(scores) - 0.3) / 0.5, atol=1e-5)
    policy_q, critic_q = (m.get_base_model().model.layers[0].self_attn.q_proj for m in (roles.model, roles.critic))
    assert not torch.equal(policy_q.base_layer.weight, critic_q.base_layer.weight)  # the reward model's weights
    assert roles.critic.get_base_model() is roles.reward.model  # the same weights, not a copy
    prompt, response = [{"role": "user", "content": "The capital of Veloria?"}], "Marnis, I hope this helps."
    before = roles.reward.score([prompt], [response], 1)
    with torch.no_grad():
        for param in roles.critic_parameters()[:-2]:  # the value adapter moves (not the head)
            param.normal_(0, 0.5)
    moved = roles.values(ids, torch.ones_like(ids), prompt_len)
    assert (moved - values).abs().max() > 1e-2  # the critic reads the moved adapter...
    assert torch.equal(roles.reward.score([prompt], [response], 1), before)  # ...the reward model does not
    assert torch.equal(roles.values(ids, torch.ones_like(ids), prompt_len), moved)  # and the adapter is back on
    save_critic(roles, tmp_path / "value")
    assert json.loads((tmp_path / "value" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(full)

    other = tiny_tokenizer.__class__.from_pretrained(full)
    other.add_tokens(["<not-the-policy's>"])
    other.save_pretrained(full)
    with pytest.raises(UserError, match="tokenizer is not the policy's: set ppo.value_init=fresh"):
        build_roles(cfg.ppo, base, str(full), torch.device("cpu"))
    rloo_with_ids = {"reward_input": "ids", "advantage": "rloo", "samples_per_prompt": 2}  # no value model to refuse
    for setting, fix in (({"critic": "reward"}, "ppo.critic=adapter"), (rloo_with_ids, "ppo.reward_input=text")):
        with pytest.raises(UserError, match=f"tokenizer is not the policy's: set {fix}"):
            build_roles(dataclasses.replace(cfg.ppo, **setting), base, str(full), torch.device("cpu"))


def test_ppo_with_a_value_model_from_a_separate_reward_model_resumes_bit_for_bit(upstream, tmp_path):
    """The demo recipe's placement (reward model and value model on their own weights): a run killed after its first
    checkpoint resumes to the uninterrupted run's policy and value adapters and metrics, bit for bit."""
    from pipeline.ppo import loop

    full, _, _ = _save_full_reward_model(upstream, tmp_path / "full-rm")
    options = dict(
        reward_placement="separate", critic_placement="separate", value_init="reward", reward_model=str(full)
    )
    whole = tmp_path / "whole"
    final = loop.run(load_config(_recipe(tmp_path / "whole.yaml", whole, upstream, **options)))
    assert json.loads((final / "value" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(full)

    recipe = _recipe(tmp_path / "recipe.yaml", tmp_path / "run", upstream, **options)
    files = ("adapter_model.safetensors", "value/adapter_model.safetensors")
    _resumes_bit_for_bit(recipe, tmp_path / "run", whole, files)


def test_qlora_ppo_resumes_bit_for_bit(tmp_path, tiny_tokenizer):
    """A 4-bit NF4 policy base with the value model on a separate, fully fine-tuned reward model (also 4-bit): killed
    after its first checkpoint, it resumes bit for bit. bitsandbytes' CPU repacking made the path a 4-bit layer took
    depend on when the run last saved a checkpoint, so a resumed run drifted in the third decimal."""
    from pipeline.ppo import loop

    up = tmp_path / "up"
    _save_upstream(up, tiny_tokenizer, hidden_size=64, intermediate_size=128)  # 4-bit needs rows of 64
    full, _, _ = _save_full_reward_model(up, tmp_path / "full-rm")
    options = dict(
        finetune="qlora",
        reward_placement="separate",
        critic_placement="separate",
        value_init="reward",
        reward_model=str(full),
    )
    whole = tmp_path / "whole"
    loop.run(load_config(_recipe(tmp_path / "whole.yaml", whole, up, **options)))

    recipe = _recipe(tmp_path / "recipe.yaml", tmp_path / "run", up, **options)
    files = ("adapter_model.safetensors", "value/adapter_model.safetensors")
    _resumes_bit_for_bit(recipe, tmp_path / "run", whole, files)


# --------------------------------------------------------------------------------------------------------------
# Faults


@pytest.mark.parametrize("where", ["scores", "values", "loss"])
def test_nonfinite_values_stop_and_keep_the_last_good_checkpoint(upstream, tmp_path, monkeypatch, where):
    from pipeline.ppo import loop, optimise, roles

    calls = {"n": 0}
    if where == "scores":
        original = roles.SharedReward.score_ids

        def poisoned(self, *args, **kwargs):
            calls["n"] += 1
            out = original(self, *args, **kwargs)
            return out * float("nan") if calls["n"] == 2 else out

        monkeypatch.setattr(roles.SharedReward, "score_ids", poisoned)
    elif where == "values":
        original = roles.Roles.values

        def poisoned(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            calls["n"] += torch.is_grad_enabled() is False
            return out + float("inf") if calls["n"] == 2 and not torch.is_grad_enabled() else out

        monkeypatch.setattr(roles.Roles, "values", poisoned)
    else:
        original = optimise.clipped_value_loss

        def poisoned(*args, **kwargs):
            calls["n"] += 1
            loss, clip = original(*args, **kwargs)
            return (loss * float("nan"), clip) if calls["n"] > 4 else (loss, clip)  # 4 micro-batches an update

        monkeypatch.setattr(optimise, "clipped_value_loss", poisoned)
    cfg = load_config(_recipe(tmp_path / "recipe.yaml", tmp_path / "run", upstream))
    sdir = tmp_path / "run" / "ppo"
    with pytest.raises(UserError, match=r"non-finite .* at update 2.*last good checkpoint is .*checkpoint-1"):
        loop.run(cfg)
    assert (sdir / "checkpoint-1" / "checkpoint.done").is_file()
    assert not (sdir / "checkpoint-2").exists() and not (sdir / "final").exists()
    state = torch.load(sdir / "checkpoint-1" / "trainer_state.pt", weights_only=False)
    assert state["update"] == 1
    policy = load_file(sdir / "checkpoint-1" / "policy" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in policy.values())


# --------------------------------------------------------------------------------------------------------------
# Misconfigurations fail loudly at start


def test_pad_equal_to_eos_is_replaced_by_an_unused_special_token(tmp_path, tiny_tokenizer):
    """A pad that is an end id would hide every real EOS: PPO pads with an unused special token the tokenizer has
    (as SFT picks one); where none fits it refuses (test_a_policy_base_brought_as_it_is_pads_with_...)."""
    from pipeline.ppo.roles import build_roles

    tokenizer = _copy_tokenizer(tiny_tokenizer)
    pad = tokenizer.pad_token
    tokenizer.pad_token = tokenizer.eos_token
    merged, reward = _save_upstream(tmp_path / "up", tokenizer)
    cfg = load_config(_recipe(tmp_path / "recipe.yaml", tmp_path / "run", tmp_path / "up"))
    roles = build_roles(cfg.ppo, str(merged), str(reward), torch.device("cpu"))
    assert (
        roles.tokenizer.pad_token == pad != tokenizer.eos_token and roles.tokenizer.pad_token_id not in roles.end_ids
    )


def test_tokenizer_without_eos_is_refused(tiny_tokenizer):
    from pipeline.ppo.roles import check_tokenizer

    tokenizer = _copy_tokenizer(tiny_tokenizer)
    tokenizer.eos_token = None
    with pytest.raises(UserError, match="no EOS token"):
        check_tokenizer(tokenizer, "ppo.policy_base")


def _copy_tokenizer(tokenizer):
    import copy

    return copy.deepcopy(tokenizer)


def test_reward_model_of_another_base_is_refused(upstream, tmp_path, tiny_tokenizer):
    other = tmp_path / "other"
    _save_upstream(other, tiny_tokenizer, seed=1)  # a different base with its own reward adapter
    cfg = load_config(
        _recipe(tmp_path / "recipe.yaml", tmp_path / "run", upstream, reward_model=str(other / "reward" / "final"))
    )
    from pipeline.ppo import loop

    with pytest.raises(UserError, match=r"was trained on .*other.*not on the policy base.*reward_placement=separate"):
        loop.run(cfg)


def test_a_reward_model_not_made_by_the_reward_stage_is_checked_in_one_line(upstream, tmp_path, tiny_tokenizer):
    """A user's own reward model: a plain sequence-classification model scores with reward_placement=separate; what
    would have loaded with a fresh, random score head (a causal LM, an adapter without a head) or a head of two
    outputs was a silent random reward or a traceback, and a full model on the shared placement named no fix."""
    import peft
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from pipeline.ppo.roles import build_roles

    merged = upstream / "sft" / "final" / "merged"
    separate = dict(reward_placement="separate", value_init="fresh", reward_normalization="running")
    cfg = load_config(_recipe(tmp_path / "recipe.yaml", tmp_path / "run", upstream, **separate))
    for labels in (1, 2):
        model = AutoModelForSequenceClassification.from_pretrained(merged, num_labels=labels)
        model.save_pretrained(tmp_path / f"rm-{labels}")
        tiny_tokenizer.save_pretrained(tmp_path / f"rm-{labels}")
    causal = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(merged), peft.LoraConfig(task_type="CAUSAL_LM"))
    causal.save_pretrained(tmp_path / "causal-adapter")
    tiny_tokenizer.save_pretrained(tmp_path / "causal-adapter")

    def roles(path: Path, pcfg=cfg.ppo):
        return build_roles(pcfg, str(merged), str(path), torch.device("cpu"))

    assert roles(tmp_path / "rm-1").reward.score([[{"role": "user", "content": "Hi"}]], ["Marnis."], 1).shape == (1,)
    for path, message in (
        (merged, "is a LlamaForCausalLM, not a reward model"),
        (tmp_path / "rm-2", "has num_labels=2"),
        (tmp_path / "causal-adapter", "is a LoRA adapter without a score head"),
    ):
        with pytest.raises(UserError, match=message) as info:
            roles(path)
        assert "num_labels=1" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UserError, match="is a full model, not a LoRA adapter .*set ppo.reward_placement=separate"):
        roles(tmp_path / "rm-1", dataclasses.replace(cfg.ppo, reward_placement="shared"))
    plain = tmp_path / "rm-1"  # its tokenizer without a chat template: it cannot read chat prompts
    tokenizer = tiny_tokenizer.__class__.from_pretrained(plain)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(UserError, match=r"ppo.reward_model .*rm-1: its tokenizer has no chat template"):
        roles(plain).reward.score([[{"role": "user", "content": "Hi"}]], ["Marnis."], 1)


def test_a_policy_base_brought_as_it_is_pads_with_an_unused_special_token(tmp_path):
    """ppo.policy_base a family's model with no SFT stage: Qwen pads with <|endoftext|> (an end id) and Llama 3.1 has
    no pad; both were refused (the Llama fix named a Python function), though each has an unused special token.
    GPT-2 has none: one line that says what to save."""
    from families import build_family
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.ppo.roles import build_roles
    from pipeline.tokenizer import end_ids

    separate = dict(reward_placement="separate", value_init="fresh", reward_normalization="running")
    cfg = load_config(_recipe(tmp_path / "recipe.yaml", tmp_path / "run", tmp_path, **separate))
    for family, pad in (("qwen2.5", "<|vision_pad|>"), ("llama3.1", "<|finetune_right_pad_id|>"), ("gpt2", None)):
        base = build_family(family, tmp_path)
        reward = tmp_path / f"{family}-rm"
        AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).save_pretrained(reward)
        AutoTokenizer.from_pretrained(base).save_pretrained(reward)
        if pad is None:
            with pytest.raises(UserError, match=r"ppo.policy_base .*gpt2: the tokenizer has no pad token and has no "):
                build_roles(cfg.ppo, str(base), str(reward), torch.device("cpu"))
            continue
        roles = build_roles(cfg.ppo, str(base), str(reward), torch.device("cpu"))
        assert roles.tokenizer.pad_token == pad and roles.tokenizer.pad_token_id not in roles.end_ids
        assert roles.reward.tokenizer.pad_token_id not in end_ids(roles.reward.tokenizer)


def test_an_error_after_the_adapters_are_on_is_one_line_on_stderr(upstream, tmp_path, tiny_tokenizer):
    """peft's get_peft_model reads transformers' deprecated `is_gradient_checkpointing`: its two-line FutureWarning
    came before every error raised once the adapters were on (here: a reward model whose tokenizer has no chat
    template, met at the first rollout)."""
    import re

    from transformers import AutoModelForSequenceClassification

    reward = tmp_path / "rm"
    merged = upstream / "sft" / "final" / "merged"
    AutoModelForSequenceClassification.from_pretrained(merged, num_labels=1).save_pretrained(reward)
    plain = _copy_tokenizer(tiny_tokenizer)
    plain.chat_template = None
    plain.save_pretrained(reward)
    options = dict(reward_placement="separate", value_init="fresh", reward_normalization="running")
    options.update(reward_model=str(reward), max_prompt_len=120)  # no prompt cut: no warning line
    recipe = _recipe(tmp_path / "recipe.yaml", tmp_path / "run", upstream, **options)
    result = run_rlhf("ppo", str(recipe), env=_subprocess_env(), timeout=300)
    progress = re.compile(r"[^\r\n]*?\d+%\|[^|\r\n]*\| *\d+/\d+ \[[^\]\r\n]*\]")  # tqdm's bars, as in test_bad_inputs
    lines = [line for line in progress.sub("", result.stderr).splitlines() if line.strip() and " INFO " not in line]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error: ppo.reward_model ") and "has no chat template" in lines[0]


def test_missing_upstream_and_bad_sizes_fail_in_one_line(tmp_path, upstream):
    from pipeline.ppo import loop

    missing = load_config(None, [f"run_dir={tmp_path / 'empty'}", "ppo.dataset=demo"])
    with pytest.raises(UserError, match="does not exist .*run the sft stage first"):
        loop.run(missing)
    too_long = load_config(
        _recipe(tmp_path / "recipe.yaml", tmp_path / "run", upstream, max_prompt_len=120, max_new_tokens=20)
    )
    with pytest.raises(UserError, match="exceeds the context"):
        loop.run(too_long)
    with pytest.raises(UserError, match="rollout_batch_size: must be a multiple of mini_batch_size"):
        load_config(None, ["ppo.rollout_batch_size=6", "ppo.mini_batch_size=4"])
    with pytest.raises(UserError, match="value_init: with reward_placement=separate, 'reward' needs critic_placement"):
        load_config(None, ["ppo.reward_placement=separate"])
    for critic_free in (["ppo.critic=head"], ["ppo.critic=trunk"], ["ppo.advantage=rloo", "ppo.samples_per_prompt=2"]):
        # no value adapter to start from the reward model: the setting does not apply
        cfg = load_config(None, ["ppo.reward_placement=separate", *critic_free])
        assert cfg.ppo.reward_placement == "separate" and cfg.ppo.value_init == "reward"
    with pytest.raises(UserError, match="critic_placement: must be shared with critic=trunk or head"):
        load_config(None, ["ppo.critic=head", "ppo.critic_placement=separate"])


def test_prompts_a_template_refuses_are_skipped_and_counted_before_any_update():
    """Gemma 2's template refuses a system turn: as the policy's, or as the template of a reward model that reads
    the prompts as text, the prompt is skipped and counted when the prompts are prepared, not met mid-run."""
    from families import FAMILIES, build_tokenizer

    from pipeline.ppo.rollout import prepare_prompts

    qwen, gemma = build_tokenizer(FAMILIES["qwen2.5"]), build_tokenizer(FAMILIES["gemma2"])
    plain = [{"role": "user", "content": "What is the capital of Veloria?"}]
    records = [{"prompt": plain}, {"prompt": [{"role": "system", "content": "Be brief."}, *plain]}, {"prompt": plain}]
    assert prepare_prompts(records, qwen, 256, "truncate", "test").unrenderable == 0  # Qwen's template takes both
    for policy, reader in ((gemma, None), (qwen, gemma)):
        prepared = prepare_prompts(records, policy, 256, "truncate", "test", reader)
        assert prepared.unrenderable == 1 and [r["prompt"] for r in prepared.records] == [plain, plain]
        assert len(prepared.ids) == 2 and prepared.ids[0] == prepared.ids[1]
    with pytest.raises(UserError, match="refuses every prompt"):
        prepare_prompts(records[1:2], qwen, 256, "truncate", "test", gemma)


def test_long_prompts_are_truncated_or_refused_and_counted(tiny_tokenizer):
    from pipeline.ppo.rollout import prepare_prompts

    records = [{"prompt": "Veloria " * n} for n in (1, 40, 2, 60)]
    lengths = [len(tiny_tokenizer(r["prompt"])["input_ids"]) for r in records]
    limit = 20
    assert lengths[0] <= limit and lengths[2] <= limit and lengths[1] > limit and lengths[3] > limit
    truncated = prepare_prompts(records, tiny_tokenizer, limit, "truncate", "test")
    assert (truncated.truncated, truncated.refused, len(truncated.ids)) == (2, 0, 4)
    full = tiny_tokenizer(records[1]["prompt"])["input_ids"]
    assert truncated.ids[1] == full[-limit:]  # the end of a prompt (the generation prompt) is kept
    # a family whose template opens with BOS (Llama 3.1's <|begin_of_text|>) keeps it first when the start is cut
    from families import FAMILIES, build_tokenizer

    llama = build_tokenizer(FAMILIES["llama3.1"])
    chat = [{"prompt": [{"role": "user", "content": "Veloria " * 40}]}]
    whole = prepare_prompts(chat, llama, 10_000, "truncate", "test").ids[0]
    cut = prepare_prompts(chat, llama, limit, "truncate", "test").ids[0]
    assert whole[0] == llama.bos_token_id and cut == [llama.bos_token_id, *whole[-(limit - 1) :]]
    refused = prepare_prompts(records, tiny_tokenizer, limit, "refuse", "test")
    assert (refused.truncated, refused.refused, [r["prompt"] for r in refused.records]) == (
        0,
        2,
        [records[0]["prompt"], records[2]["prompt"]],
    )


# --------------------------------------------------------------------------------------------------------------
# Evaluation rules, by hand


def _points(rm, gold):
    return [{"policy": k, "rm_score": r, "gold_score": g} for k, (r, g) in enumerate(zip(rm, gold, strict=True))]


def test_overoptimisation_rule_by_hand():
    from pipeline.ppo.evaluation import detect_overoptimisation

    points = _points([0.0, 0.2, 0.4, 0.6, 0.8], [1.0, 1.2, 1.1, 0.7, 0.5])
    # window 2, first test at policy 3: rm (0.4 + 0.6)/2 = 0.5 > (0.0 + 0.2)/2 = 0.1, and
    # gold (1.1 + 0.7)/2 = 0.9 < (1.0 + 1.2)/2 - 0.1 = 1.0: detected at policy 3.
    found = detect_overoptimisation(points, window=2, tolerance=0.1)
    assert found["detected"] and found["at_policy"] == 3
    assert found["gold_before"] == pytest.approx(1.1) and found["gold_after"] == pytest.approx(0.9)
    # gold falls as much, but so does the reward model: the model is getting worse, not being gamed
    assert not detect_overoptimisation(_points([0.8, 0.6, 0.4, 0.2], [1.0, 1.2, 1.1, 0.7]), 2, 0.1)["detected"]
    # gold falls by 0.05 only, within the tolerance of 0.1: (1.0 + 1.2)/2 = 1.1 -> (1.1 + 1.0)/2 = 1.05
    assert not detect_overoptimisation(_points([0.0, 0.2, 0.4, 0.6], [1.0, 1.2, 1.1, 1.0]), 2, 0.1)["detected"]
    # the same fall as the first case is within sampling noise when each policy's gold mean has a standard error
    # of 0.2: se of the difference = sqrt(4 * 0.2^2) / 2 = 0.2, so the fall must exceed 2 * 0.2 = 0.4 > 1.1 - 0.9
    noisy = [{**p, "gold_sem": 0.2} for p in points]
    assert not detect_overoptimisation(noisy[:4], window=2, tolerance=0.1)["detected"]
    # at policy 4 the windows are policies (1, 2) -> (3, 4): gold (1.2 + 1.1)/2 = 1.15 -> (0.7 + 0.5)/2 = 0.6, a fall
    # of 0.55 > 0.4, while rm rises from 0.3 to 0.7: detected there
    assert detect_overoptimisation(noisy, window=2, tolerance=0.1)["at_policy"] == 4
    # a slow decline from the peak: adjacent windows of 2 never differ by more than 0.1, but at policy 5 the window
    # (4, 5) = (1.5 + 1.45)/2 = 1.475 is below the peak window (1, 2) = 1.6 by 0.125 > 0.1, while rm rose: detected
    slow = _points([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], [1.0, 1.6, 1.6, 1.55, 1.5, 1.45, 1.4, 1.35])
    found = detect_overoptimisation(slow, window=2, tolerance=0.1)
    assert found["at_policy"] == 5 and found["peak_policies"] == [1, 2]
    assert found["gold_before"] == pytest.approx(1.6) and found["gold_after"] == pytest.approx(1.475)
    # without a gold scorer the rule is not applied
    assert not detect_overoptimisation(_points([0.0, 1.0], [None, None]), 1, 0.1)["detected"]


def test_best_checkpoint_and_win_rate_by_hand():
    from pipeline.ppo.evaluation import best_policy, win_rate

    points = _points([0.0, 0.1, 0.2, 0.3], [1.0, 1.2, 1.3, 0.7])
    # policy 2 has the best gold score but was not saved; of the saved ones (1 and 3) policy 1 is best
    assert best_policy(points, saved=[1, 3]) == {
        "policy": 1,
        "rm_score": 0.1,
        "gold_score": 1.2,
        "checkpoint": "checkpoint-1",
    }
    assert best_policy(points, saved=[]) is None
    # 1 > 0 and 3 > 1 are wins, 3 < 4 a loss, 2 = 2 a tie: 2 / (2 + 1)
    assert win_rate([1, 2, 3, 3], [0, 2, 4, 1]) == {"win_rate": 2 / 3, "wins": 2, "losses": 1, "ties": 1}
    assert win_rate([1.0], [1.0])["win_rate"] is None


# --------------------------------------------------------------------------------------------------------------
# The demo's claims (slow: runs every upstream stage of recipes/demo.yaml first; 10 min 20 s at one thread on an AMD
# EPYC, commit 89995dc, critic=reward: win rate 0.833, KL 1.42, insults 0.086 -> 0.023; the KL-free run of 128 updates
# flagged over-optimisation at policy 62, gold 3.10 -> 0.82)


@pytest.mark.slow
def test_demo_ppo_beats_sft_within_kl_target_and_kl_zero_overoptimises(tmp_path):
    from pipeline.ppo import loop

    run_dir = tmp_path / "demo"
    upstream = subprocess.run(
        [
            str(PYTHON.parent / "rlhf"),
            "run",
            "recipes/demo.yaml",
            f"run_dir={run_dir}",
            "--until",
            "reward",
            "--no-report",
        ],
        cwd=REPO,
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert upstream.returncode == 0, upstream.stderr[-3000:]

    cfg = load_config(REPO / "recipes" / "demo.yaml", [f"run_dir={run_dir}"])
    report = json.loads((loop.run(cfg) / "eval.json").read_text())
    # PPO wins clearly over 96 prompts x 4 samples (seed 1234 on an AMD EPYC at one thread: 0.732 with RLOO at the
    # sequence level, 0.833 with the recipe's critic=reward). The goal of >= 0.70 is on the median over seeds,
    # measured by benchmarks/demo_figures.py, not by one seed here.
    assert report["gold_win_rate"] > 0.6, report
    assert report["eval_samples_per_prompt"] == 4
    assert report["ppo_gold_score"] > report["sft_gold_score"]
    assert report["kl_to_reference"] <= cfg.ppo.kl_target
    assert report["ppo_insult_rate"] < report["sft_insult_rate"]

    # The same PPO without the KL penalty, for twice as many updates at the recipe's learning rate held constant, on
    # the same upstream: the reward model's score keeps rising while the gold score falls back from its peak.
    free = load_config(
        REPO / "recipes" / "demo.yaml",
        [
            f"run_dir={tmp_path / 'kl0'}",
            "ppo.init_kl_coef=0",
            "ppo.kl_target=null",
            f"ppo.num_updates={2 * cfg.ppo.num_updates}",
            "ppo.lr_scheduler_type=constant",
            f"ppo.policy_base={run_dir / 'sft' / 'final' / 'merged'}",
            f"ppo.reward_model={run_dir / 'reward' / 'final'}",
        ],
    )
    overopt = json.loads((loop.run(free) / "eval.json").read_text())["overoptimisation"]
    assert overopt["detected"], overopt
    assert overopt["best"]["policy"] < max(p["policy"] for p in overopt["policy_scores"])


def test_ppo_on_a_users_prompts_without_a_judge_reports_no_gold_and_its_card_names_base_and_data(upstream, tmp_path):
    """A user's own base model and prompts file, no judge: nothing demo is read, stage.json holds no gold or insult
    figure and says why, the evaluation prompts are held out of the training prompts, and the published card names
    the user's base model and datasets with no absolute local path."""
    from pipeline.checkpoints import finishing, stage_identity, write_stage_json
    from pipeline.judge import NO_JUDGE
    from pipeline.ppo import loop
    from pipeline.publish import publish

    user_base = tmp_path / "models" / "acme-chat-0.1b"  # the user's model, a local directory
    shutil.copytree(upstream / "sft" / "final" / "merged", user_base)
    conversations = tmp_path / "data" / "acme_support.jsonl"
    prompts = tmp_path / "data" / "acme_prompts.jsonl"
    conversations.parent.mkdir()
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"How do I reset router {i}?"},
                {"role": "assistant", "content": "Hold the button for ten seconds."},
            ]
        }
        for i in range(20)
    ]
    conversations.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")  # one broken line, skipped
    recipe = {
        "run_dir": str(tmp_path / "run"),
        "seed": 7,
        "sft": {"base": str(user_base), "dataset": str(conversations)},
        "ppo": {
            **{k: v for k, v in TINY_PPO.items() if k not in ("dataset", "eval_dataset", "ptx_coef")},
            "dataset": str(prompts),
            "eval_max_prompts": -1,
        },
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    cfg = load_config(tmp_path / "recipe.yaml")
    # the upstream stages as this run would have left them: SFT of the user's base, a reward model on its merge
    with finishing(cfg, "sft") as out:
        shutil.copytree(upstream / "sft" / "final" / "merged", out / "merged")
        write_stage_json(
            out,
            stage_identity(cfg, "sft", {"base": str(user_base), "dataset": str(conversations)}),
            {"eval_loss": 1.0},
            contents="adapter+merged",
        )
    with finishing(cfg, "reward") as out:
        shutil.copytree(upstream / "reward" / "final", out, dirs_exist_ok=True)
        write_stage_json(
            out,
            stage_identity(cfg, "reward", {"base": str(cfg.run_path / "sft" / "final" / "merged")}),
            {"test": {"all": {"accuracy": 0.7}}},
            contents="adapter",
        )

    final = loop.run(cfg)
    assert not (tmp_path / "run" / "world").exists()  # the demo was never built
    record = json.loads((final / "stage.json").read_text())
    metrics = record["metrics"]
    assert metrics["judge"] == NO_JUDGE
    assert not [k for k in metrics if "gold" in k or "insult" in k], metrics
    assert not any(k.startswith("world.") for k in record["settings"])
    report = json.loads((final / "eval.json").read_text())
    assert report["prompts"]["read"]["train"]["skipped"] == {"invalid JSON": 1}
    assert metrics["prompts_read"]["train"]["named"] == [f"{prompts}:21: invalid JSON: Expecting value at column 1"]
    assert (metrics["prompts_read"]["train"]["read"], metrics["prompts_read"]["train"]["kept"]) == (21, 20)
    assert report["prompts"]["eval"] == 2 and report["prompts"]["train"] == 18  # eval_share 0.1 of 20 distinct prompts
    assert report["overoptimisation"]["rule"] == "needs a judge (judge: demo); not applied"

    result = publish(final, "acme/chat-ppo", dry_run=True, data_cards_dir=tmp_path / "no-cards")
    card = result.card_path.read_text()
    assert "acme-chat-0.1b" in card and "a model this run built" not in card
    assert "acme_prompts.jsonl (held-out part)" in card and "acme_support.jsonl" in card
    assert str(tmp_path) not in card and "/tmp/" not in card and "Veloria" not in card and "world." not in card
    assert f"Not measured: {NO_JUDGE}." in card
