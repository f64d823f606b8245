"""lorafit: fine-tune Hugging Face causal LMs with LoRA from one YAML recipe."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# The public API is imported on first use, so `lorafit --help` does not pay for importing torch.
_PUBLIC = {
    "AdapterLayer": "lorafit.adapters.base",
    "LoRALinear": "lorafit.adapters.lora",
    "DoRALinear": "lorafit.adapters.dora",
    "VeRALinear": "lorafit.adapters.vera",
    "AdaLoRALinear": "lorafit.adapters.adalora",
    "inject_lora": "lorafit.inject",
    "load_adapter": "lorafit.adapter_io",
    "save_adapter": "lorafit.adapter_io",
    "Recipe": "lorafit.config",
    "load_recipe": "lorafit.config",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'lorafit' has no attribute {name!r}")
