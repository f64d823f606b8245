"""Switching a model's adapter layers for the length of a ``with`` block: off (each layer computes its base layer
alone) or onto other adapter weights (a frozen copy of a starting adapter). DPO's reference policy is the same
model under one of these (lorafit/objectives.py ``reference_under``), never a second copy of the base weights, so
it costs nothing over a 4-bit base either. Any method: the switch lives in ``AdapterLayer.forward``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lorafit.adapters.base import AdapterLayer

Snapshot = dict[str, dict[str, torch.Tensor]]  # module path -> part -> tensor (the layer's adapter_params)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    layers = {name: module for name, module in model.named_modules() if isinstance(module, AdapterLayer)}
    if not layers:
        raise ValueError("this model has no adapter layers to switch")
    return layers


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside the block the model computes exactly as its base (the same base modules, called the same way: bit
    for bit the base's logits); no parameter changes, so a graph built before stays valid for its backward."""
    layers = list(adapter_layers(model).values())
    merged = [layer for layer in layers if layer.merged]
    if merged:  # the update lives inside the base weight: switching the layer off would not remove it
        raise ValueError("cannot switch off merged adapter layers; unmerge them first")
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, state in zip(layers, before, strict=True):
            layer.disabled = state


@torch.no_grad()
def adapter_snapshot(model: nn.Module) -> Snapshot:
    """A detached copy of every adapter layer's own parameters: the small tensors only, never the base."""
    return {name: {part: param.detach().clone() for part, param in layer.adapter_params().items()}
            for name, layer in adapter_layers(model).items()}


@contextlib.contextmanager
def adapter_weights(model: nn.Module, snapshot: Snapshot) -> Iterator[None]:
    """Inside the block the adapter layers compute with ``snapshot``'s weights, after it with their own again.

    The values are copied in place (under no_grad), so use it where no graph waits for a backward through these
    parameters — DPO computes its reference before the policy's forward; autograd refuses the other case."""
    layers = adapter_layers(model)
    if layers.keys() != snapshot.keys():
        raise ValueError("the snapshot was taken from a model with other adapter layers")
    own = adapter_snapshot(model)
    with torch.no_grad():
        _copy_into(layers, snapshot)
    try:
        yield
    finally:
        with torch.no_grad():
            _copy_into(layers, own)


def _copy_into(layers: dict[str, AdapterLayer], values: Snapshot) -> None:
    for name, layer in layers.items():
        for part, param in layer.adapter_params().items():
            param.copy_(values[name][part])
