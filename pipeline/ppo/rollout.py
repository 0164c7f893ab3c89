"""Prompts and rollouts: which prompts each update samples, the sampled episodes, and their rewards and advantages.

A rollout batch: sample responses with the policy (KV cache, left padding, stop at EOS), keeping the log-prob and
entropy of each sampled token from the sampling pass's logits (with ppo.rollout_logprobs=recompute, from one more
forward pass instead), then without gradients the reference's log-probs, the values, and the reward model's
scores. `score_rollout` turns them into per-token rewards (KL penalty on every token, normalised score on the last
one), advantages (GAE, whitened) and returns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from pipeline.config import PPOConfig
from pipeline.data.records import BadRecord
from pipeline.errors import UserError
from pipeline.generation import SamplingArgs, decode_responses, renderable, sample_ids, tokenize_prompts
from pipeline.modeling import cut_start, join_prompt_response, turn_end_id
from pipeline.ppo.losses import (
    apply_missing_eos_penalty,
    gae_advantages,
    grpo_advantages,
    kl_per_token,
    last_token_index,
    masked_mean,
    masked_moments,
    masked_whiten,
    rloo_advantages,
    sequence_advantages_to_tokens,
    shape_rewards,
)
from pipeline.ppo.processes import global_moments
from pipeline.ppo.roles import Roles

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Prompts


@dataclass
class PromptSet:
    """Prompt records with their token ids, after the long-prompt policy (counts kept for the report)."""

    records: list[dict[str, Any]]
    ids: list[list[int]]
    truncated: int = 0
    refused: int = 0
    unrenderable: int = 0  # prompts the chat template refuses (Gemma 2: a system turn), skipped


def prepare_prompts(
    records: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_len: int,
    policy: str,
    what: str,
    reader: PreTrainedTokenizerBase | None = None,
) -> PromptSet:
    """Tokenize prompts; longer than `max_len`: keep their last tokens (the generation prompt, after a leading BOS)
    or drop them. A prompt the chat template refuses is skipped and counted, and so is one the `reader`'s refuses
    (a reward model of another family that reads the conversation as text), before any update, not mid-run."""
    refusals = [renderable(tokenizer, r["prompt"]) for r in records]
    for i, record in enumerate(records if reader is not None else []):
        refused = refusals[i] or renderable(reader, record["prompt"])
        if refused is not None and refusals[i] is None:
            refused = BadRecord(refused.kind, f"the reward model's template: {refused.detail}")
        refusals[i] = refused
    unrenderable = sum(bad is not None for bad in refusals)
    if unrenderable:
        first = next(bad for bad in refusals if bad is not None)
        logger.warning("%s: %d prompts skipped, %s (the first: %s)", what, unrenderable, first.kind, first.detail)
        if unrenderable == len(records):
            raise UserError(f"{what}: the model's chat template refuses every prompt ({first.detail})")
        records = [r for r, bad in zip(records, refusals, strict=True) if bad is None]
    kept, ids, truncated, refused = [], [], 0, 0
    for record, tokens in zip(records, tokenize_prompts(tokenizer, [r["prompt"] for r in records]), strict=True):
        if len(tokens) > max_len:
            if policy == "refuse":
                refused += 1
                continue
            tokens, truncated = cut_start(tokens, max_len, tokenizer.bos_token_id), truncated + 1
        kept.append(record)
        ids.append(tokens)
    if truncated or refused:
        logger.warning(
            "%s: %d prompts longer than %d tokens were %s",
            what,
            truncated or refused,
            max_len,
            "truncated (their first tokens dropped, a leading BOS kept)" if truncated else "refused",
        )
    if not kept:
        raise UserError(f"{what}: every prompt is longer than ppo.max_prompt_len={max_len}; raise it or truncate")
    return PromptSet(kept, ids, truncated, refused, unrenderable)


class PromptSampler:
    """Deterministic shuffled passes over the prompts; its position is checkpointed for exact resume."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.position = n, seed, 0, 0

    def _order(self) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def next_indices(self, count: int) -> list[int]:
        """The next `count` prompt indices (a new shuffled pass starts when one runs out)."""
        out: list[int] = []
        while len(out) < count:
            order = self._order()
            take = min(count - len(out), self.n - self.position)
            out += order[self.position : self.position + take]
            self.position += take
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "n": self.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["n"] != self.n:
            raise UserError(
                f"the checkpoint was made with {state['n']} prompts, this run has {self.n}; use a new run_dir"
            )
        self.epoch, self.position = state["epoch"], state["position"]


# --------------------------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class Rollout:
    """One process's episodes of an update. Per-token tensors are [episodes, response_len]."""

    records: list[dict[str, Any]]
    texts: list[str]
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor
    scores: torch.Tensor  # raw reward-model scores
    timings: dict[str, float] = field(default_factory=dict)
    # filled by score_rollout
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    kl: torch.Tensor | None = None  # per token, the penalty's estimator
    normalized_scores: torch.Tensor | None = None
    kl_loss_coef: float = 0.0  # grpo: the weight of the k3 KL to the reference in the policy loss
    engine_logprobs: torch.Tensor | None = None  # the rollout engine's own log-probs (rollout_engine=vllm)
    critic_states: torch.Tensor | None = None  # critic=reward: [episodes, response_len, hidden], what the head reads
    critic_recomputed: int = 0  # critic=reward: episodes whose states took a forward of their own

    def __len__(self) -> int:
        return len(self.texts)


def episode_inputs(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    rows: torch.Tensor | Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(input_ids, attention_mask, prompt_len, response_len) of some episodes, cut to their own longest prompt and
    response (padding columns that every chosen row has are dropped; positions do not depend on them)."""
    pm, rm = prompt_mask[rows], response_mask[rows]
    p_len = int(pm.sum(1).max())
    r_len = int(rm.sum(1).max())
    ids = torch.cat([prompt_ids[rows][:, -p_len:], response_ids[rows][:, :r_len]], dim=1)
    mask = torch.cat([pm[:, -p_len:], rm[:, :r_len]], dim=1)
    return ids, mask, p_len, r_len


@torch.no_grad()
def collect_rollout(
    roles: Roles,
    prompts: PromptSet,
    indices: Sequence[int],
    sampling: SamplingArgs,
    pcfg: PPOConfig,
    device: torch.device,
    engine: Any = None,
) -> Rollout:
    """Sample a response to each prompt and compute everything PPO needs about it (no gradients); an `engine`
    (pipeline/ppo/engines.py, e.g. vLLM) samples in place of the policy's `generate` when given."""
    tokenizer = roles.tokenizer
    records = [prompts.records[i] for i in indices]
    started = time.perf_counter()
    # another engine's log-probs are not the trainer's: it recomputes them (the engine's feed the TIS weights)
    from_generation = pcfg.rollout_logprobs == "generation" and engine is None
    sampled = (sample_ids if engine is None else engine.sample_ids)(
        roles.generation_model(),
        [prompts.ids[i] for i in indices],
        sampling,
        roles.end_ids,
        tokenizer.pad_token_id,
        pcfg.generation_batch_size,
        with_logprobs=from_generation,
        precision=roles.numerics,
        with_states=from_generation and roles.trunk_critic,  # a trunk critic reads the sampling pass's states
    )
    prompt_ids, prompt_mask = sampled.prompt_ids, sampled.prompt_mask
    response_ids, response_mask = sampled.response_ids, sampled.response_mask
    generated = time.perf_counter()
    texts = decode_responses(tokenizer, response_ids, response_mask)
    n, width = response_ids.shape
    ref_logprobs, values = torch.zeros(n, width), torch.zeros(n, width)
    if from_generation:
        logprobs, entropy = sampled.logprobs, sampled.entropy
    else:
        logprobs, entropy = torch.zeros(n, width), torch.zeros(n, width)
    if sampled.states is not None:
        values = roles.head_values(sampled.states.to(device)).float().cpu()
    for start in range(0, n, pcfg.forward_batch_size):
        rows = torch.arange(start, min(n, start + pcfg.forward_batch_size))
        ids, mask, p_len, r_len = episode_inputs(prompt_ids, prompt_mask, response_ids, response_mask, rows)
        ids, mask = ids.to(device), mask.to(device)
        if not from_generation and roles.trunk_critic:  # one forward: log-probs and the trunk critic's values
            lp, ent, v = roles.policy_logprobs_and_values(ids, mask, p_len, sampling.temperature, with_entropy=True)
            logprobs[rows, :r_len], entropy[rows, :r_len] = lp.float().cpu(), ent.float().cpu()
            values[rows, :r_len] = v.float().cpu()
        elif not from_generation:
            lp, ent = roles.policy_logprobs(ids, mask, p_len, sampling.temperature, with_entropy=True)
            logprobs[rows, :r_len], entropy[rows, :r_len] = lp.float().cpu(), ent.float().cpu()
        ref_logprobs[rows, :r_len] = roles.reference_logprobs(ids, mask, p_len, sampling.temperature).float().cpu()
        if roles.critic is not None and not roles.trunk_critic:
            values[rows, :r_len] = roles.values(ids, mask, p_len).float().cpu()
    critic_states, recomputed = None, 0
    sequences = reward_inputs(roles, pcfg.reward_input, records, texts, sampled)
    read: list[torch.Tensor | None] | None = [None] * n if roles.reward_critic else None
    scores = roles.reward.score_ids(sequences, pcfg.forward_batch_size, read)
    if roles.reward_critic:  # the same pass of the reward model gives the critic's states
        critic_states, recomputed = reward_states_before_responses(
            roles.reward, sequences, read, sampled, pcfg.forward_batch_size
        )
        for start in range(0, n, pcfg.forward_batch_size):
            rows = slice(start, start + pcfg.forward_batch_size)
            values[rows] = roles.head_values(critic_states[rows].to(device)).float().cpu()
    done = time.perf_counter()
    timings = {"time_generate": generated - started, "time_score": done - generated}
    return Rollout(
        records,
        texts,
        prompt_ids,
        prompt_mask,
        response_ids,
        response_mask,
        sampled.ended,
        logprobs,
        ref_logprobs,
        values * response_mask,
        entropy,
        scores,
        timings,
        engine_logprobs=sampled.logprobs if engine is not None else None,
        critic_states=critic_states,
        critic_recomputed=recomputed,
    )


def reward_inputs(roles: Roles, how: str, records: Sequence[dict[str, Any]], texts: list[str], sampled: Any) -> list:
    """The ids the reward model scores (ppo.reward_input): 'text', the conversation re-tokenised as the reward stage
    trained on it; 'ids', the policy's own prompt and sampled ids, the end of the turn added to a response that did
    not end (trl 1.12's and OpenRLHF's way), cut to the reward model's length as 'text' is."""
    if how == "text":
        return roles.reward.encode([r["prompt"] for r in records], texts)
    end, out = turn_end_id(roles.reward.tokenizer), []
    for i in range(len(texts)):
        prompt = sampled.prompt_ids[i][sampled.prompt_mask[i].bool()].tolist()
        response = sampled.response_ids[i][sampled.response_mask[i].bool()].tolist()
        response += [] if bool(sampled.ended[i]) else [end]
        out.append(join_prompt_response(prompt, response, roles.reward.max_len, roles.reward.tokenizer.bos_token_id))
    return out


def reward_states_before_responses(
    reward: Any, sequences: list[list[int]], read: list[torch.Tensor], sampled: Any, batch_size: int
) -> tuple[torch.Tensor, int]:
    """[episodes, response_len, hidden]: the reward model's final state at the position before each response token
    (the one a causal LM samples that token from), on the policy's own ids.

    `sequences` are the ids the reward model scored and `read` its final states on them, `sampled` the episodes'
    ids (`pipeline.generation.SampledIds`). Where a sequence starts with its episode's prompt and response ids, these
    are the states wanted: attention is causal, so the tokens after them (an end of turn, another rendering of the
    end) do not change them. Otherwise (a truncated prompt, a response that re-tokenises differently) one more
    forward of the reward model on the policy's ids gives them; the second value returned counts those episodes.
    """
    prompt_ids, prompt_mask = sampled.prompt_ids, sampled.prompt_mask
    response_ids, response_mask = sampled.response_ids, sampled.response_mask
    n, width = response_ids.shape
    out = torch.zeros(n, width, read[0].shape[-1])
    again: dict[int, list[int]] = {}
    for i in range(n):
        p, r = int(prompt_mask[i].sum()), int(response_mask[i].sum())
        if r == 0:
            continue
        own = torch.cat([prompt_ids[i][prompt_mask[i].bool()], response_ids[i, :r]])[: p + r - 1].tolist()
        if sequences[i][: len(own)] == own:
            out[i, :r] = read[i][p - 1 : p + r - 1]
        else:
            again[i] = own
    if again:
        states: list[torch.Tensor | None] = [None] * len(again)
        reward.score_ids(list(again.values()), batch_size, states)
        for (i, own), state in zip(again.items(), states, strict=True):
            p = int(prompt_mask[i].sum())
            out[i, : len(own) - p + 1] = state[p - 1 :]
    return out, len(again)


class RunningMoments:
    """Mean and standard deviation of all scores seen so far (Chan et al.'s parallel update), checkpointed."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: torch.Tensor) -> None:
        n = values.numel()
        if n == 0:
            return
        batch_mean = float(values.double().mean())
        batch_m2 = float(((values.double() - batch_mean) ** 2).sum())
        delta, total = batch_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return (self.m2 / (self.count - 1)) ** 0.5 if self.count > 1 else 1.0

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def normalize_scores(
    scores: torch.Tensor, pcfg: PPOConfig, stats: dict[str, float] | None, running: RunningMoments
) -> torch.Tensor:
    """Scores on a common scale: (s - mean) / std with the reward stage's or the run's statistics, then clipped.

    `running` must already include this batch (the caller updates it with every process's scores)."""
    if pcfg.reward_normalization == "reward_stats":
        scores = (scores - stats["mean"]) / stats["std"]
    elif pcfg.reward_normalization == "running":
        scores = (scores - running.mean) / max(running.std, 1e-6)
    if pcfg.score_clip is not None:
        scores = scores.clamp(-pcfg.score_clip, pcfg.score_clip)
    return scores


def score_rollout(rollout: Rollout, normalized: torch.Tensor, kl_coef: float, pcfg: PPOConfig) -> Rollout:
    """Per-token rewards, advantages and returns (Ziegler et al. 2019; GAE; whitening over every process's
    episodes), filled into `rollout`. Under several processes every one of them must call it (an all-reduce)."""
    mask = rollout.response_mask
    scores = apply_missing_eos_penalty(normalized, rollout.ended, pcfg.missing_eos_penalty)
    kl = kl_per_token(rollout.logprobs, rollout.ref_logprobs, pcfg.kl_estimator) * mask
    rollout.kl, rollout.normalized_scores = kl, scores
    if pcfg.advantage != "gae":
        return _score_without_critic(rollout, scores, kl_coef, pcfg)
    rewards, _ = shape_rewards(scores, kl, kl_coef, mask)
    if pcfg.whiten_rewards:
        rewards = _whiten_over_processes(rewards, mask, shift_mean=False)
    advantages, returns = gae_advantages(rewards, rollout.values, mask, pcfg.gamma, pcfg.lam)
    if pcfg.whiten_advantages:  # over every process's episodes: the same scale for all of them
        advantages = _whiten_over_processes(advantages, mask)
    rollout.rewards, rollout.advantages, rollout.returns = rewards, advantages, returns
    return rollout


def _whiten_over_processes(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """`masked_whiten` with the mean and variance of every process's entries: the same scale for all of them."""
    return masked_whiten(x, mask, shift_mean=shift_mean, moments=global_moments(masked_moments(x, mask)))


def _score_without_critic(rollout: Rollout, scores: torch.Tensor, kl_coef: float, pcfg: PPOConfig) -> Rollout:
    """rloo: the reward of a response is its score minus the KL penalty summed over its tokens, and its advantage
    that reward minus the mean of the other responses to its prompt (then whitened, with whiten_advantages). grpo:
    the score normalised within its prompt's group; the KL is a loss term instead (`rollout.kl_loss_coef`). Every
    token of a response gets its response's advantage; returns and values are 0 (no critic)."""
    mask, k = rollout.response_mask, pcfg.samples_per_prompt
    if pcfg.advantage == "rloo":
        rewards = scores - kl_coef * rollout.kl.sum(1)
        per_response = rloo_advantages(rewards, k)
        if pcfg.whiten_advantages and pcfg.ratio_level == "sequence":  # each response counted once
            per_response = _whiten_over_processes(per_response, torch.ones_like(per_response))
        advantages = sequence_advantages_to_tokens(per_response, mask)
        if pcfg.whiten_advantages and pcfg.ratio_level == "token":  # each token counted once
            advantages = _whiten_over_processes(advantages, mask)
    else:
        rewards = scores
        advantages = sequence_advantages_to_tokens(grpo_advantages(scores, k), mask)
        rollout.kl_loss_coef = kl_coef
    rollout.rewards = sequence_advantages_to_tokens(rewards, torch.zeros_like(mask))
    rows = torch.arange(len(rewards))
    rollout.rewards[rows, last_token_index(mask)] = rewards.float()  # the whole reward at the last token, for logs
    rollout.advantages, rollout.returns = advantages, torch.zeros_like(advantages)
    return rollout


def check_finite(rollout: Rollout) -> str | None:
    """The name of the first rollout quantity holding NaN or inf, or None."""
    mask = rollout.response_mask.bool()
    for name in ("scores", "values", "logprobs", "ref_logprobs", "advantages", "returns"):
        value = getattr(rollout, name)
        if value is None:
            continue
        value = value[mask] if value.dim() == 2 else value
        if not torch.isfinite(value).all():
            return name
    return None


def rollout_means(rollout: Rollout) -> dict[str, float]:
    """Per-process sums behind the logged means (summed over processes, then divided by episodes or tokens)."""
    mask = rollout.response_mask.float()
    return {
        "episodes": float(len(rollout)),
        "tokens": float(mask.sum()),
        "score_sum": float(rollout.scores.sum()),
        "normalized_score_sum": float(rollout.normalized_scores.sum()),
        "kl_sum": float((kl_per_token(rollout.logprobs, rollout.ref_logprobs, "k1") * mask).sum()),
        "kl_penalty_sum": float(rollout.kl.sum()),
        "entropy_token_sum": float((rollout.entropy * mask).sum()),
        "length_sum": float(mask.sum()),
        "eos_sum": float(rollout.ended.float().sum()),
        "value_token_sum": float(masked_mean(rollout.values, mask) * mask.sum()),
        "recomputed_sum": float(rollout.critic_recomputed),
    }
