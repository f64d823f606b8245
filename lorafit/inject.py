"""Wrap a model's planned targets (lorafit/targets.py) in the recipe's adapter method, freeze everything else,
and take the layers back out. Names no method: the registry (lorafit/adapters) builds the layers."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from lorafit.adapters import method
from lorafit.adapters.base import AdapterLayer, TrainingHooks
from lorafit.adapters.experts import ParamLoRA, target_path, wrap_parameters
from lorafit.adapters.saved_modules import saved_modules, unwrap_saved, wrap_saved
from lorafit.adapters.tokens import owned_token_rows, unwrap_tokens, wrap_tokens
from lorafit.config import LoRAConfig
from lorafit.targets import Refinement, plan_targets


@dataclass
class InjectionReport:
    """What was wrapped, for the targeting table and the trainable-parameter count."""

    modules: list[str]
    kinds: Counter = field(default_factory=Counter)          # "q_proj" -> how many wrapped
    kind_params: Counter = field(default_factory=Counter)    # "q_proj" -> trainable params
    kind_settings: dict[str, set] = field(default_factory=dict)  # "q_proj" -> {(r, alpha), ...}
    kind_experts: Counter = field(default_factory=Counter)  # "gate_up_proj" -> experts per parameter (MoE)
    trainable: int = 0
    total: int = 0

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


def inject_lora(model: nn.Module, lora: LoRAConfig, allocation: Refinement | None = None,
                for_training: bool = False, tokens: list[int] | None = None) -> InjectionReport:
    """Wrap the recipe's targets in place and leave only the adapter parameters trainable.

    With a rank ``allocation`` (lorafit/eva.py) the planned specs are refined first: each target takes its
    allocated rank — none at rank 0 — and A starts from the allocation's components. ``for_training`` keeps
    the trainable weights in fp32 (the optimizer's master copy) whatever the base dtype. ``tokens``: ids whose
    embedding rows train too (data.add_special_tokens; the vocabulary grows to hold them).
    """
    specs = plan_targets(model, lora)
    if allocation is not None:
        specs = allocation.refine(specs, lora.use_rslora)
    parameters = {name: spec for name, spec in specs.items() if spec.parameter is not None}
    method(lora.variant).wrap(model, {name: spec for name, spec in specs.items() if name not in parameters}, lora)
    wrap_parameters(model, parameters, lora)
    wrap_saved(model, lora.modules_to_save)
    wrap_tokens(model, tokens)
    set_trainable(model)
    if for_training:
        adapters_to_float32(model)
    return injection_report(model)


def remove_lora(model: nn.Module, unmerge: bool = True) -> None:
    """Put every wrapped layer's original ``base_layer`` back (unmerging first, unless merged weights are what
    is wanted), leaving the plain base. Innermost first: nested wrappers (two parameters of one experts module)
    unwrap from the inside out."""
    for name, module in reversed(lora_modules(model).items()):
        if unmerge:
            module.unmerge()
        model.set_submodule(name, module.base_layer)
    unwrap_saved(model, trained=not unmerge)  # lora.modules_to_save: the trained copies, merged or not
    unwrap_tokens(model, merge=not unmerge)  # data.add_special_tokens: the trained rows written in, or not


def lora_modules(model: nn.Module) -> dict[str, AdapterLayer]:
    """Module path (as the base model names it) -> its adapter layer (any method)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, AdapterLayer)}


def training_hooks(model: nn.Module, total_steps: int) -> TrainingHooks:
    """The loop hooks of the model's method (one method per model), over all its wrapped layers."""
    modules = lora_modules(model)
    layer = type(next(iter(modules.values()))) if modules else AdapterLayer
    return layer.training_hooks(modules, total_steps)


def set_trainable(model: nn.Module) -> None:
    """The one place trainability is decided: adapter parameters, lora.modules_to_save's copies and the token
    rows of data.add_special_tokens train, nothing else does."""
    model.requires_grad_(False)
    for module in lora_modules(model).values():
        for param in module.adapter_params().values():
            param.requires_grad_(True)
    for module in saved_modules(model).values():
        module.trained.requires_grad_(True)
    for module in owned_token_rows(model).values():
        module.trainable_tokens_delta.requires_grad_(True)


def adapters_to_float32(model: nn.Module) -> None:
    """Keep trainable adapter weights in fp32 whatever the base dtype: bf16 AdamW updates would round away."""
    for module in lora_modules(model).values():
        for param in module.adapter_params().values():
            param.data = param.data.float()
    for module in saved_modules(model).values():
        module.trained.float()
    for module in owned_token_rows(model).values():
        module.trainable_tokens_delta.data = module.trainable_tokens_delta.data.float()


def injection_report(model: nn.Module) -> InjectionReport:
    wrapped = lora_modules(model)
    report = InjectionReport(modules=list(wrapped))
    for name, module in wrapped.items():
        kind = target_path(name, module).removesuffix(".weight").rsplit(".", 1)[-1]  # q_proj, gate_up_proj, gate
        report.kinds[kind] += 1
        report.kind_params[kind] += sum(p.numel() for p in module.adapter_params().values())
        report.kind_settings.setdefault(kind, set()).add((module.r, module.alpha))
        if isinstance(module, ParamLoRA) and module.num_experts > 1:
            report.kind_experts[kind] = module.num_experts
    report.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report.total = sum(p.numel() for p in model.parameters())
    return report
