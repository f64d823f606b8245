"""Our LoRA layer: h = W0·x + scaling · B·A·dropout(x), with W0 frozen.

``AdapterLayer`` is what every variant shares (lorafit/dora.py, lorafit/vera.py build on it).
Only torch is imported here, so the layer can wrap any module that behaves like a linear layer
(a plain ``nn.Linear`` today, a bitsandbytes ``Linear4bit`` later) without changing its math.
Parts are named ``lora_A`` / ``lora_B`` exactly as PEFT names them, so saving is a key prefix away.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

InitKind = Literal["kaiming", "gaussian"]


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """alpha/r (LoRA paper), or alpha/sqrt(r) (rsLoRA), which keeps updates stable at large r."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling · B @ A as an fp32 [out, in] matrix, so a bf16 merge rounds once, not at every step.

    lora_A: [r, in], lora_B: [out, r]. Pure: used by LoRALinear.merge and by merging checkpoint files.
    """
    return (lora_B.float() @ lora_A.float()) * scaling


def merged_weight(weight: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W + delta computed in fp32, returned in ``dtype`` (default: W's); refuses non-finite results, also
    those of the cast (fp16 overflows past 65504) — PEFT's safe_merge — so a broken adapter can never be
    written into a model."""
    merged = (weight.float() + delta.to(weight.device)).to(dtype or weight.dtype)
    if not torch.isfinite(merged).all():
        raise ValueError(f"merging this LoRA update gives non-finite weights in {merged.dtype}")
    return merged


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and kin: weight [in, out]), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear layer or of a Conv1D (whose weight is [in, out])."""
    if is_conv1d(module):
        in_features, out_features = module.weight.shape
        return out_features, in_features
    return module.out_features, module.in_features


def config_dropout(modules: dict[str, AdapterLayer]) -> float:
    """The dropout a PEFT config records for these layers (one value per adapter: the largest)."""
    return max(m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0 for m in modules.values())


class TrainingHooks:
    """What a variant adds to the training loop; ``train.py`` calls these without knowing the variant.

    ``regularization()`` is added to each optimizer step's loss once (AdaLoRA's orthogonality penalty);
    ``on_step_end(step)`` runs after the optimizer step, while gradients still exist (AdaLoRA's budget
    schedule). The default — plain LoRA, DoRA — adds nothing and costs nothing.
    """

    def __init__(self, modules: dict[str, AdapterLayer], total_steps: int) -> None:
        self.modules = modules
        self.total_steps = total_steps

    def regularization(self) -> torch.Tensor | None:
        return None

    def on_step_end(self, step: int) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        """What an exact resume needs beyond the adapter, optimizer and schedule (AdaLoRA's scores)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class AdapterLayer(nn.Module):
    """A frozen ``base_layer`` plus a variant's trainable update; every variant (LoRA, DoRA, VeRA) is one.

    This class owns what all variants share: the base layer, the input dropout, the merged flag and
    merge/unmerge. A variant provides its update (``adapted_forward``), its trainable parameters under the
    names PEFT saves (``adapter_params``), a pure fp32 ``merged_weight_from(W)`` and its inverse, its PEFT
    config (``peft_config``) and tensors shared by all its layers (``shared_tensors``), and names its loop
    hooks in ``training_hooks``.
    """

    training_hooks: type[TrainingHooks] = TrainingHooks
    r: int
    alpha: float | None = None  # variants without a LoRA scaling (VeRA) have none
    adaptive_rank = False  # True where training itself decides the rank (AdaLoRA)

    @property
    def trained_rank(self) -> int:
        """The rank this layer's update has now (AdaLoRA: its kept triplets)."""
        return self.r

    def __init__(self, base_layer: nn.Module, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        # transformers' Conv1D (GPT-2) stores its weight [in, out] and computes x·W + b: PEFT's fan_in_fan_out.
        # The update is the same [out, in] B·A either way; only merging sees the layout (_float_base_weight).
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.out_features, self.in_features = self._base_shape(base_layer)
        # No dropout module at all when p == 0: nn.Identity costs nothing, nn.Dropout(0) still copies.
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def _base_shape(self, base_layer: nn.Module) -> tuple[int, int]:
        """(out, in) of the weight this adapter updates (lorafit/experts.py: of one expert's weight)."""
        return layer_shape(base_layer)

    @property
    def base_weight(self) -> torch.Tensor:
        """The weight this adapter updates, as stored (a quantized base: its packed storage)."""
        return self.base_layer.weight

    @property
    def adapter_dtype(self) -> torch.dtype:
        """Adapter weights live in the base weight's dtype when that is a float type; a quantized base
        (int8 / packed 4-bit storage) gets fp32 adapters, cast per call in forward()."""
        dtype = self.base_weight.dtype
        return dtype if dtype.is_floating_point else torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)  # the update already lives inside base_layer.weight
        return self.adapted_forward(x)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The parameters this adapter owns, under the names PEFT saves them with."""
        raise NotImplementedError

    def merged_weight_from(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight with this adapter folded in, computed in fp32, in W's dtype. Merging a loaded
        model and merging checkpoint files both use it."""
        raise NotImplementedError

    def unmerged_weight_from(self, merged: torch.Tensor) -> torch.Tensor:
        """The base weight back from ``merged_weight_from``'s result."""
        raise NotImplementedError

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """What the adapter file holds for this layer, by part name: its parameters (AdaLoRA: sliced)."""
        return dict(self.adapter_params())

    @torch.no_grad()
    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        """The inverse of ``saved_tensors``: copy a file's tensors into this layer (into this process's shard
        when the layer is sharded over processes: every process holds the whole file, no communication)."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        for part, param in self.adapter_params().items():
            value = tensors[part]
            if isinstance(param, DTensor):
                value = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements,
                                          src_data_rank=None)
            param.copy_(value)

    @classmethod
    def peft_config(cls, modules: dict[str, AdapterLayer]) -> dict[str, Any]:
        """The adapter_config.json fields of this variant (PEFT's names) for these wrapped modules."""
        raise NotImplementedError

    @classmethod
    def shared_tensors(cls, modules: dict[str, AdapterLayer]) -> dict[str, torch.Tensor]:
        """Saved tensors that belong to no single layer, by their full key (VeRA's projections)."""
        return {}

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight. Idempotent: merging twice does not add it twice."""
        if self.merged:
            return
        weight = self._float_base_weight()
        weight.copy_(self.merged_weight_from(weight))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight (exact up to the base dtype's rounding)."""
        if not self.merged:
            return
        weight = self._float_base_weight()
        weight.copy_(self.unmerged_weight_from(weight))
        self.merged = False

    def _float_base_weight(self) -> torch.Tensor:
        """The base weight as [out, in] (for Conv1D a transposed view: writes go through to the weight)."""
        weight = self.base_weight
        if not weight.dtype.is_floating_point:
            raise TypeError(
                f"cannot merge an adapter into a {weight.dtype} (quantized) base weight: merge into the "
                "full-precision checkpoint instead"
            )
        return weight.T if self.fan_in_fan_out else weight


class LoRALinear(AdapterLayer):
    """A frozen linear ``base_layer`` plus a trainable low-rank update.

    Shapes, for a base layer ``in_features -> out_features`` and rank ``r``:
        x: (..., in)  ->  lora_A: (..., r)  ->  lora_B: (..., out)
        lora_A.weight: [r, in]     lora_B.weight: [out, r]     delta_weight(): [out, in]
    B starts at zero, so a freshly wrapped model computes exactly what the base model computes.
    """

    num_experts = 1  # lorafit/experts.py: one (A, B) pair per expert, stacked along the rank dimension

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        init: InitKind = "kaiming",
        use_rslora: bool = False,
    ) -> None:
        super().__init__(base_layer, dropout)
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        device, dtype = self.base_weight.device, self.adapter_dtype
        rows = r * self.num_experts
        self.lora_A = nn.Linear(self.in_features, rows, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rows, self.out_features, bias=False, device=device, dtype=dtype)
        self.reset_lora_parameters(init)

    def reset_lora_parameters(self, init: InitKind = "kaiming") -> None:
        """A random, B zero: the product B·A is zero, but gradients reach B through A at once."""
        if init == "kaiming":
            # Same as nn.Linear's own init and PEFT's default (init_lora_weights=True).
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        elif init == "gaussian":
            # PEFT's init_lora_weights="gaussian".
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            raise ValueError(f"unknown LoRA init {init!r}: use 'kaiming' or 'gaussian'")
        nn.init.zeros_(self.lora_B.weight)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.base_layer) is nn.Linear:
            return self._fused_forward(x)
        # Other bases (bitsandbytes 4/8-bit) may keep their output for backward: add out of place.
        result = self.base_layer(x)
        lora_in = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(lora_in)) * self.scaling  # (..., out)
        return result + update.to(result.dtype)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """One GEMM adds scaling·(x·Aᵀ)·Bᵀ straight into the base output (C += alpha·A·B): no (..., out)
        update tensor and no separate scale and add passes over it, forward or backward.

        The update is computed in the dtype the base computes in (its weight dtype, or autocast's): with a
        bf16 base and fp32 LoRA weights (the optimizer's master copy) A and B are cast per call, [r, in]
        and [out, r] (tiny), and their gradients come back to fp32 through the cast. Under autocast the
        input is cast once here rather than once by the base matmul and again for A.
        Working on 2-D tensors keeps the in-place add off a view, which autograd would have to copy back
        in backward. In place is safe: nn.Linear's backward does not keep its output.
        """
        flat = x.reshape(-1, self.in_features)  # (N, in)
        if torch.is_autocast_enabled(flat.device.type):
            flat = flat.to(torch.get_autocast_dtype(flat.device.type))
        result = self.base_layer(flat)  # (N, out), a fresh tensor in the compute dtype
        dtype = result.dtype
        down = F.linear(self.lora_dropout(flat).to(dtype), self.lora_A.weight.to(dtype))  # (N, r)
        result.addmm_(down, self.lora_B.weight.to(dtype).t(), alpha=self.scaling)
        return result.view(*x.shape[:-1], self.out_features)

    def delta_weight(self) -> torch.Tensor:
        """scaling · B @ A, fp32, [out, in]."""
        return lora_delta(self.lora_A.weight, self.lora_B.weight, self.scaling)

    def merged_weight_from(self, weight: torch.Tensor) -> torch.Tensor:
        """W + scaling·B·A, computed in fp32, in W's dtype."""
        return merged_weight(weight, self.delta_weight())

    def unmerged_weight_from(self, merged: torch.Tensor) -> torch.Tensor:
        return merged_weight(merged, -self.delta_weight())

    def peft_fields(self) -> dict[str, Any]:
        """The LoraConfig fields that tell LoRA's variants apart (DoRA sets use_dora)."""
        return {"use_dora": False}

    @classmethod
    def peft_config(cls, modules: dict[str, AdapterLayer]) -> dict[str, Any]:
        """PEFT LoraConfig fields; per-module rank/alpha that differ from the first go to rank/alpha_pattern."""
        first = next(iter(modules.values()))
        return {
            "peft_type": "LORA",
            "r": first.r,
            "lora_alpha": first.alpha,
            "lora_dropout": config_dropout(modules),
            "use_rslora": first.use_rslora,
            **first.peft_fields(),
            "init_lora_weights": True,
            "rank_pattern": {name: m.r for name, m in modules.items() if m.r != first.r},
            "alpha_pattern": {name: m.alpha for name, m in modules.items() if m.alpha != first.alpha},
        }

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"
