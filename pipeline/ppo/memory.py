"""Memory of PPO's passes with gradients: activation checkpointing, micro-batches by token budget, peak memory.

- Gradient checkpointing (`ppo.gradient_checkpointing`): each decoder layer keeps only its input during the forward
  and runs again in the backward. transformers' own `gradient_checkpointing_enable()` acts only in training mode,
  and PPO keeps every role in eval mode (dropout off), so the layers' `forward` is wrapped here instead; the wrapper
  checkpoints only while autograd records (`torch.is_grad_enabled()`), so the no-grad rollout passes run as before.
- Micro-batches by token budget (`ppo.micro_batch_tokens`): a process's share of a mini-batch, sorted by length and
  cut so that each micro-batch's padded size (rows x (longest prompt + longest response)) stays within the budget.
  The loss is the mini-batch's token mean whatever the cut (see `token_weights`).
- Peak memory per update: CUDA's max allocated bytes, or on a CPU the process's peak resident set (VmHWM).

Packed sequences (one row of several episodes, position ids restarting per episode) would drop the padding left:
transformers 5.x honours them for Llama's sdpa and eager attention when the attention mask is None
(`masking_utils.find_packed_sequence_indices`), but the roles' forward passes always give an attention mask and
derive the positions from it (`roles.hidden_states`), so this is not done here.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

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


def padded_tokens(prompt_lengths: torch.Tensor, response_lengths: torch.Tensor) -> int:
    """Size of the batch `rollout.episode_inputs` builds for these episodes: rows x (longest prompt + response)."""
    if len(prompt_lengths) == 0:
        return 0
    return len(prompt_lengths) * int(prompt_lengths.max() + response_lengths.max())


def split_micro_batches(
    batch: torch.Tensor,
    prompt_lengths: torch.Tensor,
    response_lengths: torch.Tensor,
    episodes: int,
    token_budget: int,
) -> list[torch.Tensor]:
    """Cut a process's share of a mini-batch (episode indices `batch`) into micro-batches.

    Without a budget (0): in order, `episodes` at a time. With one: sorted by real length (prompt + response), then
    filled greedily while rows x (longest prompt + longest response) stays within `token_budget` tokens; an episode
    longer than the budget gets a micro-batch of its own. `prompt_lengths` / `response_lengths` hold the real tokens
    of every episode of the rollout (indexed by the values of `batch`).
    """
    if token_budget <= 0:
        return [batch[i : i + episodes] for i in range(0, len(batch), episodes)]
    p, r = prompt_lengths[batch], response_lengths[batch]
    order = torch.sort(p + r, stable=True).indices
    out, current, longest_p, longest_r = [], [], 0, 0
    for i in order.tolist():
        lp, lr = max(longest_p, int(p[i])), max(longest_r, int(r[i]))
        if current and (len(current) + 1) * (lp + lr) > token_budget:
            out.append(batch[current])
            current, lp, lr = [], int(p[i]), int(r[i])
        current.append(i)
        longest_p, longest_r = lp, lr
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
