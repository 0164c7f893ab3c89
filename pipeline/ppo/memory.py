"""Memory of PPO's passes with gradients: activation checkpointing, micro-batches by token budget, peak memory.

- Gradient checkpointing (`ppo.gradient_checkpointing`): each decoder layer keeps only its input during the forward
  and runs again in the backward. transformers' own `gradient_checkpointing_enable()` acts only in training mode,
  and PPO keeps every role in eval mode (dropout off), so the layers' `forward` is wrapped here instead; the wrapper
  checkpoints only while autograd records (`torch.is_grad_enabled()`), so the no-grad rollout passes run as before.
- Micro-batches by token budget (`ppo.micro_batch_tokens`): a process's share of a mini-batch, sorted by length and
  cut so that each micro-batch's padded size (rows x (longest prompt + longest response)) stays within the budget.
  The loss is the mini-batch's token mean whatever the cut (see `token_weights`).
- Peak memory per update: CUDA's max allocated bytes, or on a CPU the process's peak resident set (VmHWM).

- Packed micro-batches (`ppo.pack_sequences`): the episodes of a micro-batch run as one row of their real tokens, the
  position ids restarting at each episode, without padding. transformers 5.x builds the block-diagonal causal mask
  from such position ids when no attention mask and no cache is given (`masking_utils.find_packed_sequence_indices`);
  checked here for Llama with sdpa and eager attention on the CPU (the same hidden states as each episode alone),
  and refused for other attention implementations.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from pipeline.errors import UserError
from pipeline.generation import entropy_from_logits, logprobs_from_logits
from pipeline.modeling import lm_logits
from pipeline.ppo.roles import POLICY, VALUE, Roles, use_adapter

_MARK = "_ppo_checkpointed"  # set on a wrapped layer: True while checkpointing is on


# --------------------------------------------------------------------------------------------------------------
# Gradient checkpointing


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers: transformers' checkpointable layers (`GradientCheckpointingLayer`)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _active_adapters(layer: torch.nn.Module) -> tuple[Any, ...]:
    """Which LoRA adapters act in this layer right now (the role): recomputing under another role would be wrong."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in layer.modules():
        if isinstance(module, BaseTunerLayer):
            return (tuple(module.active_adapters), module.disable_adapters)
    return ()


def _checkpointed_forward(layer: torch.nn.Module, forward: Any, *args: Any, **kwargs: Any) -> Any:
    if not (getattr(layer, _MARK) and torch.is_grad_enabled()):
        return forward(*args, **kwargs)
    role = _active_adapters(layer)

    def run(*a: Any, **k: Any) -> Any:
        # the backward recomputes this layer: it must run as the same role as the forward did
        if _active_adapters(layer) != role:
            raise RuntimeError(
                f"gradient checkpointing: the backward recomputes a layer with adapters {_active_adapters(layer)} "
                f"active, the forward ran with {role}; backpropagate before switching roles"
            )
        return forward(*a, **k)

    # non-reentrant: keyword arguments pass through, and gradients reach the adapters even when no input needs them
    return checkpoint(run, *args, use_reentrant=False, **kwargs)


def set_gradient_checkpointing(models: Iterable[torch.nn.Module], on: bool) -> int:
    """Checkpoint (or stop checkpointing) every decoder layer of `models` in passes with gradients; the number of
    layers set. Works on eval-mode models (dropout stays off) and on 4-bit bases; calling it again only flips it."""
    seen: set[int] = set()
    for model in models:
        for layer in decoder_layers(model):
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            if not hasattr(layer, _MARK):
                if not on:
                    continue
                layer.forward = functools.partial(_checkpointed_forward, layer, layer.forward)
            setattr(layer, _MARK, on)
    return len(seen)


# --------------------------------------------------------------------------------------------------------------
# Micro-batches


def padded_tokens(prompt_lengths: torch.Tensor, response_lengths: torch.Tensor, packed: bool = False) -> int:
    """Size of the batch `rollout.episode_inputs` builds for these episodes: rows x (longest prompt + response);
    packed: their real tokens."""
    if len(prompt_lengths) == 0:
        return 0
    if packed:
        return int(prompt_lengths.sum() + response_lengths.sum())
    return len(prompt_lengths) * int(prompt_lengths.max() + response_lengths.max())


def split_micro_batches(
    batch: torch.Tensor,
    prompt_lengths: torch.Tensor,
    response_lengths: torch.Tensor,
    episodes: int,
    token_budget: int,
    packed: bool = False,
) -> list[torch.Tensor]:
    """Cut a process's share of a mini-batch (episode indices `batch`) into micro-batches.

    Without a budget (0): in order, `episodes` at a time. With one: sorted by real length (prompt + response), then
    filled greedily while rows x (longest prompt + longest response) stays within `token_budget` tokens; an episode
    longer than the budget gets a micro-batch of its own. Packed, the real tokens count instead of the padded size.
    `prompt_lengths` / `response_lengths` hold the real tokens of every episode of the rollout (indexed by the values
    of `batch`).
    """
    if token_budget <= 0:
        return [batch[i : i + episodes] for i in range(0, len(batch), episodes)]
    p, r = prompt_lengths[batch], response_lengths[batch]
    order = torch.sort(p + r, stable=True).indices
    out, current = [], []
    for i in order.tolist():
        if current and padded_tokens(p[current + [i]], r[current + [i]], packed) > token_budget:
            out.append(batch[current])
            current = []
        current.append(i)
    if current:
        out.append(batch[current])
    return out


def token_weights(response_mask: torch.Tensor, micro_batches: list[torch.Tensor]) -> list[float]:
    """Weight of each micro-batch's token-mean losses so that their sum is the mini-batch's token mean.

    A micro-batch's masked mean times (its response tokens / the mini-batch's) is its token sum over the mini-batch's
    tokens, so the gradient does not depend on how the mini-batch was cut. (Weighting by episodes instead, as before,
    gave each micro-batch's tokens a weight that changed with the cut.)
    """
    counts = [float(response_mask[rows].sum()) for rows in micro_batches]
    total = sum(counts)
    return [c / total if total > 0 else 1.0 / len(counts) for c in counts]


# --------------------------------------------------------------------------------------------------------------
# Packed micro-batches

PACKING_ATTENTION = ("sdpa", "eager")  # checked to honour packed position ids (tests/test_ppo_memory.py)


@dataclass
class Packed:
    """Episodes as one row of real tokens: ids and positions [1, tokens]; for each episode and response token, the
    position in the row of the state that predicts it, [episodes, response_len] (the last one repeated past the end)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    index: torch.Tensor
    response_ids: torch.Tensor

    def to(self, device: torch.device) -> Packed:
        return Packed(*(t.to(device) for t in (self.input_ids, self.position_ids, self.index, self.response_ids)))


def pack_episodes(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    rows: torch.Tensor,
) -> Packed:
    """Pack episodes (left-padded prompts, right-padded responses, as in a Rollout) into one row without padding."""
    r_len = int(response_mask[rows].sum(1).max())
    ids, positions, index, start = [], [], [], 0
    for i in rows.tolist():
        prompt = prompt_ids[i][prompt_mask[i].bool()]
        n_resp = int(response_mask[i].sum())
        sequence = torch.cat([prompt, response_ids[i, :n_resp]])
        ids.append(sequence)
        positions.append(torch.arange(len(sequence)))
        steps = torch.arange(r_len).clamp(max=max(n_resp - 1, 0))
        index.append(start + len(prompt) - 1 + steps)
        start += len(sequence)
    return Packed(
        torch.cat(ids)[None], torch.cat(positions)[None], torch.stack(index), response_ids[rows, :r_len].clone()
    )


def _packed_states(model: Any, packed: Packed) -> torch.Tensor:
    """[episodes, response_len, hidden]: the states that predict each response token, from one packed forward."""
    attention = model.get_base_model().config._attn_implementation
    if attention not in PACKING_ATTENTION:
        raise UserError(
            f"ppo.pack_sequences: the base runs {attention} attention, which is not checked to honour packed "
            f"position ids here (only {', '.join(PACKING_ATTENTION)}); set ppo.pack_sequences=false"
        )
    lm = model.get_base_model()
    body = getattr(lm, lm.base_model_prefix)
    # no attention mask and no cache: transformers then masks each episode from the others by its position ids
    out = body(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=None, use_cache=False)
    return out.last_hidden_state[0][packed.index]


def packed_policy_logprobs(
    roles: Roles, packed: Packed, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """`Roles.policy_logprobs` of packed episodes: [episodes, response_len] log-probs (and entropy), and the states
    they came from (a trunk critic's head reads them), under the roles' one autocast."""
    with use_adapter(roles.model, POLICY), roles.numerics():
        states = _packed_states(roles.model, packed)
        logits = lm_logits(roles.model.get_base_model(), states)
        logprobs = logprobs_from_logits(logits, packed.response_ids, temperature)
        entropy = entropy_from_logits(logits, temperature) if with_entropy else None
    return logprobs, entropy, states


def packed_values(roles: Roles, packed: Packed) -> torch.Tensor:
    """`Roles.values` of packed episodes (the critic adapter's): [episodes, response_len]."""
    with use_adapter(roles.critic, VALUE), roles.numerics():
        states = _packed_states(roles.critic, packed)
    return roles.head_values(states)


# --------------------------------------------------------------------------------------------------------------
# Peak memory per update

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def peak_rss_bytes(status: str) -> int | None:
    """The peak resident set (VmHWM) in bytes from the text of /proc/<pid>/status, or None when absent."""
    match = re.search(r"^VmHWM:\s+(\d+)\s+kB", status, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def reset_peak_memory(device: torch.device) -> str:
    """Start measuring a new peak; returns what the peak will be (the record's `peak_memory_kind`)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_max_allocated"
    try:
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
        return "rss_peak_this_update"
    except OSError:
        return "rss_peak_since_start"


def peak_memory_gb(device: torch.device) -> float | None:
    """Peak memory since `reset_peak_memory` (or since the process started, where the reset was not allowed), GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        peak = peak_rss_bytes(_STATUS.read_text())
    except OSError:
        return None
    return peak / 1e9 if peak is not None else None
