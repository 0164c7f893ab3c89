"""One PPO update: `ppo_epochs` passes over a rollout batch in mini-batches, one optimiser step each.

The policy and the critic are two optimiser groups (their own learning rates) clipped apart (their own norms).
Each micro-batch runs the base twice with gradients: as the policy (clipped surrogate, optional entropy bonus and
PPO-ptx term) and as the critic (clipped value loss); each pass is backpropagated at once, so only one graph is
alive at a time. Non-finite losses or gradients on any process stop the update before the optimiser step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

import torch

from pipeline.ppo.losses import (
    clipped_policy_loss,
    clipped_value_loss,
    kl_per_token,
    masked_mean,
    truncated_is_weights,
)
from pipeline.ppo.memory import (
    pack_episodes,
    packed_policy_logprobs,
    packed_values,
    set_gradient_checkpointing,
    split_micro_batches,
    token_weights,
)
from pipeline.ppo.processes import all_sum, sync_gradients
from pipeline.ppo.ptx import PtxStream, pretraining_loss
from pipeline.ppo.roles import Roles
from pipeline.ppo.rollout import Rollout, episode_inputs


def build_optimizer(
    pcfg: Any, policy: list[torch.nn.Parameter], critic: list[torch.nn.Parameter], total_steps: int
) -> tuple[Any, Any]:
    """AdamW with two groups, the policy's (ppo.learning_rate) and the critic's (ppo.value_learning_rate), under one
    schedule (each group's rate is multiplied by it)."""
    import transformers

    value_lr = pcfg.value_learning_rate if pcfg.value_learning_rate is not None else pcfg.learning_rate
    groups = [{"params": policy, "lr": pcfg.learning_rate}]
    if critic:  # none with advantage rloo / grpo
        groups.append({"params": critic, "lr": value_lr})
    # eps 1e-5: the PPO implementation detail of the original code (Huang et al. 2022, "37 details", item 3)
    optimizer = torch.optim.AdamW(groups, lr=pcfg.learning_rate, eps=1e-5, weight_decay=pcfg.weight_decay)
    scheduler = transformers.get_scheduler(pcfg.lr_scheduler_type, optimizer, pcfg.warmup_steps, total_steps)
    return optimizer, scheduler


@functools.cache
def _malloc_trim() -> Any:
    libc = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None  # glibc only


def release_freed_memory() -> None:
    """Give the memory freed by an update's backward passes back to the operating system (glibc's malloc_trim;
    elsewhere a no-op), once per update.

    Each pass with gradients allocates and frees some hundred MB of activations in blocks below glibc's mmap
    threshold; left in the heap, fragmented, they made the resident size creep up update after update (3 updates of
    the 125m-shaped speed benchmark, benchmarks/ppo_vs_trl.py: peak RSS 2.28 GB without it, 1.87 GB with it, in
    the same time). Called after every backward it cost about 8 % of an update's CPU time.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class NonFinite(Exception):
    """NaN or inf met during an update; the caller stops the run and keeps the last good checkpoint."""


def ppo_update(
    roles: Roles, rollout: Rollout, pcfg: Any, optimizer: Any, scheduler: Any, ptx: PtxStream | None, world: int
) -> dict[str, float]:
    """`ppo_epochs` passes over the rollout in mini-batches, one optimiser step each; returns summed statistics."""
    params = roles.trainable_parameters()
    n = len(rollout)
    mb_local = pcfg.mini_batch_size // world
    micro = max(1, mb_local // pcfg.gradient_accumulation_steps)
    device = params[0].device
    set_gradient_checkpointing([m for m in (roles.model, roles.critic) if m is not None], pcfg.gradient_checkpointing)
    prompt_lengths, response_lengths = rollout.prompt_mask.sum(1), rollout.response_mask.sum(1)
    episodes = (rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask)
    totals = {
        "policy_loss": 0.0,
        "value_loss": 0.0,
        "clip_fraction": 0.0,
        "value_clip_fraction": 0.0,
        "approx_kl": 0.0,
        "ptx_loss": 0.0,
        "steps": 0.0,
        "grad_norm": 0.0,
        "value_grad_norm": 0.0,
    }
    stop = False
    for _ in range(pcfg.ppo_epochs):
        order = torch.randperm(n)
        for start in range(0, n, mb_local):
            batch = order[start : start + mb_local]
            stats = {
                "policy_loss": 0.0,
                "value_loss": 0.0,
                "clip_fraction": 0.0,
                "value_clip_fraction": 0.0,
                "approx_kl": 0.0,
                "ptx_loss": 0.0,
            }
            bad = False
            micro_batches = split_micro_batches(
                batch, prompt_lengths, response_lengths, micro, pcfg.micro_batch_tokens, pcfg.pack_sequences
            )
            # token-mean losses weighted by token share: the mini-batch's token mean, however it is cut (with
            # ratio_level=sequence, response-mean losses weighted by response share: the mini-batch's response mean)
            if pcfg.ratio_level == "sequence":
                weights = [len(rows) / len(batch) for rows in micro_batches]
            else:
                weights = token_weights(rollout.response_mask, micro_batches)
            for rows, weight in zip(micro_batches, weights, strict=True):
                ids, mask, p_len, r_len = episode_inputs(
                    rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask, rows
                )
                ids, mask = ids.to(device), mask.to(device)
                resp_mask = rollout.response_mask[rows, :r_len].to(device)
                old = {
                    k: getattr(rollout, k)[rows, :r_len].to(device)
                    for k in ("logprobs", "advantages", "values", "returns")
                }
                values = None
                if pcfg.pack_sequences:  # one row of real tokens (pipeline/ppo/memory.py)
                    packed = pack_episodes(*episodes, rows).to(device)
                    logprobs, entropy, states = packed_policy_logprobs(
                        roles, packed, pcfg.temperature, pcfg.entropy_coef > 0
                    )
                    values = roles.head_values(states) if roles.trunk_critic else None
                elif roles.trunk_critic:  # one forward and one backward for both losses
                    logprobs, entropy, values = roles.policy_logprobs_and_values(
                        ids, mask, p_len, pcfg.temperature, pcfg.entropy_coef > 0
                    )
                else:
                    logprobs, entropy = roles.policy_logprobs(
                        ids, mask, p_len, pcfg.temperature, pcfg.entropy_coef > 0
                    )
                tis = None  # responses sampled by another engine (vLLM): truncated importance weights
                if rollout.engine_logprobs is not None:
                    engine_lp = rollout.engine_logprobs[rows, :r_len].to(device)
                    if pcfg.ratio_level == "sequence":  # one weight per response, from its summed log-probs
                        old_lp, engine_lp = (old["logprobs"] * resp_mask).sum(1), (engine_lp * resp_mask).sum(1)
                        tis = truncated_is_weights(old_lp, engine_lp, pcfg.tis_cap)
                    else:
                        tis = truncated_is_weights(old["logprobs"], engine_lp, pcfg.tis_cap)
                pg_loss, clip_fraction, approx_kl = clipped_policy_loss(
                    logprobs, old["logprobs"], old["advantages"], resp_mask, pcfg.cliprange, tis, pcfg.ratio_level
                )
                loss = pg_loss - (pcfg.entropy_coef * masked_mean(entropy, resp_mask) if entropy is not None else 0.0)
                if rollout.kl_loss_coef > 0:  # grpo: the KL to the reference in the loss (k3, Shao et al. 2024)
                    ref = rollout.ref_logprobs[rows, :r_len].to(device)
                    loss = loss + rollout.kl_loss_coef * masked_mean(kl_per_token(logprobs, ref, "k3"), resp_mask)
                vf_loss, vf_clip = torch.zeros(()), torch.zeros(())
                if roles.trunk_critic:
                    vf_loss, vf_clip = clipped_value_loss(
                        values, old["values"], old["returns"], resp_mask, pcfg.cliprange_value
                    )
                    loss = loss + pcfg.vf_coef * vf_loss
                loss = loss * weight
                if ptx is not None:  # equal ptx blocks per micro-batch: their plain mean
                    ptx_loss = pretraining_loss(roles, ptx.next_batch(pcfg.ptx_batch_size).to(device))
                    loss = loss + pcfg.ptx_coef * ptx_loss / len(micro_batches)
                    stats["ptx_loss"] += float(ptx_loss) / len(micro_batches)
                bad |= not bool(torch.isfinite(loss))
                loss.backward()
                if roles.reward_critic:  # the head on the reward model's states, kept by the rollout
                    values = roles.head_values(rollout.critic_states[rows, :r_len].to(device))
                elif roles.critic is not None and not roles.trunk_critic:
                    values = packed_values(roles, packed) if pcfg.pack_sequences else roles.values(ids, mask, p_len)
                if values is not None and not roles.trunk_critic:
                    vf_loss, vf_clip = clipped_value_loss(
                        values, old["values"], old["returns"], resp_mask, pcfg.cliprange_value
                    )
                    bad |= not bool(torch.isfinite(vf_loss))
                    (pcfg.vf_coef * vf_loss * weight).backward()
                for key, value in (
                    ("policy_loss", pg_loss),
                    ("value_loss", vf_loss),
                    ("clip_fraction", clip_fraction),
                    ("value_clip_fraction", vf_clip),
                    ("approx_kl", approx_kl),
                ):
                    stats[key] += weight * float(value.detach())
            if sync_gradients(params, bad):
                optimizer.zero_grad(set_to_none=True)
                raise NonFinite(f"policy loss {stats['policy_loss']:.4g}, value loss {stats['value_loss']:.4g}")
            grad_norm = torch.nn.utils.clip_grad_norm_(roles.policy_parameters(), pcfg.max_grad_norm)
            value_clip = pcfg.value_max_grad_norm if pcfg.value_max_grad_norm is not None else pcfg.max_grad_norm
            value_grad_norm = torch.nn.utils.clip_grad_norm_(roles.critic_parameters(), value_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            stats = all_sum(stats)
            for key, value in stats.items():
                totals[key] += value / world
            totals["grad_norm"] += float(grad_norm)
            totals["value_grad_norm"] += float(value_grad_norm)
            totals["steps"] += 1
            if pcfg.max_approx_kl is not None and stats["approx_kl"] / world > pcfg.max_approx_kl:
                stop = True  # every process sees the same all-reduced value, so they stop together
                break
        if stop:
            break
    release_freed_memory()  # once per update: after every backward it cost 8 % of the update (benchmarks/ppo_step.py)
    steps = max(totals.pop("steps"), 1.0)
    out = {key: value / steps for key, value in totals.items()}
    out["optimizer_steps"] = steps
    out["early_stopped"] = float(stop)
    return out
