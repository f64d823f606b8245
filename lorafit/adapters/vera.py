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
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.adapters.base import (
    AdapterLayer,
    Method,
    SavedUpdate,
    TargetSpec,
    config_dropout,
    layer_shape,
    wrap_module,
)
from lorafit.adapters.lora import KEY_PREFIX, group_by_module
from lorafit.errors import LorafitError

if TYPE_CHECKING:
    from lorafit.config import LoRAConfig

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

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW = (λ_b ⊙ B-slice) @ (λ_d ⊙ A-slice): A' [r, in], B' [out, r], fp32."""
        scaled_A = self.vera_lambda_d.float()[:, None] * self.projections.vera_A[:, : self.in_features].float()
        scaled_B = self.vera_lambda_b.float()[:, None] * self.projections.vera_B[: self.out_features].float()
        return scaled_A, scaled_B

    def delta_weight(self) -> torch.Tensor:
        """(λ_b ⊙ B[:out]) · (λ_d ⊙ A[:, :in]), fp32, [out, in]."""
        scaled_A, scaled_B = self.low_rank()
        return scaled_B @ scaled_A

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


class VeRAMethod(Method):
    """PEFT's VERA record: per module λ_b / λ_d, and the projections once, at the model level."""

    name, layer, peft_type = "vera", VeRALinear, "VERA"

    def check_config(self, config: dict[str, Any], path: Any) -> None:
        if not config.get("save_projection", True):
            raise LorafitError(f"{path}: a VeRA adapter saved without its projections (save_projection: false); "
                               "lorafit reads VeRA adapters that carry them: re-save it with save_projection=True")

    def read(self, tensors: dict[str, torch.Tensor], config: dict[str, Any], where: Any,
             parameters: dict[str, Any]) -> dict[str, SavedUpdate]:
        tensors = dict(tensors)
        missing = [key for key in PROJECTION_KEYS if key not in tensors]
        if missing:
            raise LorafitError(f"{where}: a VeRA adapter needs {', '.join(missing)} (the shared projections)")
        vera_A, vera_B = (tensors.pop(key) for key in PROJECTION_KEYS)
        if vera_A.ndim != 2 or vera_B.ndim != 2 or vera_A.shape[0] != vera_B.shape[1]:
            raise LorafitError(f"{where}: projections vera_A {list(vera_A.shape)} and vera_B {list(vera_B.shape)} "
                               "do not agree (need [r, in] and [out, r])")
        projections = VeRAProjections(vera_A, vera_B, config.get("projection_prng_key"))
        expected = (f"a VeRA adapter holds {KEY_PREFIX}<module>.vera_lambda_b / vera_lambda_d and the projections")
        parts = group_by_module(tensors, ("vera_lambda_b", "vera_lambda_d"), where, expected)
        kwargs = {"projections": projections, "d_initial": float(config.get("d_initial", 0.1))}
        for name, pair in parts.items():
            if pair["vera_lambda_d"].shape != (vera_A.shape[0],):
                raise LorafitError(f"{where}: module {name} needs vera_lambda_b [out] and vera_lambda_d "
                                   f"[{vera_A.shape[0]}] (r from the projections)")
        return {name: SavedUpdate(self, pair, kwargs) for name, pair in parts.items()}

    def misfit(self, update: SavedUpdate, out_features: int, in_features: int) -> str | None:
        projections, lambda_b = update.kwargs["projections"], update.tensors["vera_lambda_b"]
        max_out, max_in = projections.vera_B.shape[0], projections.vera_A.shape[1]
        if lambda_b.shape[0] == out_features and in_features <= max_in and out_features <= max_out:
            return None
        return (f"adapter has vera_lambda_b [{lambda_b.shape[0]}] and projections for layers up to "
                f"[{max_out}, {max_in}], but the base layer is [{out_features}, {in_features}] (out, in)")

    def wrap(self, model: nn.Module, specs: dict[str, TargetSpec], lora: LoRAConfig) -> None:
        """VeRA layers share one pair of projections, drawn for the widest targeted input and output."""
        settings = lora.vera or _defaults()
        projections = projections_for([model.get_submodule(name) for name in specs], lora.r,
                                      settings.projection_prng_key)
        for name in specs:
            wrap_module(model, name, self.layer, projections=projections, dropout=lora.dropout,
                        d_initial=settings.d_initial)


def _defaults():
    from lorafit.config import VeRAConfig

    return VeRAConfig()


METHOD = VeRAMethod()
