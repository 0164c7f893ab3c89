"""A leaner forward for peft's LoRA linear layers in PPO's passes: the same function, fewer full-size tensor ops.

peft computes `result + lora_B(lora_A(x)) * scaling`: the scaling multiplies a [tokens, out_features] tensor and
the add makes another one, two memory-bound passes over a tensor as large as the layer's output, in every linear
of every pass (generation, policy, reference is exempt, value, reward). Here the scaling multiplies the rank-r
intermediate instead (`lora_B(lora_A(x) * scaling)`, the same product), and the add is fused into the B matmul
(`addmm(result, h, B^T)`: the GEMM starts from `result`), and under autocast x is not first copied to float32.
The outputs agree to float rounding; the gradients too.

Only plain LoRA layers (`peft.tuners.lora.layer.Linear`, no DoRA or other variant, no bias on B) take this path,
and only when the output and B share a dtype or autocast is on; everything else (4-bit layers, mixed-adapter
batches, disabled or merged adapters) runs peft's own forward. Measured by benchmarks/ppo_step.py.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear


def _lean_forward(self: LoraLinear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
        return self._peft_forward(x, *args, **kwargs)
    active = [name for name in self.active_adapters if name in self.lora_A]
    if any(name in self.lora_variant or self.lora_B[name].bias is not None for name in active):
        return self._peft_forward(x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    autocast = torch.is_autocast_enabled(x.device.type)
    for name in active:
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        # under autocast the matmul casts x to bf16 anyway: no float32 copy of x first (peft makes one, a
        # round trip that changes no value but costs a pass over x per layer)
        x_in = x if autocast else x.to(lora_a.weight.dtype)
        h = lora_a(self.lora_dropout[name](x_in)) * self.scaling[name]
        if autocast or result.dtype == lora_b.weight.dtype:
            flat = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), lora_b.weight.t())
            result = flat.view(result.shape)
        else:  # a bf16 base with float32 adapters and no autocast: as peft, the sum in float32, then cast back
            result = (result + lora_b(h)).to(result.dtype)
    return result


def use_lean_lora(model: torch.nn.Module) -> int:
    """Give every plain LoRA linear layer of `model` the lean forward; returns how many layers took it."""
    count = 0
    for module in model.modules():
        if type(module) is LoraLinear and not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module.forward = types.MethodType(_lean_forward, module)
            count += 1
    return count
