"""PPO's numerics and optimiser: one arithmetic for every pass, the critic's own group, the KL horizon, global
whitening. End-to-end runs use the tiny upstream models of tests/test_ppo_stage.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_ppo_stage import _recipe, _save_upstream

from pipeline.config import LoraArgs, PPOConfig, load_config
from pipeline.errors import UserError
from pipeline.ppo.losses import masked_moments, masked_whiten, moments_to_mean_var
from pipeline.ppo.numerics import Numerics, build_numerics, resolve_precision

PROMPTS = ["The capital of", "Veloria exports", "Hello", "What is", "Tell me"]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, tiny_tokenizer) -> Path:
    root = tmp_path_factory.mktemp("numerics-upstream")
    _save_upstream(root, tiny_tokenizer)
    return root


def _roles(upstream: Path, **settings):
    from pipeline.ppo.roles import build_roles

    pcfg = PPOConfig(lora=LoraArgs(r=4, alpha=8), **settings)
    base, reward = upstream / "sft" / "final" / "merged", upstream / "reward" / "final"
    return pcfg, build_roles(pcfg, str(base), str(reward), torch.device("cpu"))


# --------------------------------------------------------------------------------------------------------------
# The setting


def test_precision_comes_from_accelerate_unless_the_recipe_says(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resolve_precision("auto", cpu) == "no"  # a CPU without a setting: float32
    assert resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # accelerate launch --mixed_precision bf16
    assert resolve_precision("auto", cpu) == "bf16"
    assert resolve_precision("no", cpu) == "no"  # the recipe's own setting wins
    assert build_numerics("auto", cpu) == Numerics("cpu", torch.bfloat16)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(UserError, match="accelerate's mixed_precision is fp16, which PPO does not run") as info:
        resolve_precision("auto", cpu)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------------------------
# One arithmetic for every pass


def _sampling_gap(roles, tokenizer, generation: Numerics, training: Numerics) -> float:
    """Mean |log-prob of the sampling pass - log-prob of a training forward| over the sampled tokens, with the
    sampling pass under `generation` and the training forward under `training`."""
    from pipeline.generation import SamplingArgs, sample_ids, tokenize_prompts
    from pipeline.ppo.rollout import episode_inputs

    torch.manual_seed(1)
    with torch.no_grad():
        out = sample_ids(
            roles.generation_model(),
            tokenize_prompts(tokenizer, PROMPTS),
            SamplingArgs(12),
            roles.end_ids,
            tokenizer.pad_token_id,
            8,
            with_logprobs=True,
            precision=generation,
        )
    ids, mask, p_len, r_len = episode_inputs(
        out.prompt_ids, out.prompt_mask, out.response_ids, out.response_mask, torch.arange(len(PROMPTS))
    )
    kept, roles.numerics = roles.numerics, training
    try:
        logprobs, _ = roles.policy_logprobs(ids, mask, p_len, 1.0)  # with gradients, as PPO's update
    finally:
        roles.numerics = kept
    keep = out.response_mask[:, :r_len].bool()
    return float((logprobs.detach() - out.logprobs[:, :r_len])[keep].abs().mean())


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16], ids=["fp32-base", "bf16-base"])
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_sampling_reference_and_training_passes_share_one_arithmetic(
    upstream, tiny_tokenizer, monkeypatch, base_dtype, precision
):
    """A bf16 base with float32 LoRA adapters (peft's default; what a GPU loads) or a float32 base, with or without
    bf16 autocast: the fresh policy's log-probs equal the reference's exactly (KL 0), and a moved policy's sampling
    log-probs equal a training forward's to rounding (ratio 1). The same comparison with the sampling pass under the
    other arithmetic (what PPO did before: autocast for generate only) is several times further off."""
    import pipeline.modeling

    monkeypatch.setattr(pipeline.modeling, "default_dtype", lambda: base_dtype)
    torch.manual_seed(0)
    _, roles = _roles(upstream, mixed_precision=precision)
    assert roles.numerics.name == precision
    assert roles.model.get_base_model().get_input_embeddings().weight.dtype == base_dtype

    from pipeline.generation import left_pad, tokenize_prompts

    ids, mask = left_pad(tokenize_prompts(tiny_tokenizer, PROMPTS), tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        policy, _ = roles.policy_logprobs(ids, mask, 3, 1.0)
        reference = roles.reference_logprobs(ids, mask, 3, 1.0)
    assert torch.equal(policy, reference)  # LoRA B = 0: the same numbers, not merely close

    with torch.no_grad():
        for param in roles.policy_parameters():
            param.normal_(0, 0.3)  # a policy that has moved away from the reference
    same = _sampling_gap(roles, tiny_tokenizer, roles.numerics, roles.numerics)
    other = Numerics("cpu", None if precision == "bf16" else torch.bfloat16)
    mismatched = _sampling_gap(roles, tiny_tokenizer, other, roles.numerics)
    limit = 1e-6 if (precision, base_dtype) == ("no", torch.float32) else 1e-3  # bf16 rounds KV-cache sums apart
    assert same < limit, (same, mismatched)
    assert mismatched > 2.5 * same and mismatched > 1e-3, (same, mismatched)  # measured: 3.5x to 11000x


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_first_update_has_ratio_one_and_kl_zero(upstream, tmp_path, precision):
    """The whole stage, one update: the rollout's log-probs (sampling pass), the reference's and the first
    mini-batch's (training forward) agree, so nothing is clipped and the KL is 0 up to rounding. One mini-batch per
    update, so every figure is of the policy before its first step."""
    from pipeline.ppo import loop

    cfg = load_config(
        _recipe(
            tmp_path / "recipe.yaml",
            tmp_path / "run",
            upstream,
            num_updates=1,
            mixed_precision=precision,
            mini_batch_size=4,
        )
    )
    loop.run(cfg)
    first = json.loads((tmp_path / "run" / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    tol = 1e-5 if precision == "no" else 5e-3
    assert first["clip_fraction"] == 0.0, first
    assert abs(first["approx_kl"]) < tol**2 * 10, first
    assert abs(first["kl"]) < tol * cfg.ppo.max_new_tokens, first


# --------------------------------------------------------------------------------------------------------------
# The critic's own optimiser group


def test_critic_has_its_own_learning_rate_and_clip(upstream):
    """Two AdamW groups under one schedule; clipping the critic's gradient leaves the policy's step unchanged (one
    joint clip, as before, would shrink both)."""
    from pipeline.generation import SamplingArgs, tokenize_prompts
    from pipeline.ppo.optimise import build_optimizer, ppo_update
    from pipeline.ppo.rollout import PromptSet, collect_rollout, normalize_scores, score_rollout

    pcfg, roles = _roles(
        upstream, learning_rate=1e-2, value_learning_rate=3e-3, mini_batch_size=5, rollout_batch_size=5, ppo_epochs=1
    )
    optimizer, scheduler = build_optimizer(pcfg, roles.policy_parameters(), roles.critic_parameters(), 10)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 3e-3]
    assert [len(g["params"]) for g in optimizer.param_groups] == [
        len(roles.policy_parameters()),
        len(roles.critic_parameters()),
    ]
    prompts = PromptSet([{"prompt": t} for t in PROMPTS], tokenize_prompts(roles.tokenizer, PROMPTS))
    torch.manual_seed(2)
    rollout = collect_rollout(roles, prompts, range(5), SamplingArgs(6), pcfg, torch.device("cpu"))
    score_rollout(rollout, normalize_scores(rollout.scores, pcfg, roles.reward_stats, None), 0.05, pcfg)
    start = [p.detach().clone() for p in roles.trainable_parameters()]

    def step(value_clip: float) -> tuple[list[torch.Tensor], dict]:
        with torch.no_grad():
            for p, s in zip(roles.trainable_parameters(), start, strict=True):
                p.copy_(s)
        settings = PPOConfig(**{**pcfg.__dict__, "value_max_grad_norm": value_clip, "max_grad_norm": 1e6})
        opt, sched = build_optimizer(settings, roles.policy_parameters(), roles.critic_parameters(), 10)
        torch.manual_seed(3)
        stats = ppo_update(roles, rollout, settings, opt, sched, None, 1)
        return [p.detach().clone() for p in roles.trainable_parameters()], stats

    loose, loose_stats = step(1e6)
    tight, tight_stats = step(1e-4)
    n_policy = len(roles.policy_parameters())
    for a, b in zip(loose[:n_policy], tight[:n_policy], strict=True):
        assert torch.equal(a, b)  # the policy's step does not depend on the critic's clip
    assert any(not torch.equal(a, b) for a, b in zip(loose[n_policy:], tight[n_policy:], strict=True))
    assert loose_stats["value_grad_norm"] == tight_stats["value_grad_norm"] > 1e-4  # norms before clipping


# --------------------------------------------------------------------------------------------------------------
# The KL controller's horizon and global whitening


def test_default_kl_horizon_lets_the_controller_act_within_a_run():
    """The demo's size of run (40 updates of 32 episodes) with the KL held at twice the target: the default horizon
    (a tenth of the run) lets the coefficient grow about e^2 times; Ziegler et al.'s 10,000 episodes moved it 14 %."""
    from pipeline.ppo.control import AdaptiveKLController
    from pipeline.ppo.loop import kl_horizon

    pcfg = PPOConfig(num_updates=40, rollout_batch_size=32, kl_target=1.0)
    assert kl_horizon(pcfg) == 128
    assert kl_horizon(PPOConfig(kl_horizon=500)) == 500

    def final(horizon: int, kl: float) -> float:
        controller = AdaptiveKLController(0.05, 1.0, horizon)
        for _ in range(pcfg.num_updates):
            controller.update(kl, pcfg.rollout_batch_size)
        return controller.value / 0.05

    assert final(kl_horizon(pcfg), 2.0) == pytest.approx((1 + 0.2 * 32 / 128) ** 40)  # 7.04
    assert final(kl_horizon(pcfg), 2.0) > 6.0 and final(kl_horizon(pcfg), 0.1) < 1 / 5.0
    assert final(10_000, 2.0) < 1.15


def test_whitening_over_every_process_equals_whitening_the_whole_batch():
    """Two processes' halves whitened with their summed moments give the whole batch's whitening (each half
    whitened alone does not)."""
    assert moments_to_mean_var(torch.tensor([3.0, 6.0, 14.0])) == pytest.approx((2.0, 1.0))  # entries 1, 2, 3
    x = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 10.0, 0.0, 0.0], [2.0, 2.0, 5.0, 7.0], [0.5, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    whole = masked_whiten(x, mask)
    halves = (slice(0, 2), slice(2, 4))
    summed = sum(masked_moments(x[h], mask[h]) for h in halves)
    together = torch.cat([masked_whiten(x[h], mask[h], moments=summed) for h in halves])
    assert torch.allclose(together, whole, atol=1e-6)
    alone = torch.cat([masked_whiten(x[h], mask[h]) for h in halves])
    assert not torch.allclose(alone, whole, atol=1e-2)
    # by hand: 3 + 2 + 4 + 1 = 10 entries summing to 6 + 14 + 16 + 0.5 = 36.5
    assert float(summed[0]) == 10 and float(summed[1]) == 36.5


# --------------------------------------------------------------------------------------------------------------
# The lean LoRA forward


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "bf16-base"])
def test_lean_lora_forward_equals_peft_with_gradients(tiny_model, precision):
    """The scaling on the rank-r side and the add fused into B's matmul: peft's outputs and gradients to float
    rounding with the adapter on, exactly peft's with it off. Under bf16 autocast the fused add rounds once where
    peft rounds twice, so there the check is that it is no further from the float32 result than peft is."""
    import contextlib

    from peft import LoraConfig, get_peft_model

    from pipeline.ppo.lean_lora import use_lean_lora

    model = tiny_model.to(torch.bfloat16) if precision == "bf16-base" else tiny_model
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    ids = torch.randint(0, 300, (2, 7))

    def run(autocast: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with cast:
            logits = model(input_ids=ids).logits.float()
        logits.square().mean().backward()
        return logits.detach(), [p.grad.float().clone() for n, p in model.named_parameters() if "lora_" in n]

    def off() -> torch.Tensor:
        with model.disable_adapter(), torch.no_grad():
            return model(input_ids=ids).logits

    autocast = precision == "bf16-autocast"
    exact_logits, exact_grads = run(False)  # peft's forward without autocast
    peft_logits, peft_grads = run(autocast)
    peft_off = off()
    assert use_lean_lora(model) == 14  # 2 layers x 7 linear layers
    lean_logits, lean_grads = run(autocast)
    assert torch.equal(off(), peft_off)
    assert not torch.equal(lean_logits, peft_off.float())  # the adapter is on and matters
    if not autocast:
        tol = 1e-5 if precision == "fp32" else 1e-2
        assert (lean_logits - peft_logits).abs().max() <= tol
        for lean, ref in zip(lean_grads, peft_grads, strict=True):
            assert (lean - ref).abs().max() <= tol * max(1.0, float(ref.abs().max()))
        return
    assert (lean_logits - exact_logits).abs().max() <= (peft_logits - exact_logits).abs().max()
    lean_error = sum(float((a - b).abs().sum()) for a, b in zip(lean_grads, exact_grads, strict=True))
    peft_error = sum(float((a - b).abs().sum()) for a, b in zip(peft_grads, exact_grads, strict=True))
    assert lean_error <= 1.2 * peft_error, (lean_error, peft_error)
