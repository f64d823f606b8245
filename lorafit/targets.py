"""Which modules a recipe adapts, and with what: ``plan_targets`` returns, once per model, each targeted
module's (or MoE expert parameter's) ``TargetSpec``. EVA (lorafit/eva.py) refines these specs; inject.py wraps
them (TargetSpec is defined beside the methods, in lorafit/adapters/base.py). Names and rules follow
PEFT's ``target_modules`` / ``rank_pattern`` / ``alpha_pattern``."""

from __future__ import annotations

import re
from typing import Any, Protocol

from torch import nn

from lorafit.adapters import REGISTRY, method
from lorafit.adapters.base import AdapterLayer, TargetSpec, is_conv1d, pattern_matches, pattern_value
from lorafit.adapters.experts import FUSED_PAIRS, param_targets
from lorafit.adapters.recipes import BASE_INITS
from lorafit.config import LoRAConfig, RegexTarget, TargetModules
from lorafit.errors import LorafitError

# Decoder blocks live under one of these containers in nearly every HF causal LM ("model.layers.3.").
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|decoder\.layers)\.(\d+)\.")


class Refinement(Protocol):
    """What refines planned specs after looking at data (eva.RankAllocation), named here so inject.py
    need not import eva."""

    def refine(self, specs: dict[str, TargetSpec], use_rslora: bool) -> dict[str, TargetSpec]: ...


def plan_targets(model: nn.Module, lora: LoRAConfig) -> dict[str, TargetSpec]:
    """Target path -> its TargetSpec as the recipe gives it: lora.r / lora.alpha unless a pattern says otherwise;
    a fused expert pair (gate_up_proj) twice both, which is r and alpha for each of its two projections."""
    targets = find_targets(model, lora.target_modules, lora.layers)
    check_patterns_used(lora, targets)
    params = {t.path: t for t in param_targets(model) if t.path in targets}
    if params:
        check_parameter_settings(lora, next(iter(params)))
    adapter = method(lora.variant)
    specs = {}
    for name in targets:
        parameter = params.get(name)
        fused = FUSED_PAIRS.get(parameter.name, 1) if parameter else 1
        spec = TargetSpec(lora.variant, pattern_value(lora.rank_pattern, name, lora.r * fused),
                          pattern_value(lora.alpha_pattern, name, lora.alpha * fused), lora.init, parameter)
        specs[name] = adapter.plan(spec, lora)
    return specs


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
    """Module paths (and MoE parameter paths, lorafit/adapters/experts.py) to adapt, linear layers first, each in
    model order. Raises with the available names when nothing matches.

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


def check_parameter_settings(lora: LoRAConfig, example: str) -> None:
    """What LoRA on an expert parameter cannot do (as in PEFT): another method, dropout, EVA's initialisation."""
    problem = (f"lora.variant {lora.variant!r}" if not REGISTRY[lora.variant].on_parameters else
               f"lora.dropout {lora.dropout}" if lora.dropout else
               "lora.rank_allocation (EVA)" if lora.rank_allocation is not None else
               f"lora.init: {lora.init}" if lora.init in BASE_INITS else None)
    if problem:
        raise LorafitError(f"{problem} does not apply to MoE expert parameters such as {example} (their update is "
                           "added to the weight, per expert: plain LoRA without dropout only). Use variant lora with "
                           "dropout 0, or target only the linear layers, e.g. lora.target_modules: [q_proj, k_proj, "
                           "v_proj, o_proj]")


def check_patterns_used(lora: LoRAConfig, targets: list[str]) -> None:
    """A pattern that matches no targeted module is a typo or a stale key; PEFT ignores it silently."""
    for setting in ("rank_pattern", "alpha_pattern"):
        for key in getattr(lora, setting):
            if not any(pattern_matches(key, name) for name in targets):
                raise LorafitError(
                    f"lora.{setting} key {key!r} matches none of the {len(targets)} targeted modules; keys are "
                    f"regexes matched against the end of a module path, e.g. 'q_proj' or 'layers\\.0\\.mlp\\..*' "
                    f"(targeted here: {targets[0]}, ...)"
                )


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
    shown: Any = target_modules.regex if isinstance(target_modules, RegexTarget) else target_modules
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
