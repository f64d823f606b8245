"""LoRA on a parameter instead of a linear layer: the fused experts (and routers) of Mixture-of-Experts models.

transformers stores the experts of an MoE block (Mixtral, Qwen3-MoE, gpt-oss, ...) as one 3-D parameter per
projection, not as ``nn.Linear`` modules:
    experts.gate_up_proj [experts, out, in]   used as F.linear(x, W[e]): 2·intermediate x hidden
    experts.down_proj    [experts, out, in]   (or [experts, in, out] where the module says ``is_transposed``)
and the router as a module with a 2-D ``weight`` [experts, hidden]. ``ParamLoRA`` gives every expert e its
own rank-r update of such a parameter, ΔW[e] = scaling · B_e · A_e, in PEFT's ``target_parameters`` layout
(``lora.ParamWrapper``), so PEFT loads the files and lorafit loads PEFT's:
    lora_A.weight [experts·r, in]   rows e·r .. e·r+r-1 are A_e           (PEFT: reshape(E, r, in))
    lora_B.weight [out, r·experts]  column j·E + e is column j of B_e    (PEFT: reshape(out, r, E))
Several parameters of one module nest, the first one the module registers innermost, and so do their keys:
``experts.base_layer.lora_A.weight`` (gate_up_proj) and ``experts.lora_A.weight`` (down_proj), as in PEFT.

The forward runs the unchanged module with W + ΔW substituted for W (``torch.func.functional_call``), so every
experts implementation transformers has (eager loop, batched or grouped matmul) sees the adapted weights.
The cost: each step forms W + ΔW for all experts of the layer, and backward keeps it (use
train.gradient_checkpointing on large MoE models to hold one layer's worth at a time). Like PEFT: no dropout
(it cannot be factored out of a weight update), no DoRA or other variants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorafit.adapters.base import AdapterLayer
from lorafit.adapters.lora import InitKind, LoRALinear

# A fused gate_up_proj holds two projections (gate and up) in one tensor: all-linear gives it twice the rank
# and alpha (so the same scaling), as PEFT does when it maps the separate gate/up projections onto it.
FUSED_PAIRS = {"gate_up_proj": 2}


@dataclass(frozen=True)
class ParamTarget:
    """A targetable parameter: ``module`` path, parameter ``name``; ``path`` is what recipes and configs use."""

    module: str
    name: str
    layout: ExpertLayout
    router: bool = False  # a router's 2-D weight: adapted only when named

    @property
    def path(self) -> str:
        return f"{self.module}.{self.name}"


def param_targets(model: nn.Module) -> list[ParamTarget]:
    """Every expert parameter (3-D, on a module that says ``num_experts``: transformers' experts modules) and
    every router weight (a module with ``top_k`` or ``num_experts`` and a 2-D ``weight``), in model order and,
    within a module, in the order the module registers them (which is the order PEFT nests them in). Other
    3-D weights (a convolution's kernel) are not experts."""
    found = []
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Linear, AdapterLayer, nn.modules.conv._ConvNd)) or not module_name:
            continue
        experts = hasattr(module, "num_experts")
        router = experts or hasattr(module, "top_k")
        for name, param in module.named_parameters(recurse=False):
            if experts and param.ndim == 3 and param.is_floating_point():
                found.append(ParamTarget(module_name, name, ExpertLayout.of(module, name)))
            elif router and name == "weight" and param.ndim == 2:
                found.append(ParamTarget(module_name, name, ExpertLayout.of(module, name), router=True))
    return found


@dataclass(frozen=True)
class ExpertLayout:
    """How a targeted parameter holds its experts' weights: E of them, each [out, in] or, ``transposed``, [in, out]
    (a 2-D parameter is one [out, in] weight)."""

    experts: int
    out_features: int
    in_features: int
    transposed: bool

    @classmethod
    def of(cls, owner: nn.Module, name: str) -> ExpertLayout:
        shape = getattr(owner, name).shape
        if len(shape) == 2:
            return cls(1, shape[0], shape[1], False)
        # Per expert W[e] is [out, in] (used as F.linear(x, W[e])), or [in, out] where the module says is_transposed.
        transposed = bool(getattr(owner, "is_transposed", False))
        experts, first, second = shape
        return cls(experts, second, first, True) if transposed else cls(experts, first, second, False)


def innermost(module: nn.Module) -> nn.Module:
    """The module that owns the parameter, below any ParamLoRA wrappers."""
    while isinstance(module, ParamLoRA):
        module = module.base_layer
    return module


class ParamLoRA(LoRALinear):
    """A module whose parameter ``parameter_name`` (2-D [out, in] or 3-D per expert) gets a low-rank update per
    expert. Shapes for E experts, rank r: A [E·r, in], B [out, r·E]; ``delta_weight()`` has the parameter's shape."""

    def __init__(self, base_layer: nn.Module, parameter_name: str, r: int, alpha: float, dropout: float = 0.0,
                 init: InitKind = "kaiming", use_rslora: bool = False) -> None:
        if dropout:
            raise ValueError("LoRA on a parameter cannot use dropout: it is a weight update, x cannot be dropped")
        self.parameter_name = parameter_name  # before nn.Module.__init__: read by _base_shape below
        super().__init__(base_layer, r=r, alpha=alpha, dropout=0.0, init=init, use_rslora=use_rslora)

    def _base_shape(self, base_layer: nn.Module) -> tuple[int, int]:
        layout = ExpertLayout.of(innermost(base_layer), self.parameter_name)
        self.num_experts, self.transposed = layout.experts, layout.transposed
        return layout.out_features, layout.in_features

    @property
    def base_weight(self) -> torch.Tensor:
        return getattr(innermost(self.base_layer), self.parameter_name)

    @property
    def parameter_path(self) -> str:
        """Path of the parameter relative to ``base_layer`` (through inner wrappers): what functional_call swaps."""
        depth, module = 0, self.base_layer
        while isinstance(module, ParamLoRA):
            depth, module = depth + 1, module.base_layer
        return "base_layer." * depth + self.parameter_name

    def forward(self, *args, **kwargs):  # the wrapped module's own signature (experts: x, indices, weights)
        if self.merged or self.disabled:
            return self.base_layer(*args, **kwargs)
        adapted = self._adapted_parameter()
        return torch.func.functional_call(self.base_layer, {self.parameter_path: adapted}, args, kwargs,
                                          strict=False, tie_weights=False)

    def _factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) per expert: [E, out, r] and [E, r, in], in ``dtype``."""
        experts, r = self.num_experts, self.r
        lora_A = self.lora_A.weight.to(dtype).reshape(experts, r, self.in_features)
        lora_B = self.lora_B.weight.to(dtype).reshape(self.out_features, r, experts).permute(2, 0, 1)
        return lora_B, lora_A

    def _adapted_parameter(self) -> torch.Tensor:
        """W + scaling·B_e·A_e for every expert at once (one batched matmul into W), in W's dtype."""
        weight = self.base_weight
        lora_B, lora_A = self._factors(weight.dtype)
        if weight.ndim == 2:
            return torch.addmm(weight, lora_B[0], lora_A[0], alpha=self.scaling)
        if self.transposed:  # W[e] is [in, out]: add (B_e·A_e)ᵀ = A_eᵀ·B_eᵀ
            return torch.baddbmm(weight, lora_A.transpose(1, 2), lora_B.transpose(1, 2), alpha=self.scaling)
        return torch.baddbmm(weight, lora_B, lora_A, alpha=self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """scaling · B_e·A_e for every expert, fp32, in the parameter's layout."""
        lora_B, lora_A = self._factors(torch.float32)
        delta = torch.bmm(lora_B, lora_A) * self.scaling  # (E, out, in)
        if self.base_weight.ndim == 2:
            return delta[0]
        return delta.transpose(1, 2) if self.transposed else delta

    def extra_repr(self) -> str:
        experts = f", experts={self.num_experts}" if self.base_weight.ndim == 3 else ""
        return f"parameter={self.parameter_name}{experts}, {super().extra_repr()}"


def wrap_parameter(model: nn.Module, target: ParamTarget, **lora_kwargs) -> ParamLoRA:
    """Wrap ``target.module`` (or the wrapper already around it: a second parameter nests outside the first)."""
    base = model.get_submodule(target.module)
    wrapped = ParamLoRA(base, target.name, **lora_kwargs)
    wrapped.train(base.training)
    model.set_submodule(target.module, wrapped)
    return wrapped


def wrap_parameters(model: nn.Module, specs: dict[str, Any], lora: Any) -> None:
    """Wrap the planned MoE parameter targets (path -> targets.TargetSpec with ``parameter``): plain LoRA
    without dropout, the only method PEFT applies to parameters (targets.check_parameter_settings)."""
    for spec in specs.values():
        wrap_parameter(model, spec.parameter, r=spec.r, alpha=spec.alpha, init=spec.init, use_rslora=lora.use_rslora)


def named_in_config(model: nn.Module, target_parameters: list[str]) -> list[ParamTarget]:
    """The model's expert parameters an adapter_config.json's ``target_parameters`` names (PEFT's rule: the full
    path or a dotted suffix of it), in registration order."""
    return [t for t in param_targets(model)
            if any(t.path == key or t.path.endswith("." + key) for key in target_parameters)]


def saved_paths(targets: list[ParamTarget]) -> dict[str, ParamTarget]:
    """PEFT's key path of each adapted parameter: with k adapted parameters on one module, the i-th registered
    one is saved under ``module`` + ``.base_layer`` × (k - i) (``targets`` in registration order)."""
    per_module: dict[str, list[ParamTarget]] = {}
    for target in targets:
        per_module.setdefault(target.module, []).append(target)
    return {module + ".base_layer" * (len(group) - i - 1): target
            for module, group in per_module.items() for i, target in enumerate(group)}


def target_path(path: str, module: AdapterLayer) -> str:
    """The name a recipe and adapter_config.json use for an adapted layer: its module path, or for a parameter
    adapter the parameter's path (``...experts.gate_up_proj``), which rank/alpha patterns are matched against."""
    if not isinstance(module, ParamLoRA):
        return path
    owner = path
    while owner.endswith(".base_layer"):
        owner = owner.removesuffix(".base_layer")
    return f"{owner}.{module.parameter_name}"
