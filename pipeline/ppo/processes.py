"""What PPO needs from several processes: sums, gathers, gradient averaging (main-process work: tracking.on_main).

The policy and value adapters are small, so instead of wrapping the model in DistributedDataParallel (which wants one
forward per backward, while a PPO step runs the base twice, as policy and as critic) the gradients of the trainable
parameters are averaged with one all-reduce per optimiser step.
"""

from __future__ import annotations

import torch

from pipeline.tracking import distributed_state


def all_sum(values: dict[str, float]) -> dict[str, float]:
    """Sum each value over processes."""
    if distributed_state().num_processes == 1:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist(), strict=True))


def global_moments(moments: torch.Tensor) -> torch.Tensor:
    """Per-process [count, sum, sum of squares] (`losses.masked_moments`) summed over processes."""
    if distributed_state().num_processes == 1:
        return moments
    moments = moments.clone()
    torch.distributed.all_reduce(moments)
    return moments


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor of equal length from every process."""
    if distributed_state().num_processes == 1:
        return tensor
    parts = [torch.zeros_like(tensor) for _ in range(distributed_state().num_processes)]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def sync_gradients(params: list[torch.nn.Parameter], local_bad: bool) -> bool:
    """Average the gradients over processes with one all-reduce; True if any process saw a non-finite value."""
    world = distributed_state().num_processes
    grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device) for p in params]
    flat = torch.cat([*grads, torch.tensor([1.0 if local_bad else 0.0], device=grads[0].device)])
    if world > 1:
        torch.distributed.all_reduce(flat)
        flat[:-1] /= world
    bad = bool(flat[-1] > 0) or not bool(torch.isfinite(flat[:-1]).all())
    offset = 0
    for p in params:
        n = p.numel()
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.copy_(flat[offset : offset + n].view_as(p))
        offset += n
    return bad
