"""LoRA+ (``train.loraplus_lr_ratio``, Hayou et al. 2024): B of a LoRA update B·A learns ``ratio`` times faster
than A. B starts at zero and its features need larger steps than A's to learn at the same pace.

The optimizer's parameter groups are PEFT's ``create_loraplus_optimizer``'s, tensor for tensor: B's group holds
every trainable tensor named ``lora_B`` and every 1-D one (DoRA's magnitude, biases, norms) at train.lr × ratio;
those of them that PEFT exempts from weight decay — biases and what sits in a LayerNorm — get their own group
with weight_decay 0; everything else trains at train.lr in A's group, first, so the lr that lorafit logs is
A's. train.weight_decay is PEFT's ``loraplus_weight_decay``. PEFT's ``loraplus_lr_embedding`` group is for LoRA
on embedding layers, which lorafit does not adapt, so it has nothing to hold here. Methods whose update is not
a B·A with B at zero (the registry's ``loraplus`` reason: VeRA, AdaLoRA) refuse the option.
"""

from __future__ import annotations

from typing import Any

from lorafit.adapters import REGISTRY


def check(variant: str, ratio: float | None) -> None:
    """Refuse (ValueError, the recipe's message) LoRA+ with a method it means nothing for."""
    why = REGISTRY[variant].loraplus
    if ratio is not None and why:
        raise ValueError(f"train.loraplus_lr_ratio does not apply to lora.variant: {variant}: {why}. Remove "
                         "train.loraplus_lr_ratio, or use variant: lora or dora")


def param_groups(model: Any, lr: float, ratio: float, weight_decay: float) -> list[dict[str, Any]]:
    """The optimizer's parameter groups for LoRA+ over ``model``'s trainable parameters (PEFT's, less its
    empty embedding group; groups with nothing in them are left out)."""
    settings = {"A": (lr, weight_decay), "B": (lr * ratio, weight_decay), "B, no decay": (lr * ratio, 0.0)}
    return [{"params": params, "lr": settings[key][0], "weight_decay": settings[key][1]}
            for key, params in _grouped(model).items() if params]


def _grouped(model: Any) -> dict[str, list]:
    """Group name -> its trainable tensors, by PEFT's rule (see the module's docstring)."""
    from torch import nn

    no_decay = {f"{prefix}.{name}" if prefix else name
                for prefix, module in model.named_modules() if isinstance(module, nn.LayerNorm)
                for name, _ in module.named_parameters()}
    groups: dict[str, list] = {"A": [], "B": [], "B, no decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_B" in name or param.ndim == 1:
            groups["B" if name not in no_decay and "bias" not in name else "B, no decay"].append(param)
        else:
            groups["A"].append(param)
    return groups


def describe(model: Any, train: Any) -> str | None:
    """plan's line: each group's learning rate and tensor count (None without LoRA+)."""
    ratio = train.loraplus_lr_ratio
    if ratio is None:
        return None
    lrs = {"A": train.lr, "B": train.lr * ratio, "B, no decay": train.lr * ratio}
    parts = [f"{key} {len(params)} tensors at lr {lrs[key]:.3g}"
             for key, params in _grouped(model).items() if params]
    return f"LoRA+ (train.loraplus_lr_ratio={ratio:g}): {'; '.join(parts)}"
