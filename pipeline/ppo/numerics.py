"""One arithmetic for every PPO pass: generation, reference, value, reward, training and the ptx term.

PPO's ratio and KL compare log-probs from different passes (the sampling pass against the training forward, the
policy against the reference), so every pass must compute them the same way. With a bf16 base and float32 LoRA
adapters (peft's default), a pass under autocast and a pass without it give different numbers for the same
weights; the rule here is that either all of them run under autocast, or none does.

The setting is accelerate's mixed precision (`accelerate launch --mixed_precision bf16`, or `mixed_precision:` in
an accelerate config file, both seen as ACCELERATE_MIXED_PRECISION), which `ppo.mixed_precision` overrides:

    no    float32 arithmetic (weights stored in bf16 are computed in bf16: they have no other copy)
    bf16  autocast to bfloat16 (CUDA, or a CPU: fast with AMX)
    auto  accelerate's setting when one is made, else bf16 on a CUDA GPU that has it (the base loads in bf16
          there) and no on a CPU

fp16 is refused: its gradients need loss scaling, which PPO's own loop does not do.

Scalar heads (value and reward scores) run in float32 outside autocast: a regression target read at bf16's three
significant digits would add noise of about 1 % to every value.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from pipeline.errors import UserError

PRECISIONS = ("auto", "no", "bf16")


@dataclass(frozen=True)
class Numerics:
    """The autocast of every PPO pass: `with numerics():` around a forward; `dtype` None means none."""

    device_type: str
    dtype: torch.dtype | None

    def __call__(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def full_precision(self) -> contextlib.AbstractContextManager:
        """float32 inside an autocast region (the scalar heads)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, enabled=False)

    @property
    def name(self) -> str:
        return "no" if self.dtype is None else "bf16"


def resolve_precision(setting: str, device: torch.device | str) -> str:
    """'no' or 'bf16' from `ppo.mixed_precision` and accelerate's setting (see the module docstring)."""
    device = torch.device(device)
    source = "ppo.mixed_precision"
    if setting == "auto" and os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip():
        setting, source = os.environ["ACCELERATE_MIXED_PRECISION"].strip().lower(), "accelerate's mixed_precision"
    if setting == "fp16":
        raise UserError(
            f"{source} is fp16, which PPO does not run (its gradients need loss scaling); use bf16 (set "
            "ppo.mixed_precision=bf16, or mixed_precision: bf16 in the accelerate config) or no"
        )
    if setting == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    if setting not in PRECISIONS:
        raise UserError(f"{source} must be one of {', '.join(PRECISIONS)}, got {setting!r}")
    return setting


def build_numerics(setting: str, device: torch.device | str) -> Numerics:
    device = torch.device(device)
    precision = resolve_precision(setting, device)
    dtype = {"no": None, "bf16": torch.bfloat16}[precision]
    return Numerics("cuda" if device.type == "cuda" else "cpu", dtype)
