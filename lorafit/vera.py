"""VeRA (vector-based random matrix adaptation, Kopiczko et al. 2024): one pair of frozen random matrices
shared by every adapted layer, and two trainable vectors per layer.

    y = base(x) + λ_b ⊙ B·(λ_d ⊙ A·dropout(x))        ΔW = (λ_b ⊙ B) · (λ_d ⊙ A)

A [r, max_in] and B [max_out, r] are drawn once, kaiming-uniform, A then B, from
``torch.Generator("cpu").manual_seed(projection_prng_key)`` exactly as PEFT draws them (max_in / max_out:
the largest input and output widths among the targeted layers); a layer [out, in] uses A[:, :in] and
B[:out, :]. Per layer only λ_b [out] (starts at 0, so the model starts as the base) and λ_d [r] (starts at
``d_initial``) train: r + out parameters instead of LoRA's r·(in + out). Saved in PEFT's format
(``peft_type: VERA``; ``…vera_lambda_b`` / ``…vera_lambda_d``; the projections as ``base_model.vera_A`` /
``base_model.vera_B``, always: ``save_projection: true``; PEFT adapters saved without them are refused).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.lora import AdapterLayer, config_dropout, layer_shape, merged_weight

PROJECTION_KEYS = ("base_model.vera_A", "base_model.vera_B")


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-b, b) with b = sqrt(3)·sqrt(2)/sqrt(fan_in), fan_in = shape[1]: PEFT's ``_kaiming_init``."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAProjections(nn.Module):
    """The frozen A [r, max_in] and B [max_out, r] every VeRA layer of a model shares (one module object,
    so moving the model moves them once). Buffers, not in the model's state dict: the adapter file holds
    them once, under PEFT's model-level keys."""

    def __init__(self, vera_A: torch.Tensor, vera_B: torch.Tensor, key: int | None) -> None:
        super().__init__()
        self.register_buffer("vera_A", vera_A, persistent=False)
        self.register_buffer("vera_B", vera_B, persistent=False)
        self.key = key

    @staticmethod
    def draw(r: int, max_in: int, max_out: int, key: int) -> VeRAProjections:
        generator = torch.Generator(device="cpu").manual_seed(key)
        vera_A = kaiming_uniform((r, max_in), generator)  # drawn first, as in PEFT
        vera_B = kaiming_uniform((max_out, r), generator)
        return VeRAProjections(vera_A, vera_B, key)

    @property
    def r(self) -> int:
        return self.vera_A.shape[0]


def vera_delta(vera_A: torch.Tensor, vera_B: torch.Tensor, lambda_b: torch.Tensor, lambda_d: torch.Tensor,
               shape: tuple[int, int]) -> torch.Tensor:
    """(λ_b ⊙ B[:out]) · (λ_d ⊙ A[:, :in]) as an fp32 [out, in] matrix (``shape`` = (out, in)). Pure:
    used by VeRALinear.merge and by merging checkpoint files."""
    out_features, in_features = shape
    scaled_B = lambda_b.float()[:, None] * vera_B[:out_features].float()  # [out, r]
    scaled_A = lambda_d.float()[:, None] * vera_A[:, :in_features].float()  # [r, in]
    return scaled_B @ scaled_A


class VeRALinear(AdapterLayer):
    """A frozen linear layer plus VeRA's update; see the module docstring.

    x: (..., in) -> A-slice: (..., r) -> ⊙ λ_d -> B-slice: (..., out) -> ⊙ λ_b
    """

    def __init__(self, base_layer: nn.Module, projections: VeRAProjections, dropout: float = 0.0,
                 d_initial: float = 0.1) -> None:
        super().__init__(base_layer, dropout)
        if projections.vera_A.shape[1] < self.in_features or projections.vera_B.shape[0] < self.out_features:
            raise ValueError(f"VeRA projections {list(projections.vera_A.shape)} / {list(projections.vera_B.shape)} "
                             f"are too small for a [{self.out_features}, {self.in_features}] layer")
        self.r = projections.r
        self.d_initial = d_initial
        self.projections = projections
        device, dtype = base_layer.weight.device, self.adapter_dtype
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype))
        self.vera_lambda_d = nn.Parameter(torch.full((self.r,), d_initial, device=device, dtype=dtype))

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        # The base may keep its output for backward (bitsandbytes): the update is added out of place.
        result = self.base_layer(x)  # (..., out)
        dtype = result.dtype
        A = self.projections.vera_A[:, : self.in_features].to(dtype)  # [r, in]
        B = self.projections.vera_B[: self.out_features].to(dtype)  # [out, r]
        down = F.linear(self.lora_dropout(x).to(dtype), A) * self.vera_lambda_d.to(dtype)  # (..., r)
        return result + F.linear(down, B) * self.vera_lambda_b.to(dtype)

    def delta_weight(self) -> torch.Tensor:
        return vera_delta(self.projections.vera_A, self.projections.vera_B, self.vera_lambda_b,
                          self.vera_lambda_d, (self.out_features, self.in_features))

    def merged_weight_from(self, weight: torch.Tensor) -> torch.Tensor:
        return merged_weight(weight, self.delta_weight())

    def unmerged_weight_from(self, merged: torch.Tensor) -> torch.Tensor:
        return merged_weight(merged, -self.delta_weight())

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"vera_lambda_b": self.vera_lambda_b, "vera_lambda_d": self.vera_lambda_d}

    @classmethod
    def peft_config(cls, modules: dict[str, AdapterLayer]) -> dict[str, Any]:
        """PEFT VeraConfig fields."""
        first = next(iter(modules.values()))
        return {
            "peft_type": "VERA",
            "r": first.r,
            "projection_prng_key": first.projections.key if first.projections.key is not None else 0,
            "save_projection": True,  # lorafit always saves them (and reads only adapters that carry them)
            "vera_dropout": config_dropout(modules),
            "d_initial": first.d_initial,
            "init_weights": True,
        }

    @classmethod
    def shared_tensors(cls, modules: dict[str, AdapterLayer]) -> dict[str, torch.Tensor]:
        projections = next(iter(modules.values())).projections
        return dict(zip(PROJECTION_KEYS, (projections.vera_A, projections.vera_B), strict=True))

    def extra_repr(self) -> str:
        return f"r={self.r} (shared projections), merged={self.merged}"


def projections_for(layers: list[nn.Module], r: int, key: int) -> VeRAProjections:
    """The shared projections for these base layers: as wide as the widest input and output among them."""
    max_out = max(layer_shape(layer)[0] for layer in layers)
    max_in = max(layer_shape(layer)[1] for layer in layers)
    projections = VeRAProjections.draw(r, max_in, max_out, key)
    return projections.to(layers[0].weight.device)
