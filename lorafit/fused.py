"""RMSNorm and SwiGLU with hand-written backward passes: the same forward, bit for bit, and less kept for backward.

A decoder layer's RMSNorm (Llama, Mistral, Qwen2, ...) computes in fp32 and autograd keeps that fp32 copy of its
input for backward: in a bf16 model, twice the bytes of the input it came from. Its SwiGLU MLP,
``down(silu(gate(x)) * up(x))``, keeps gate(x), silu(gate(x)) and up(x): three [tokens, intermediate] tensors.
``RMSNormFunction`` keeps the input in its own dtype and the [tokens, 1] fp32 reciprocal RMS, and computes its
gradient in fp32 from those; ``SiluMul`` keeps gate(x) and up(x) and computes silu(gate(x)) again in backward (the
same ops autograd runs otherwise, so the same gradients bit for bit).

``use_fused_layers(model)`` switches a model's modules over, in place, only where the module's own forward gives
bit for bit the same output as the fused one on a probe input (so a norm with another formula, Gemma's 1 + weight
say, keeps its own). Training only: ``lorafit train`` (without ``train.compile``, which fuses by itself) and the
bench's lorafit rows; eval and merge run the models as transformers defines them.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


class RMSNormFunction(torch.autograd.Function):
    """weight · (x / rms(x)) as transformers' LlamaRMSNorm computes it: normalised in fp32, rounded to x's dtype,
    then scaled by the weight. x: (..., H), weight: (H,). Keeps x and 1/rms (..., 1) for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        h = x.to(torch.float32)
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (h * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(torch.float32) * rstd  # (..., H)
        grad_normed = grad.to(torch.float32) * weight.to(torch.float32)
        # d/dx of x·rstd with rstd = (mean(x²) + eps)^-1/2: rstd · (g − n · mean(g · n))
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad.to(torch.float32) * normed.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0)
            grad_weight = grad_weight.to(weight.dtype)
        return grad_x.to(x.dtype), grad_weight, None


class SiluMul(torch.autograd.Function):
    """silu(gate) · up, as F.silu(gate) * up computes it; keeps gate and up, not silu(gate)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # The ops autograd runs for F.silu(gate) * up, in the same dtypes (so the same gradients, bit for bit),
        # with silu(gate) computed again instead of kept.
        gate, up = ctx.saved_tensors
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up


def _norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def use_fused_layers(model: nn.Module) -> tuple[int, int]:
    """Switch ``model``'s RMSNorms and SwiGLU MLPs to the functions above where they compute the same; returns how
    many of each were switched."""
    norms = mlps = 0
    for module in model.modules():
        if _is_rms_norm(module) and _same_output(module, _norm_forward, module.weight.shape[-1]):
            module.forward = types.MethodType(_norm_forward, module)
            norms += 1
        elif _is_swiglu(module) and _same_output(module, _mlp_forward, _in_features(module.gate_proj)):
            module.forward = types.MethodType(_mlp_forward, module)
            mlps += 1
    return norms, mlps


def _is_rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, nn.Parameter) and weight.dim() == 1
            and isinstance(getattr(module, "variance_epsilon", None), float) and weight.device.type != "meta")


def _is_swiglu(module: nn.Module) -> bool:
    # transformers' ACT2FN["silu"] is its own SiLUActivation (kernel-hub aware), "swish" torch's nn.SiLU.
    return (all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj"))
            and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"))


def _in_features(layer: nn.Module) -> int:
    return getattr(layer, "in_features", None) or getattr(getattr(layer, "base_layer", None), "in_features", 0)


@torch.no_grad()
def _same_output(module: nn.Module, fused, width: int) -> bool:
    """Does ``fused`` give ``module``'s own output bit for bit on a probe input of its dtype and device?"""
    if width <= 0:
        return False
    weight = next((p for p in module.parameters() if p.is_floating_point()), None)
    if weight is None or weight.device.type == "meta":
        return False
    probe = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    outputs = []
    try:
        for forward in (module, lambda x: fused(module, x)):
            with torch.random.fork_rng(devices=[weight.device] if weight.device.type == "cuda" else []):
                torch.manual_seed(0)  # the same dropout masks (LoRA dropout in train mode) for both; RNG restored
                outputs.append(forward(probe))
    except (RuntimeError, TypeError, ValueError):
        return False
    return torch.equal(*outputs)
