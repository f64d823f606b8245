"""DoRA (weight-decomposed LoRA, Liu et al. 2024): a trainable magnitude per output row on top of LoRA.

    W' = m · (W + s·B·A) / ‖W + s·B·A‖_row        m: [out], initialised to ‖W‖_row, so W' = W at start

As a layer, for x: (..., in), with base(x) = W·x + bias, lora(x) = B·A·x and g = m / ‖W + s·B·A‖_row:

    y = base(x) + (g − 1) ⊙ (W·x) + g ⊙ s·lora(x)

The norm is computed from detached LoRA weights and is itself detached (DoRA paper §4.3, as PEFT does), so
gradients reach m, A and B only through g's numerator and lora(x). PEFT builds the full out×in matrix
W + s·B·A every forward to take that norm; a row norm never needs it:

    ‖W + s·BA‖²_row = ‖W‖²_row + 2s·rowsum((W·Aᵀ) ⊙ B) + s²·rowsum((B·A·Aᵀ) ⊙ B)

with ‖W‖²_row computed once (W is frozen) and W·Aᵀ = base(A)ᵀ − bias, an [out, r] product that works for a
4-bit base as it is, without de-quantizing W. Saved in PEFT's format: ``…lora_magnitude_vector`` ([out],
no ``.weight``) and ``use_dora: true``; read here as LoRA's record plus that vector.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.adapters.base import is_conv1d
from lorafit.adapters.lora import PARTS, LoRALinear, LoRAMethod
from lorafit.errors import LorafitError

MAGNITUDE = "lora_magnitude_vector"  # [out]; PEFT saves it without ".weight"


def dora_row_norm(weight_sq_norm: torch.Tensor, weight_a: torch.Tensor, lora_A: torch.Tensor,
                  lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖W + s·B·A‖ per output row, fp32, [out], from ‖W‖²_row [out], W·Aᵀ [out, r], A [r, in], B [out, r]."""
    A, B = lora_A.float(), lora_B.float()
    cross = (weight_a.float() * B).sum(dim=1)          # rowsum((W·Aᵀ) ⊙ B): [out]
    update_sq = ((B @ (A @ A.T)) * B).sum(dim=1)        # ‖(B·A)_row‖²: [out]
    return (weight_sq_norm + 2 * scaling * cross + scaling**2 * update_sq).clamp_min(0).sqrt()


class DoRALinear(LoRALinear):
    """LoRALinear plus ``lora_magnitude_vector`` [out]. Shapes as LoRALinear's; see the module docstring."""

    def __init__(self, base_layer: nn.Module, *args, **kwargs) -> None:
        super().__init__(base_layer, *args, **kwargs)
        weight = dense_weight(base_layer)  # [out, in] fp32, once: W is frozen
        # ‖W‖²_row is a buffer, not state: it is recomputed from the base when the layer is built.
        self.register_buffer("weight_sq_norm", weight.pow(2).sum(dim=1), persistent=False)
        self.lora_magnitude_vector = nn.Parameter(self.weight_sq_norm.sqrt().to(self.lora_A.weight.dtype))

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (..., out), W·x + bias
        dtype = result.dtype
        lora_in = self.lora_dropout(x)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:  # W·x: the base output less its bias
            base_out = self._without_bias(result)
        else:  # dropout active: as PEFT, the magnitude term applies W to the dropped input
            base_out = self._without_bias(self.base_layer(lora_in))
        lora_out = F.linear(F.linear(lora_in.to(dtype), self.lora_A.weight.to(dtype)), self.lora_B.weight.to(dtype))
        # g stays fp32 (PEFT's mag_norm_scale is fp32 too): bf16 spaces numbers just above 1 by 2^-7, so a bf16 g
        # moves in steps of 0.8% and loses AdamW's steps on m (~lr), which would leave the magnitude untrained.
        gain = self.lora_magnitude_vector.float() / self.row_norm().detach()  # [out], fp32
        return _DoRAOutput.apply(result, base_out, lora_out, gain, self.scaling)

    @torch.no_grad()
    def row_norm(self) -> torch.Tensor:
        """‖W + s·B·A‖_row [out], fp32, from the current (detached) A and B."""
        weight = self.base_layer.weight
        A = self.lora_A.weight.to(weight.dtype if weight.dtype.is_floating_point else torch.float32)
        weight_a = self._without_bias(self.base_layer(A)).float().T  # W·Aᵀ: [out, r]
        return dora_row_norm(self.weight_sq_norm, weight_a, self.lora_A.weight, self.lora_B.weight, self.scaling)

    def _without_bias(self, out: torch.Tensor) -> torch.Tensor:
        """A base-layer output minus its bias: W·x."""
        bias = getattr(self.base_layer, "bias", None)
        return out if bias is None else out - bias.to(out.dtype)

    def merged_weight_from(self, weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """m · (W + s·B·A) / ‖W + s·B·A‖_row, computed in fp32, in ``dtype`` (default W's); refuses non-finite
        results. Keeps the row factor m / ‖·‖_row [out] so ``unmerged_weight_from`` can undo it."""
        updated = weight.float() + self.delta_weight().to(weight.device)
        self._merge_factor = self.lora_magnitude_vector.float().to(weight.device) / updated.norm(dim=1)
        merged = (updated * self._merge_factor[:, None]).to(dtype or weight.dtype)
        if not torch.isfinite(merged).all():
            raise ValueError(f"merging this DoRA update gives non-finite weights in {merged.dtype}")
        return merged

    def unmerged_weight_from(self, merged: torch.Tensor) -> torch.Tensor:
        return (merged.float() / self._merge_factor[:, None] - self.delta_weight()).to(merged.dtype)

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise LorafitError("a DoRA adapter rescales each output row of W + ΔW by a learned magnitude, which is "
                           "not a low-rank update W + B·A: llama.cpp's --lora cannot apply it. Export the full "
                           "model instead (without --adapter-only)")

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {**super().adapter_params(), MAGNITUDE: self.lora_magnitude_vector}

    def peft_fields(self) -> dict[str, Any]:
        return {"use_dora": True}


class _DoRAOutput(torch.autograd.Function):
    """y = result + (g − 1)·base + g·s·lora, keeping one (..., out) tensor for backward instead of two.

    Autograd on the plain expression saves ``base`` (for ∂y/∂g) and ``s·lora`` (for ∂y/∂g) separately;
    both only ever meet g as ``base + s·lora``, so that sum is all backward needs:
        ∂y/∂result = G,  ∂y/∂base = (g − 1)·G,  ∂y/∂lora = g·s·G,  ∂y/∂g = Σ_tokens G ⊙ (base + s·lora)
    g is fp32; the update (g − 1)·base + g·s·lora is formed in fp32 and y rounded to the layer's dtype once,
    as PEFT does. In bf16, rounding g or the update first would lose most of a step's change to the magnitude.
    """

    @staticmethod
    def forward(ctx, result, base_out, lora_out, gain, scaling):
        combined = base_out + scaling * lora_out  # (..., out), the layer's dtype
        ctx.save_for_backward(combined, gain)
        ctx.scaling = scaling
        return (result + ((gain - 1) * base_out + gain * (scaling * lora_out))).to(result.dtype)

    @staticmethod
    def backward(ctx, grad):
        combined, gain = ctx.saved_tensors
        tokens = tuple(range(grad.dim() - 1))
        grad_gain = (grad.float() * combined.float()).sum(dim=tokens)
        return grad, (grad * (gain - 1)).to(grad.dtype), (grad * (gain * ctx.scaling)).to(grad.dtype), grad_gain, None


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """A linear layer's weight as a dense fp32 [out, in] tensor; a bitsandbytes 4-bit weight de-quantized,
    a Conv1D weight ([in, out]) transposed."""
    weight = layer.weight
    if weight.dtype.is_floating_point:
        return weight.detach().float().T if is_conv1d(layer) else weight.detach().float()
    state = getattr(weight, "quant_state", None)
    if state is None:
        raise TypeError(f"DoRA needs a float or 4-bit base weight, not {weight.dtype} ({type(layer).__name__}); "
                        "use model.quantize: 4bit or no quantization")
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(weight.data, state).float()


class DoRAMethod(LoRAMethod):
    """LoRA's record with ``use_dora: true`` and one more tensor per module."""

    name, layer = "dora", DoRALinear
    parts = (*PARTS, MAGNITUDE)

    def owns(self, config: dict[str, Any]) -> bool:
        return config.get("peft_type", "LORA") == "LORA" and bool(config.get("use_dora", False))

    def check_ranks(self, found: dict[str, torch.Tensor], rank: int, experts: int, where: str) -> None:
        super().check_ranks(found, rank, experts, where)
        magnitude, B = found[MAGNITUDE], found["lora_B.weight"]
        if tuple(magnitude.shape) != (B.shape[0],):
            raise LorafitError(f"{where} has {MAGNITUDE} {list(magnitude.shape)}, which does not agree with lora_B "
                               f"{list(B.shape)} (one magnitude per output row)")


METHOD = DoRAMethod()
