"""The adapter methods lorafit trains and reads, by name: the registry every other module dispatches through.

One line per method below. A method's torch side lives in its own file (``module``: the layer and its math,
its PEFT record read and written, how it wraps planned targets; imported on first use, so this table and the
recipe side in recipes.py stay torch-free for ``lorafit --help``). Adding a method: its file, with
``METHOD = <Method subclass>()``, one line here, and, if it has options or its own plan line, their entry in
recipes.py. lorafit/adapters/base.py holds what all methods share.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from lorafit.adapters import recipes

if TYPE_CHECKING:
    from lorafit.adapters.base import Method


@dataclass(frozen=True)
class MethodInfo:
    """A method as recipes, ``plan`` and the adapter reader see it, before torch is imported."""

    name: str  # lora.variant's value
    module: str  # the file that implements it; its METHOD is the torch-side Method
    peft_type: str  # adapter_config.json's peft_type
    describe: Callable[[Any], str]  # the recipe's lora section -> plan's one line
    block: type[BaseModel] | None = None  # lora.<name>: the method's own options
    ignores: tuple[str, ...] = ()  # lora keys it does not use: set with it, they are refused
    check: Callable[[Any], None] | None = None  # more checks of the lora section (ValueError)
    on_parameters: bool = False  # can adapt MoE expert parameters (lorafit/adapters/experts.py)
    fsdp: bool = True  # its layers shard over processes (train.fsdp)
    loraplus: str = ""  # why train.loraplus_lr_ratio (lorafit/loraplus.py) means nothing for it; "": it applies

    def method(self) -> Method:
        return importlib.import_module(self.module).METHOD


def _entry(name: str, title: str, describe: Callable[[str, Any], str], **kwargs: Any) -> MethodInfo:
    return MethodInfo(name, f"lorafit.adapters.{name}", describe=partial(describe, title), **kwargs)


REGISTRY: dict[str, MethodInfo] = {info.name: info for info in (
    _entry("lora", "LoRA", recipes.describe_lora, peft_type="LORA", on_parameters=True),
    _entry("dora", "DoRA (LoRA + a magnitude per output row)", recipes.describe_lora, peft_type="LORA",
           check=recipes.check_dora),
    _entry("vera", "VeRA (trainable scaling vectors over shared random projections)", recipes.describe_vera,
           peft_type="VERA", block=recipes.VeRAConfig, ignores=("alpha", *recipes.OWN_RANKS), fsdp=False,
           loraplus=recipes.LORAPLUS_VERA),
    _entry("adalora", "AdaLoRA (SVD-shaped triplets pruned to a budget while training)", recipes.describe_adalora,
           peft_type="ADALORA", block=recipes.AdaLoRAConfig, ignores=recipes.OWN_RANKS, check=recipes.check_adalora,
           fsdp=False, loraplus=recipes.LORAPLUS_ADALORA),
)}


def method(name: str) -> Method:
    """The torch-side Method of ``lora.variant`` ``name``."""
    return REGISTRY[name].method()


def method_of_record(config: dict[str, Any]) -> Method:
    """The method whose PEFT record an adapter_config.json is (its peft_type and flags such as use_dora)."""
    found = [info.method() for info in REGISTRY.values() if info.peft_type == config.get("peft_type", "LORA")]
    return next(m for m in found if m.owns(config))


PEFT_TYPES = tuple(dict.fromkeys(info.peft_type for info in REGISTRY.values()))
