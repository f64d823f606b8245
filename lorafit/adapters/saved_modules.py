"""``lora.modules_to_save``: whole modules (e.g. ``lm_head``) trained as full copies beside the adapter, as PEFT's
``modules_to_save`` (``ModulesToSaveWrapper``) does, with PEFT's names so both tools read each other's files.

A matched module is wrapped in ``SavedModule``: the frozen ``original_module`` and its trainable copy under
``modules_to_save.default`` (PEFT's parameter names, so LoRA+ groups them as PEFT does). Matching is PEFT's:
every module whose path ends with an entry as a string (``norm`` also matches ``input_layernorm``; ``plan``
lists what matched). The file holds the copy's state dict at ``base_model.model.<module path>.<name>``, and
adapter_config.json's ``modules_to_save`` the full paths matched. Merging replaces those tensors of the base.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lorafit.adapters.base import AdapterLayer
from lorafit.adapters.lora import KEY_PREFIX
from lorafit.errors import LorafitError


class SavedModule(nn.Module):
    """A module trained whole: forward runs the trained copy; attributes it lacks come from the copy."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module.requires_grad_(False)
        self.modules_to_save = nn.ModuleDict({"default": copy.deepcopy(module)})

    @property
    def trained(self) -> nn.Module:
        return self.modules_to_save["default"]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.trained(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("modules_to_save")["default"], name)


def find_saved(model: nn.Module, entries: list[str]) -> list[str]:
    """Module paths matching ``entries`` by PEFT's rule (the path ends with the entry), outermost only; refused
    (LorafitError) when an entry matches nothing, a match holds adapter layers, or shares a weight (tied)."""
    names = [name for name, _ in model.named_modules() if name]
    matched = [name for name in names if any(name.endswith(entry) for entry in entries)]
    matched = [name for name in matched if not any(name.startswith(f"{other}.") for other in matched)]
    missing = [entry for entry in entries if not any(name.endswith(entry) for name in matched)]
    if missing:
        raise LorafitError(f"lora.modules_to_save: {missing[0]!r} matches no module of the base model (a module "
                           "matches when its path ends with the entry, as in PEFT), e.g. lm_head")
    for name in matched:
        module = model.get_submodule(name)
        if isinstance(module, AdapterLayer) or any(isinstance(m, AdapterLayer) for m in module.modules()):
            raise LorafitError(f"lora.modules_to_save: {name} is (or holds) a module lora.target_modules adapts; "
                               "train it with the adapter or as a full copy, not both: remove it from one list")
        if shared := _shared_with(model, name):
            raise LorafitError(f"lora.modules_to_save: {name} shares its weight with {shared} (tied embeddings); "
                               "a trained copy would untie them, which PEFT's merge does not write. Save "
                               f"{shared} instead, or leave {name} out")
    return matched


def _shared_with(model: nn.Module, name: str) -> str | None:
    """Another module holding one of ``name``'s parameters (tied weights), or None."""
    own = {id(p) for p in model.get_submodule(name).parameters()}
    return next((other for other, module in model.named_modules(remove_duplicate=False)
                 if other != name and not other.startswith(f"{name}.") and not name.startswith(f"{other}.")
                 and any(id(p) in own for p in module.parameters(recurse=False))), None)


def wrap_saved(model: nn.Module, entries: list[str] | None) -> list[str]:
    """Wrap the modules ``entries`` match in ``SavedModule``; their paths."""
    matched = find_saved(model, entries) if entries else []
    for name in matched:
        model.set_submodule(name, SavedModule(model.get_submodule(name)))
    return matched


def saved_modules(model: nn.Module) -> dict[str, SavedModule]:
    return {name: module for name, module in model.named_modules() if isinstance(module, SavedModule)}


def saved_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The file's tensors of the trained copies, under PEFT's keys."""
    return {f"{KEY_PREFIX}{name}.{key}": tensor for name, module in saved_modules(model).items()
            for key, tensor in module.trained.state_dict().items()}


def split_saved(tensors: dict[str, torch.Tensor], entries: list[str] | None
                ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(module path -> its saved state dict, the other tensors) of an adapter file whose config names
    ``entries`` in modules_to_save: a key belongs to the shortest module path in it that ends with an entry."""
    saved: dict[str, dict[str, torch.Tensor]] = {}
    rest = {}
    for key, tensor in tensors.items():
        parts = key.removeprefix(KEY_PREFIX).split(".")
        module = next((".".join(parts[:i]) for i in range(1, len(parts))
                       if any(".".join(parts[:i]).endswith(entry) for entry in entries or ())), None)
        if module is None or "lora_" in key:
            rest[key] = tensor
        else:
            saved.setdefault(module, {})[".".join(parts[len(module.split(".")):])] = tensor
    return saved, rest


@torch.no_grad()
def load_saved_modules(model: nn.Module, saved: dict[str, dict[str, torch.Tensor]], where: Any) -> None:
    """Wrap each saved module of ``model`` and copy the file's state into its trained copy (shapes checked)."""
    wrap_saved(model, list(saved))
    for name, module in saved_modules(model).items():
        state = module.trained.state_dict()
        if set(state) != set(saved[name]) or any(state[k].shape != v.shape for k, v in saved[name].items()):
            raise LorafitError(f"{where}: modules_to_save {name} holds {sorted(saved[name])} with other shapes or "
                               "names than the base model's module; was it trained on another base?")
        module.trained.load_state_dict(saved[name])


def unwrap_saved(model: nn.Module, trained: bool) -> None:
    """Put plain modules back: the trained copies (``trained``) or the originals."""
    for name, module in saved_modules(model).items():
        model.set_submodule(name, module.trained if trained else module.original_module)


def describe(model: nn.Module) -> str | None:
    """plan's line: the matched modules and their trainable size (None without any)."""
    modules = saved_modules(model)
    if not modules:
        return None
    count = sum(p.numel() for m in modules.values() for p in m.trained.parameters())
    return f"modules_to_save (full trainable copies): {', '.join(modules)} ({count:,} parameters)"
