"""What every adapter method shares: the layer base class, merge/unmerge written once over ``delta_weight()``,
the training-loop hooks, and the two records a method exchanges with the rest of lorafit.

``AdapterLayer`` wraps a frozen ``base_layer`` (``nn.Linear``, transformers' ``Conv1D``, a bitsandbytes 4/8-bit
linear, or, in lorafit/adapters/experts.py, a module whose parameter is adapted) without changing its math.
``SavedUpdate`` is one module's update as an adapter file holds it: merge and export compute with it by building
the method's own layer over the weight, so each method's math is written once, in its layer. ``Method`` is what
the registry (lorafit/adapters/__init__.py) holds per method: the layer class, how it wraps planned targets,
and how it reads its PEFT record. Only torch is imported here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# ``lora`` below is the recipe's lora section (lorafit.config.LoRAConfig); typed Any here, the bottom layer,
# because config.py imports the registry.

def merged_weight(weight: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W + delta computed in fp32, returned in ``dtype`` (default: W's); refuses non-finite results, also
    those of the cast (fp16 overflows past 65504) — PEFT's safe_merge — so a broken adapter can never be
    written into a model."""
    merged = (weight.float() + delta.to(weight.device)).to(dtype or weight.dtype)
    if not torch.isfinite(merged).all():
        raise ValueError(f"merging this update gives non-finite weights in {merged.dtype}")
    return merged


# 16-bit compute dtypes in which a LoRA layer's output is rounded once (``rounded_once``).
ROUNDED_ONCE = (torch.bfloat16, torch.float16)


def rounded_once(x: torch.Tensor, down: torch.Tensor, weight: torch.Tensor, scaled_B: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """W·x (+ bias) + s·B·down as one GEMM, [x | down] @ [W | s·B]ᵀ: the update joins the base output in the GEMM's
    fp32 accumulator and the sum is rounded once (why: lorafit/adapters/lora.py ``one_rounding_linear``).
    x: (N, in), down: (N, r), weight: (out, in), scaled_B = s·B: (out, r), all in one 16-bit dtype -> (N, out)."""
    return F.linear(torch.cat([x, down], dim=1), torch.cat([weight, scaled_B], dim=1), bias)


def pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's rank/alpha_pattern rule: the first key whose regex matches the end of the module path."""
    return next((value for key, value in patterns.items() if pattern_matches(key, module_name)), default)


def pattern_matches(key: str, module_name: str) -> bool:
    return re.match(rf"(.*\.)?({key})$", module_name) is not None


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
    """What a method adds to the training loop; ``train.py`` calls these without knowing the method.

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
    """A frozen ``base_layer`` plus a method's trainable update; every method's layer is one.

    This class owns what all methods share: the base layer, the input dropout, the merged flag and
    merge/unmerge over ``delta_weight()``. A method provides its update (``adapted_forward``), its trainable
    parameters under the names PEFT saves (``adapter_params``), ``delta_weight()`` (fp32 [out, in]; a method
    whose merge is not W + ΔW overrides ``merged_weight_from`` and ``unmerged_weight_from``), its PEFT config
    (``peft_config``), tensors shared by all its layers (``shared_tensors``), and its loop hooks.
    """

    training_hooks: type[TrainingHooks] = TrainingHooks
    r: int
    alpha: float | None = None  # methods without a LoRA scaling (VeRA) have none
    adaptive_rank = False  # True where training itself decides the rank (AdaLoRA)
    disabled = False  # switched off: the layer computes its base layer alone (lorafit/adapters/switch.py)

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
        """(out, in) of the weight this adapter updates (experts.py: of one expert's weight)."""
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
        if self.merged or self.disabled:
            return self.base_layer(x)  # merged: the update already lives inside base_layer.weight
        return self.adapted_forward(x)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The parameters this adapter owns, under the names PEFT saves them with."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """The update ΔW as an fp32 tensor of the base weight's shape ([out, in])."""
        raise NotImplementedError

    def merged_weight_from(self, weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W + ΔW computed in fp32, in ``dtype`` (default W's). Merging a loaded model and merging checkpoint
        files both use it."""
        return merged_weight(weight, self.delta_weight(), dtype)

    def unmerged_weight_from(self, merged: torch.Tensor) -> torch.Tensor:
        """The base weight back from ``merged_weight_from``'s result."""
        return merged_weight(merged, -self.delta_weight())

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW as B' @ A' (A' [k, in], B' [out, k], fp32, scaling folded into B'): what an A/B-only format such
        as llama.cpp's LoRA GGUF can hold. Methods whose update is not low-rank refuse (LorafitError)."""
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
        """The adapter_config.json fields of this method (PEFT's names) for these wrapped modules."""
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


@dataclass(frozen=True)
class TargetSpec:
    """One planned target (lorafit/targets.py): its method (lora.variant), rank, alpha and A's initialisation
    ("kaiming", "gaussian", or "eva" with ``start`` [r, in] from EVA); ``parameter`` (experts.ParamTarget) for an
    MoE expert parameter."""

    method: str
    r: int
    alpha: float
    init: str
    parameter: Any = None
    start: torch.Tensor | None = field(default=None, compare=False, repr=False)


class WeightStub(nn.Module):
    """A stand-in base layer holding only a weight [out, in]: builds a method's layer off-model, so merging
    checkpoint files and exporting compute with the layer's own math."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight  # a plain attribute, not a parameter: nothing here trains or is saved
        self.out_features, self.in_features = weight.shape


@dataclass
class SavedUpdate:
    """One module's update as an adapter file holds it: the tensors its layer's ``load_saved`` takes, the layer's
    constructor arguments (dropout aside), and, for an MoE expert parameter, which one (experts.ParamTarget)."""

    method: Method
    tensors: dict[str, torch.Tensor]
    kwargs: dict[str, Any] = field(default_factory=dict)
    parameter: Any = None

    def misfit(self, out_features: int, in_features: int) -> str | None:
        """Why this update cannot apply to a base weight [out, in] (per expert), or None."""
        return self.method.misfit(self, out_features, in_features)

    def layer_over(self, weight: torch.Tensor) -> AdapterLayer:
        """The method's layer over a stand-in holding ``weight`` [out, in], with this update's tensors in fp32."""
        layer = self.method.layer(WeightStub(weight), **self.kwargs)
        for param in layer.adapter_params().values():
            param.data = param.data.float()  # hold the saved values exactly (a bf16 checkpoint must not round them)
        layer.load_saved(self.tensors)
        return layer

    @torch.no_grad()  # plain tensors out: the layer's parameters only hold the saved values
    def merged_weight(self, weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base weight with this update folded in (fp32 math, refused if non-finite), as the layer merges."""
        return self.layer_over(weight).merged_weight_from(weight, dtype)

    @torch.no_grad()
    def low_rank(self, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW of a base weight of ``shape`` (out, in) as B' @ A' (see AdapterLayer.low_rank)."""
        lora_a, lora_b = self.method.low_rank(self, shape)
        return lora_a.detach(), lora_b.detach()  # .float() of an fp32 parameter is the parameter itself


class Method:
    """One adapter method as the registry holds it: its layer class and PEFT record (read side; the write side
    is the layer's ``saved_tensors`` / ``peft_config`` / ``shared_tensors``), and how it wraps planned targets."""

    name: str
    layer: type[AdapterLayer]
    peft_type: str  # adapter_config.json's peft_type

    def owns(self, config: dict[str, Any]) -> bool:
        """Whether a saved adapter_config.json is this method's record."""
        return config.get("peft_type", "LORA") == self.peft_type

    def check_config(self, config: dict[str, Any], path: Any) -> None:
        """Refuse (LorafitError) a record of this method that lorafit cannot load exactly."""

    def read(self, tensors: dict[str, torch.Tensor], config: dict[str, Any], where: Any,
             parameters: dict[str, Any]) -> dict[str, SavedUpdate]:
        """Module path -> its update, from the adapter file's tensors (``where``: the file, for messages) and
        config; ``parameters``: PEFT's saved path -> experts.ParamTarget of the MoE parameters it targets."""
        raise NotImplementedError

    def misfit(self, update: SavedUpdate, out_features: int, in_features: int) -> str | None:
        raise NotImplementedError

    def low_rank(self, update: SavedUpdate, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        stand_in = torch.zeros((), dtype=torch.float32).expand(shape)  # [out, in] without memory
        return update.layer_over(stand_in).low_rank()

    def plan(self, spec: TargetSpec, lora: Any) -> TargetSpec:
        """The method's own settings for one planned target (AdaLoRA: its initial rank)."""
        return spec

    def wrap(self, model: nn.Module, specs: dict[str, TargetSpec], lora: Any) -> None:
        """Wrap every planned target of ``model`` (path -> its TargetSpec) in this method's layer."""
        raise NotImplementedError


def wrap_module(model: nn.Module, name: str, layer: type[AdapterLayer], **kwargs: Any) -> AdapterLayer:
    """Replace module ``name`` of ``model`` by ``layer(module, **kwargs)``, in the module's train/eval mode."""
    base = model.get_submodule(name)
    wrapped = layer(base, **kwargs)
    wrapped.train(base.training)  # a new module starts in training mode: in an eval model, dropout would run
    model.set_submodule(name, wrapped)
    return wrapped
