"""Find the linear layers (and MoE expert parameters) a recipe targets, wrap them in adapter layers, and freeze
everything else."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorafit.adalora import AdaLoRALinear, AdaLoRASettings
from lorafit.config import AdaLoRAConfig, LoRAConfig, RegexTarget, TargetModules, VeRAConfig
from lorafit.dora import DoRALinear
from lorafit.errors import LorafitError
from lorafit.experts import FUSED_PAIRS, ParamLoRA, ParamTarget, param_targets, target_path, wrap_parameter
from lorafit.lora import AdapterLayer, LoRALinear, TrainingHooks, is_conv1d
from lorafit.vera import VeRALinear, projections_for

if TYPE_CHECKING:
    from lorafit.eva import RankAllocation

# lora.variant -> the layer class that implements it; every variant is an AdapterLayer.
VARIANTS: dict[str, type[AdapterLayer]] = {"lora": LoRALinear, "dora": DoRALinear, "vera": VeRALinear,
                                          "adalora": AdaLoRALinear}
# Decoder blocks live under one of these containers in nearly every HF causal LM ("model.layers.3.").
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|decoder\.layers)\.(\d+)\.")


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


def linear_module_names(model: nn.Module) -> list[str]:
    """Every linear layer — nn.Linear or transformers' Conv1D (GPT-2), as PEFT's all-linear counts them —
    except the output head (which ties to the embeddings in many models)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        name
        for name, module in model.named_modules()
        if (isinstance(module, nn.Linear) or is_conv1d(module)) and module is not head
        and not isinstance(module, AdapterLayer)
    ]


def layer_index(module_name: str) -> int | None:
    match = _LAYER_INDEX.search(module_name)
    return int(match.group(1)) if match else None


def find_targets(model: nn.Module, target_modules: TargetModules, layers: list[int] | None = None) -> list[str]:
    """Module paths (and MoE parameter paths, lorafit/experts.py) to adapt, linear layers first, each in model
    order. Raises with the available names when nothing matches.

    all-linear takes every linear layer but the output head and every fused expert parameter — not the routers
    (a LoRA on the router shifts which experts tokens reach; name ``gate`` to adapt it). Names and regexes also
    match a router by its module path (``gate``) or weight (``gate.weight``)."""
    params = param_targets(model)
    candidates = linear_module_names(model) + [t.path for t in params]
    routers = {t.path: t.module for t in params if t.router}
    matched = [name for name in candidates
               if (target_modules != "all-linear" or name not in routers)
               and (_matches(name, target_modules) or (name in routers and _matches(routers[name], target_modules)))]
    if layers is not None:
        present = {i for i in map(layer_index, candidates) if i is not None}
        missing = sorted(set(layers) - present)
        if missing:
            have = f"layers {min(present)}..{max(present)}" if present else "no numbered decoder layers"
            raise LorafitError(f"lora.layers {layers}: this model has {have}, so {missing} would silently adapt "
                               "nothing; use indices that exist")
        matched = [name for name in matched if layer_index(name) in set(layers)]
    if not matched:
        raise LorafitError(_no_match_message(candidates, target_modules, layers))
    return matched


def inject_lora(model: nn.Module, lora: LoRAConfig, allocation: RankAllocation | None = None) -> InjectionReport:
    """Wrap the recipe's targets in place and leave only the LoRA parameters trainable.

    With a rank ``allocation`` (lorafit/eva.py) each target takes its allocated rank — none at rank 0 —
    with alpha following the rank, and A starts from the allocation's components where it has them.
    """
    targets = find_targets(model, lora.target_modules, lora.layers)
    check_patterns_used(lora, targets)
    params = {t.path: t for t in param_targets(model) if t.path in targets}
    if params:
        check_parameter_settings(lora, next(iter(params)), allocation is not None)
    if lora.variant in ("vera", "adalora"):
        (_inject_vera if lora.variant == "vera" else _inject_adalora)(model, lora, targets)
        return injection_report(model)
    for name, (r, alpha) in target_settings(lora, targets, params).items():
        if name in params:
            wrap_parameter(model, params[name], r=r, alpha=alpha, init=lora.init, use_rslora=lora.use_rslora)
            continue
        if allocation is not None:
            r, alpha = allocation.settings(name, r, alpha, lora.use_rslora)
            if r == 0:
                continue
        module = wrap_module(model, name, lora.variant, r=r, alpha=alpha, dropout=lora.dropout, init=lora.init,
                             use_rslora=lora.use_rslora)
        if allocation is not None and name in allocation.components:
            with torch.no_grad():
                module.lora_A.weight.copy_(allocation.components[name])
    set_trainable(model)
    return injection_report(model)


def _inject_vera(model: nn.Module, lora: LoRAConfig, targets: list[str]) -> None:
    """VeRA layers share one pair of projections, drawn for the widest targeted input and output."""
    settings = lora.vera or VeRAConfig()
    projections = projections_for([model.get_submodule(name) for name in targets], lora.r,
                                  settings.projection_prng_key)
    for name in targets:
        wrap_module(model, name, "vera", projections=projections, dropout=lora.dropout, d_initial=settings.d_initial)
    set_trainable(model)


def _inject_adalora(model: nn.Module, lora: LoRAConfig, targets: list[str]) -> None:
    """AdaLoRA layers start at init_r triplets and share one schedule, whose total_step the loop fills in."""
    options = lora.adalora or AdaLoRAConfig()
    settings = AdaLoRASettings(target_r=lora.r, tinit=options.tinit, tfinal=options.tfinal, delta_t=options.deltaT,
                               beta1=options.beta1, beta2=options.beta2, orth_reg_weight=options.orth_reg_weight)
    for name in targets:
        wrap_module(model, name, "adalora", r=options.initial_rank(lora.r), alpha=lora.alpha, settings=settings,
                    dropout=lora.dropout)
    set_trainable(model)


def target_settings(lora: LoRAConfig, targets: list[str],
                    params: dict[str, ParamTarget] | None = None) -> dict[str, tuple[int, float]]:
    """Target -> (r, alpha) as the recipe gives them: lora.r / lora.alpha unless a pattern says otherwise; a fused
    expert pair (gate_up_proj) twice both, which is r and alpha for each of its two projections."""
    settings = {}
    for name in targets:
        fused = FUSED_PAIRS.get(params[name].name, 1) if params and name in params else 1
        settings[name] = (pattern_value(lora.rank_pattern, name, lora.r * fused),
                          pattern_value(lora.alpha_pattern, name, lora.alpha * fused))
    return settings


def check_parameter_settings(lora: LoRAConfig, example: str, eva: bool) -> None:
    """What LoRA on an expert parameter cannot do (as in PEFT): another variant, dropout, EVA's initialisation."""
    problem = (f"lora.variant {lora.variant!r}" if lora.variant != "lora" else
               f"lora.dropout {lora.dropout}" if lora.dropout else "lora.rank_allocation (EVA)" if eva else None)
    if problem:
        raise LorafitError(f"{problem} does not apply to MoE expert parameters such as {example} (their update is "
                           "added to the weight, per expert: plain LoRA without dropout only). Use variant lora with "
                           "dropout 0, or target only the linear layers, e.g. lora.target_modules: [q_proj, k_proj, "
                           "v_proj, o_proj]")


def pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's rank/alpha_pattern rule: the first key whose regex matches the end of the module path."""
    return next((value for key, value in patterns.items() if _pattern_matches(key, module_name)), default)


def check_patterns_used(lora: LoRAConfig, targets: list[str]) -> None:
    """A pattern that matches no targeted module is a typo or a stale key; PEFT ignores it silently."""
    for setting in ("rank_pattern", "alpha_pattern"):
        for key in getattr(lora, setting):
            if not any(_pattern_matches(key, name) for name in targets):
                raise LorafitError(
                    f"lora.{setting} key {key!r} matches none of the {len(targets)} targeted modules; keys are "
                    f"regexes matched against the end of a module path, e.g. 'q_proj' or 'layers\\.0\\.mlp\\..*' "
                    f"(targeted here: {targets[0]}, ...)"
                )


def _pattern_matches(key: str, module_name: str) -> bool:
    return re.match(rf"(.*\.)?({key})$", module_name) is not None


def wrap_module(model: nn.Module, name: str, variant: str = "lora", **lora_kwargs) -> AdapterLayer:
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    base = getattr(parent, child_name)
    wrapped = VARIANTS[variant](base, **lora_kwargs)
    wrapped.train(base.training)  # a new module starts in training mode: in an eval model, dropout would run
    setattr(parent, child_name, wrapped)
    return wrapped


def remove_lora(model: nn.Module, unmerge: bool = True) -> None:
    """Put every wrapped layer's original ``base_layer`` back (unmerging first, unless merged weights are what
    is wanted), leaving the plain base. Innermost first: nested wrappers (two parameters of one experts module)
    unwrap from the inside out."""
    for name, module in reversed(lora_modules(model).items()):
        if unmerge:
            module.unmerge()
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, module.base_layer)


def lora_modules(model: nn.Module) -> dict[str, AdapterLayer]:
    """Module path (as the base model names it) -> its adapter layer (LoRA or a variant)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, AdapterLayer)}


def training_hooks(model: nn.Module, total_steps: int) -> TrainingHooks:
    """The loop hooks of the model's variant (one variant per model), over all its wrapped layers."""
    modules = lora_modules(model)
    variant = type(next(iter(modules.values()))) if modules else LoRALinear
    return variant.training_hooks(modules, total_steps)


def set_trainable(model: nn.Module) -> None:
    """The one place trainability is decided: adapter parameters train, nothing else does."""
    model.requires_grad_(False)
    for module in lora_modules(model).values():
        for param in module.adapter_params().values():
            param.requires_grad_(True)


def adapters_to_float32(model: nn.Module) -> None:
    """Keep trainable adapter weights in fp32 whatever the base dtype: bf16 AdamW updates would round away."""
    for module in lora_modules(model).values():
        for param in module.adapter_params().values():
            param.data = param.data.float()


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


def _matches(name: str, target_modules: TargetModules) -> bool:
    # Same rules as PEFT: list entries match a whole path or its dotted suffix; a regex must match the full path.
    if target_modules == "all-linear":
        return True
    if isinstance(target_modules, RegexTarget):
        return re.fullmatch(target_modules.regex, name) is not None
    return any(name == suffix or name.endswith("." + suffix) for suffix in target_modules)


def _no_match_message(candidates: list[str], target_modules: TargetModules, layers: list[int] | None) -> str:
    kinds = sorted({name.removesuffix(".weight").rsplit(".", 1)[-1] for name in candidates})  # router: gate
    indices = sorted({i for i in map(layer_index, candidates) if i is not None})
    shown = target_modules.regex if isinstance(target_modules, RegexTarget) else target_modules
    message = f"lora.target_modules {shown!r}"
    if layers is not None:
        message += f" with lora.layers {layers}"
    message += " matches no linear layer of this model.\n"
    message += f"  Linear (and Conv1D) layers and MoE expert parameters here: {', '.join(kinds) or '(none)'}"
    if candidates:
        message += f" (full path e.g. {candidates[0]})"
    if indices:
        message += f"; layer indices {indices[0]}..{indices[-1]}"
    return message
