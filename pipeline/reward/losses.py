"""The reward model's maths: pure functions of rewards (B prompts x K responses) and tiers (B x K, 0 = best, -1 =
padding). The K-wise ranking loss averages -log P(i beats j) over each prompt's strictly ordered pairs (InstructGPT,
Ouyang et al. 2022, eq. 1), with optional tie-aware likelihoods (Rao-Kupper 1967, Davidson 1970) and reward
centring (Eisenstein et al. 2023)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pair_masks(tiers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(better, tied), both (B, K, K): better[b, i, j] when response i ranks strictly above j; tied[b, i, j] when
    i and j share a tier and i < j (each tied pair once). Padding (tier -1) is in no pair."""
    valid = tiers >= 0
    both = valid[:, :, None] & valid[:, None, :]
    upper, lower = tiers[:, :, None], tiers[:, None, :]
    k = tiers.shape[1]
    above_diagonal = torch.ones(k, k, dtype=torch.bool, device=tiers.device).triu(1)
    return both & (upper < lower), both & (upper == lower) & above_diagonal


def tie_parameter(tie_model: str, tie_probability: float) -> float:
    """The tie parameter that gives two equally rewarded responses a tie with probability `tie_probability`.

    Rao-Kupper (1967): P(tie | equal) = (theta - 1) / (theta + 1); we return nu = log theta.
    Davidson (1970): P(tie | equal) = nu / (2 + nu); we return nu.
    """
    p = tie_probability
    if tie_model == "rao_kupper":
        return math.log((1 + p) / (1 - p))
    if tie_model == "davidson":
        return 2 * p / (1 - p)
    raise ValueError(f"tie_model {tie_model!r} has no tie parameter")


def win_nll(x: torch.Tensor, tie_model: str = "none", nu: float = 0.0) -> torch.Tensor:
    """-log P(i beats j) for reward differences x = r_i - r_j (minus any margin).

    Bradley-Terry: P = sigmoid(x). Rao-Kupper: P = sigmoid(x - nu). Davidson: P = e^(x/2) / (e^(x/2) + e^(-x/2) + nu).
    """
    if tie_model == "none":
        return -F.logsigmoid(x)
    if tie_model == "rao_kupper":
        return -F.logsigmoid(x - nu)
    if tie_model == "davidson":
        return -(x / 2 - _davidson_denominator(x, nu))
    raise ValueError(f"unknown tie_model {tie_model!r}")


def tie_nll(x: torch.Tensor, tie_model: str, nu: float) -> torch.Tensor:
    """-log P(i ties j) for reward differences x = r_i - r_j.

    Rao-Kupper: P = (theta^2 - 1) sigmoid(x - nu) sigmoid(-x - nu) with theta = e^nu.
    Davidson: P = nu / (e^(x/2) + e^(-x/2) + nu).
    """
    if tie_model == "rao_kupper":
        return -(math.log(math.expm1(2 * nu)) + F.logsigmoid(x - nu) + F.logsigmoid(-x - nu))
    if tie_model == "davidson":
        return -(math.log(nu) - _davidson_denominator(x, nu))
    raise ValueError(f"tie_model {tie_model!r} has no tie likelihood")


def _davidson_denominator(x: torch.Tensor, nu: float) -> torch.Tensor:
    return torch.logsumexp(torch.stack([x / 2, -x / 2, torch.full_like(x, math.log(nu))]), dim=0)


def ranking_loss(
    rewards: torch.Tensor,
    tiers: torch.Tensor,
    margin: torch.Tensor | None = None,
    tie_model: str = "none",
    tie_probability: float = 1 / 3,
) -> torch.Tensor:
    """The K-wise ranking loss: per prompt, the mean negative log-likelihood of its pairs; then the mean over prompts.

    Strict pairs (i above j) contribute -log P(i beats j) at the difference r_i - r_j - margin. Tied pairs add
    nothing with tie_model="none" (Bradley-Terry, InstructGPT's loss); with "rao_kupper" or "davidson" they add
    -log P(tie) and the strict pairs use that model's win probability. Prompts without a counted pair are left out.

    Args:
        rewards: (B, K) scores (padding entries are ignored).
        tiers: (B, K) tier of each response, 0 = best, -1 = padding.
        margin: (B,) margin for each prompt's strict pairs, or None.
    """
    better, tied = pair_masks(tiers)
    diff = rewards[:, :, None] - rewards[:, None, :]
    x = diff - margin[:, None, None] if margin is not None else diff
    nu = tie_parameter(tie_model, tie_probability) if tie_model != "none" else 0.0
    nll = torch.where(better, win_nll(x, tie_model, nu), torch.zeros_like(x))
    counted = better
    if tie_model != "none":
        nll = nll + torch.where(tied, tie_nll(diff, tie_model, nu), torch.zeros_like(x))
        counted = better | tied
    pairs = counted.sum(dim=(1, 2))
    if not bool((pairs > 0).any()):
        return rewards.sum() * 0.0  # keeps the graph (DDP expects every parameter to get a gradient)
    per_prompt = nll.sum(dim=(1, 2)) / pairs.clamp(min=1)
    return per_prompt[pairs > 0].mean()


def centering_penalty(rewards: torch.Tensor, tiers: torch.Tensor) -> torch.Tensor:
    """mean(r^2) over real responses: pulls rewards towards 0 (Eisenstein et al. 2023, "Helping or herding?")."""
    valid = tiers >= 0
    return (rewards[valid] ** 2).mean()


def scatter_rewards(flat: torch.Tensor, tiers: torch.Tensor) -> torch.Tensor:
    """Rewards of the flattened sequences (prompt by prompt) laid out as (B, K); padding slots are 0."""
    return torch.zeros(tiers.shape, dtype=flat.dtype, device=flat.device).masked_scatter(tiers >= 0, flat)
