"""The maths of PPO for language models, as small pure tensor functions.

Shapes: `[batch, response_len]` per-token tensors with a 0/1 `mask` of real response tokens (1 up to and including
the first EOS, see `pipeline.generation.mask_after_eos`), and `[batch]` per-response scores.

References: Schulman et al. 2017 (PPO: clipped objective), Schulman et al. 2016 (GAE), Ziegler et al. 2019
("Fine-Tuning Language Models from Human Preferences": per-token KL penalty, score at the end, adaptive KL),
Ouyang et al. 2022 (InstructGPT), Huang et al. 2024 ("The N+ Implementation Details of RLHF with PPO"), and
Schulman 2020, "Approximating KL divergence" (the k1/k3 estimators).
"""

from __future__ import annotations

from typing import Literal

import torch

from pipeline.generation import entropy_from_logits, logprobs_from_logits, mask_after_eos

__all__ = [
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "gae_advantages",
    "rloo_advantages",
    "grpo_advantages",
    "sequence_advantages_to_tokens",
    "clipped_policy_loss",
    "clipped_value_loss",
    "truncated_is_weights",
    "kl_per_token",
    "entropy_from_logits",
    "logprobs_from_logits",
    "mask_after_eos",
    "apply_missing_eos_penalty",
    "last_token_index",
    "shape_rewards",
    "explained_variance",
]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is 1 (over everything, or along `dim`)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries (with Bessel's correction when `unbiased` and more than one entry)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[count, sum, sum of squares] of the masked entries, in float64: what `moments_to_mean_var` needs, and what
    processes add up to whiten over the global batch (`pipeline.ppo.processes.global_moments`)."""
    m = mask.to(torch.float64)
    v = x.to(torch.float64) * m
    return torch.stack([m.sum(), v.sum(), (v * v).sum()])


def moments_to_mean_var(moments: torch.Tensor) -> tuple[float, float]:
    """(mean, unbiased variance) from [count, sum, sum of squares]; [3, 6, 14] (entries 1, 2, 3) gives (2.0, 1.0)."""
    n, total, squares = (float(v) for v in moments)
    if n == 0:
        return 0.0, 0.0
    mean = total / n
    var = max(squares / n - mean * mean, 0.0)
    return mean, var * n / (n - 1) if n > 1 else var


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    moments: torch.Tensor | None = None,
) -> torch.Tensor:
    """(x - mean) / std over the masked entries; `shift_mean=False` only rescales (keeps the mean, as for rewards).
    With `moments` ([count, sum, sum of squares], e.g. over every process's batch) the mean and variance are theirs.

    Masked-out positions come back as 0.
    """
    if moments is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        mean, var = (torch.tensor(v, dtype=x.dtype, device=x.device) for v in moments_to_mean_var(moments))
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16): (advantages, returns).

    delta_t = r_t + gamma * V_{t+1} - V_t, with V = 0 after the last real token;
    A_t = delta_t + gamma * lam * A_{t+1}; returns R_t = A_t + V_t. Masked positions get 0 advantage and return.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    returns = (advantages + values) * mask
    return advantages, returns


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE with a leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics"): rows come
    in groups of `k` consecutive episodes of one prompt; A_i = R_i - mean of the other k - 1 rewards of its group.

    Example: rewards [1, 2, 3, 6], k = 4: baselines [11/3, 10/3, 3, 2], advantages [-8/3, -4/3, 0, 4].
    """
    if k < 2 or rewards.numel() % k:
        raise ValueError(f"rloo needs groups of k >= 2 episodes; got {rewards.numel()} rewards and k = {k}")
    grouped = rewards.view(-1, k)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).reshape(-1)


def grpo_advantages(scores: torch.Tensor, k: int, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (Shao et al. 2024, DeepSeekMath, outcome supervision): within each group of `k`
    consecutive episodes of one prompt, (score - group mean) / (group std + eps), std with Bessel's correction.

    Example: scores [1, 2, 3, 6], k = 4: mean 3, std sqrt(14/3) = 2.160, advantages [-0.926, -0.463, 0, 1.389].
    A group of equal scores has advantage 0 everywhere.
    """
    if k < 2 or scores.numel() % k:
        raise ValueError(f"grpo needs groups of k >= 2 episodes; got {scores.numel()} scores and k = {k}")
    grouped = scores.view(-1, k)
    mean, std = grouped.mean(1, keepdim=True), grouped.std(1, keepdim=True)
    return ((grouped - mean) / (std + eps)).reshape(-1)


def sequence_advantages_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A per-response advantage [batch] on every real token of its response, [batch, response_len]."""
    return advantages.to(torch.float32).unsqueeze(1) * mask.to(torch.float32)


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    weights: torch.Tensor | None = None,
    level: Literal["token", "sequence"] = "token",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) as a loss: (loss, clip fraction, approximate KL).

    level "token": loss = mean over tokens of w * max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)),
    ratio = exp(logp - logp_old), w = `weights` (per token, no gradient; e.g. `truncated_is_weights`) or 1; the clip
    fraction is the share of tokens where the clipped term was chosen.

    level "sequence", the whole response as one action (Ahmadian et al. 2024; trl's RLOOTrainer): ratio_i = exp(sum
    over response i's tokens of logp - logp_old), A_i its advantage (`advantages` [batch], or [batch, response_len]
    holding it on every real token), w_i = `weights` [batch] or 1; loss = mean over responses of w_i * max(-A_i *
    ratio_i, -A_i * clip(ratio_i)); the clip fraction is the share of responses clipped.

    At either level the approximate KL(old || new) is the per-token k3 estimator mean((ratio - 1) - log ratio),
    always >= 0, so that ppo.max_approx_kl means the same.
    """
    log_ratio = logprobs - old_logprobs
    if level == "sequence":
        log_ratio = log_ratio * mask.to(log_ratio.dtype)
        ratio = torch.exp(log_ratio.sum(1))
        advantages = masked_mean(advantages, mask, dim=1) if advantages.dim() == 2 else advantages
        item_mask = torch.ones_like(ratio)
    else:
        ratio, item_mask = torch.exp(log_ratio), mask
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_item = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_item = per_item * weights.detach()
    loss = masked_mean(per_item, item_mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(logprobs.dtype), item_mask)
        approx_kl = masked_mean(torch.exp(log_ratio) - 1.0 - log_ratio, mask)
    return loss, clip_fraction, approx_kl


def truncated_is_weights(old_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance-sampling weights min(pi_old / pi_engine, cap) = min(exp(logp_old - logp_engine), cap).

    When another engine (vLLM) sampled the responses, its log-probs differ a little from the trainer's own for the
    same weights (other kernels, other precision): the samples are slightly off-policy. Weighting each token's
    policy-gradient loss by this ratio corrects for it; the cap bounds the variance (Yao et al. 2025, "Your
    efficient RL framework secretly brings you off-policy RL training": TIS, as in veRL and OpenRLHF).
    """
    return torch.exp(old_logprobs - engine_logprobs).clamp(max=cap)


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss (as in OpenAI baselines ppo2): (loss, clip fraction).

    V_clip = V_old + clip(V - V_old, -eps, eps); loss = 0.5 * mean over tokens of max((V - R)^2, (V_clip - R)^2).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_error > unclipped_error).to(values.dtype), mask)
    return loss, clip_fraction


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: Literal["k1", "k3"]) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of tokens sampled from the policy.

    k1 = log p - log q (unbiased, can be negative); k3 = (q/p - 1) - log(q/p) (unbiased, always >= 0, lower variance).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (valid: k1, k3)")


def apply_missing_eos_penalty(scores: torch.Tensor, ended: torch.Tensor, penalty: float) -> torch.Tensor:
    """Subtract `penalty` from the score of every response that never emitted EOS (cut off at max_new_tokens)."""
    return scores - penalty * (~ended.bool()).to(scores.dtype)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row of a right-padded 0/1 mask (0 for an empty row)."""
    return (mask.sum(1) - 1).clamp(min=0).long()


def shape_rewards(
    scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (Ziegler et al. 2019, eq. 2): (rewards, non-score part).

    r_t = -kl_coef * kl_t on every real token, plus the sequence's score on its last real token.
    """
    mask = mask.to(kl.dtype)
    non_score = -kl_coef * kl * mask
    rewards = non_score.clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(kl.dtype)
    return rewards, non_score


def explained_variance(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(target - predicted) / Var(target) over masked entries (1: perfect, 0: no better than the mean)."""
    var_target = masked_var(target, mask)
    return 1.0 - masked_var(target - predicted, mask) / var_target.clamp(min=1e-8)
