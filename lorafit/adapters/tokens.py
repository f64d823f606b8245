"""``data.add_special_tokens``: new tokens whose embedding rows train, alone, beside the adapter — PEFT's
``trainable_token_indices`` (``TrainableTokensLayer``), with PEFT's names so both tools read each other's files.

The listed tokens are added to the tokenizer (those it already has keep their ids) and the embeddings grow to
hold them (transformers' ``resize_token_embeddings``: new rows start at the mean of the old ones plus noise).
Then ``TrainableTokens`` wraps the input embedding: the rows of those ids come from a trainable
``trainable_tokens_delta`` [n, hidden] (despite PEFT's name, the rows' values, not a difference: they start as
copies of the base's rows and replace them), every other row from the frozen base. The output head is wrapped
too, so the model learns to emit the tokens: a tied head (SmolLM2, most small models) reads the same delta; an
untied one gets its own, as PEFT does when ``trainable_token_indices`` names both layers.

On disk: ``base_model.model.<layer path>.token_adapter.trainable_tokens_delta`` per owned delta, and
``trainable_token_indices`` in adapter_config.json — the id list when one delta serves (PEFT's list form, read
as "the input embeddings"), else {layer path: ids}. Loading grows the base's vocabulary to fit the ids first (the
user's base is the pre-growth one; PEFT asks its users to ``resize_token_embeddings`` themselves). Merging
writes the rows into the weight: a model with the grown vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.adapters.lora import KEY_PREFIX
from lorafit.errors import LorafitError

PART = "token_adapter.trainable_tokens_delta"
CONFIG_KEY = "trainable_token_indices"


class TrainableTokens(nn.Module):
    """An embedding (ids (...,) -> (..., hidden)) or an output head ((..., hidden) -> (..., vocab)) whose rows
    ``indices`` are ``trainable_tokens_delta`` — its own, or ``tied``'s when the head shares the embedding's
    weight. Computes only the n replaced rows on top of the frozen layer: no copy of the [vocab, hidden] weight."""

    def __init__(self, base_layer: nn.Module, indices: list[int], tied: TrainableTokens | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.indices = list(indices)
        self._tied = [tied] if tied is not None else []  # a list: not a submodule, so not saved twice
        weight = base_layer.weight
        if tied is None:
            self.trainable_tokens_delta = nn.Parameter(weight.detach()[self.indices].clone())
        index = torch.tensor(self.indices, dtype=torch.long, device=weight.device)
        lookup = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
        lookup[index] = torch.arange(len(self.indices), device=weight.device)
        self.register_buffer("index", index, persistent=False)  # (n,) the trained ids
        self.register_buffer("slot", lookup, persistent=False)  # (vocab,) id -> its row of the delta, else -1

    def __getattr__(self, name: str) -> Any:
        """What the layer lacks comes from the base (``weight``, ``embedding_dim``...), as callers expect."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)

    @property
    def tied(self) -> bool:
        return bool(self._tied)

    @property
    def delta(self) -> torch.Tensor:
        return self._tied[0].trainable_tokens_delta if self._tied else self.trainable_tokens_delta

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if isinstance(self.base_layer, nn.Embedding):
            slot = self.slot[x]  # (...,)
            rows = self.delta[slot.clamp(min=0)].to(out.dtype)  # (..., hidden)
            scale = getattr(self.base_layer, "embed_scale", None)  # scaled embeddings (Gemma) scale every row
            if scale is not None:
                rows = rows * scale.to(out.dtype)
            return torch.where((slot >= 0).unsqueeze(-1), rows, out)
        # A head: the trained rows' logits replace the base's (with the head's bias, as the merged weight gives).
        bias = self.base_layer.bias[self.index] if getattr(self.base_layer, "bias", None) is not None else None
        logits = F.linear(x, self.delta.to(x.dtype), bias)  # (..., n)
        return out.index_copy(-1, self.index, logits.to(out.dtype))

    @torch.no_grad()
    def merge_into_base(self) -> None:
        """Write the trained rows into the base weight (once per weight: a tied head has nothing of its own)."""
        if not self.tied:
            weight = self.base_layer.weight
            weight.index_copy_(0, self.index, self.delta.to(weight.dtype))


def add_tokens(tokenizer: Any, tokens: list[str] | None) -> list[int]:
    """Add ``tokens`` to ``tokenizer`` as special tokens (never split, kept whole) where it lacks them; the ids
    of all of them, in order. Tokens it already has keep their ids and train too (e.g. a ChatML token that
    a base model's vocabulary holds but its training never used)."""
    if not tokens:
        return []
    vocab = tokenizer.get_vocab()
    new = [token for token in tokens if token not in vocab]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
    return tokenizer.convert_tokens_to_ids(list(tokens))


def grow_vocabulary(model: nn.Module, rows: int) -> None:
    """Give the embeddings (and an untied head) at least ``rows`` rows; never shrinks (models often carry
    spare rows past the tokenizer's last id). The new rows are drawn with a fixed seed, so the base that
    ``lorafit eval`` grows is the model a run started from."""
    embeddings = model.get_input_embeddings()
    if embeddings.weight.shape[0] >= rows:
        return
    if not hasattr(model, "resize_token_embeddings"):
        raise LorafitError(f"{type(model).__name__} cannot grow its vocabulary (no resize_token_embeddings)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.resize_token_embeddings(rows)


def token_layers(model: nn.Module) -> tuple[str, str | None, bool]:
    """(input embedding path, output head path or None, whether the head shares the embedding's weight)."""
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    paths = {id(module): name for name, module in model.named_modules()}
    if not isinstance(embeddings, nn.Embedding):
        raise LorafitError(f"data.add_special_tokens: the input embeddings are a {type(embeddings).__name__}, not "
                           "an Embedding whose rows can train")
    if head is not None and not isinstance(head, nn.Linear):
        raise LorafitError(f"data.add_special_tokens: the output head is a {type(head).__name__} (adapted or "
                           "trained whole?); leave lm_head out of lora.target_modules and lora.modules_to_save")
    tied = head is not None and head.weight is embeddings.weight
    return paths[id(embeddings)], (paths[id(head)] if head is not None else None), tied


def wrap_tokens(model: nn.Module, indices: list[int] | None) -> dict[str, TrainableTokens]:
    """Grow the vocabulary to fit ``indices`` and wrap the embedding and the head; the wrappers by path."""
    if not indices:
        return {}
    token_layers(model)  # refused before anything changes
    grow_vocabulary(model, max(indices) + 1)
    embed_path, head_path, tied = token_layers(model)
    wrapped = {embed_path: _wrap(model, embed_path, indices)}
    if head_path is not None:
        wrapped[head_path] = _wrap(model, head_path, indices, wrapped[embed_path] if tied else None)
    return wrapped


def _wrap(model: nn.Module, path: str, indices: list[int], tied: TrainableTokens | None = None) -> TrainableTokens:
    wrapper = TrainableTokens(model.get_submodule(path), indices, tied)
    model.set_submodule(path, wrapper)
    return wrapper


def token_wrappers(model: nn.Module) -> dict[str, TrainableTokens]:
    return {name: module for name, module in model.named_modules() if isinstance(module, TrainableTokens)}


def owned_token_rows(model: nn.Module) -> dict[str, TrainableTokens]:
    """The wrappers that own a trainable_tokens_delta (a tied head reads its embedding's): what trains and is saved."""
    return {name: module for name, module in token_wrappers(model).items() if not module.tied}


def token_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The file's tensors: each owned delta under PEFT's key."""
    return {f"{KEY_PREFIX}{name}.{PART}": module.delta for name, module in owned_token_rows(model).items()}


def token_config(model: nn.Module) -> list[int] | dict[str, list[int]] | None:
    """adapter_config.json's trainable_token_indices: PEFT's list form when one delta serves, else per layer."""
    owners = {name: module.indices for name, module in owned_token_rows(model).items()}
    if not owners:
        return None
    return next(iter(owners.values())) if len(owners) == 1 else owners


def split_tokens(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(layer path -> its saved delta, the other tensors) of an adapter file."""
    suffix = f".{PART}"
    rows = {key.removeprefix(KEY_PREFIX).removesuffix(suffix): t for key, t in tensors.items() if key.endswith(suffix)}
    return rows, {key: t for key, t in tensors.items() if not key.endswith(suffix)}


def check_token_config(value: Any, path: Any) -> None:
    """trainable_token_indices must be a list of ids or {layer: list of ids}."""
    def ids(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                       for i in v) and len(set(v)) == len(v)
    if not (ids(value) or (isinstance(value, dict) and value and all(ids(v) for v in value.values()))):
        raise LorafitError(f"{path}: {CONFIG_KEY} must be a list of distinct token ids or a mapping of layer "
                           f"names to such lists, got {value!r}")


@torch.no_grad()
def load_tokens(model: nn.Module, config: dict[str, Any], saved: dict[str, torch.Tensor], where: Any) -> None:
    """Wrap ``model``'s embedding (and head) with an adapter file's trained rows, growing its vocabulary to fit:
    ``config``'s trainable_token_indices, ``saved`` as ``split_tokens`` gives it (shapes checked first)."""
    value = config.get(CONFIG_KEY)
    if not value:
        if saved:
            raise LorafitError(f"{where}: holds {PART} tensors but its config has no {CONFIG_KEY}")
        return
    per_layer = value if isinstance(value, dict) else None
    indices = next(iter(per_layer.values())) if per_layer else value
    all_ids = [i for ids in (per_layer or {"": value}).values() for i in ids]
    token_layers(model)  # refused before anything changes
    grow_vocabulary(model, max(all_ids) + 1)
    embed_path, head_path, tied = token_layers(model)
    layers = _match_layers(model, per_layer, where) if per_layer else {embed_path: indices}
    if set(layers) != set(saved):
        raise LorafitError(f"{where}: {CONFIG_KEY} names layers {sorted(layers)} but the file holds trained rows "
                           f"for {sorted(saved)}; re-save the adapter")
    if tied and head_path in layers and layers[head_path] != layers.get(embed_path):
        raise LorafitError(f"{where}: the head shares the embedding's weight, but {CONFIG_KEY} gives it other ids "
                           "than the embedding's; lorafit cannot tie those")
    for path, ids in layers.items():
        if tuple(saved[path].shape) != (len(ids), model.get_submodule(path).weight.shape[1]):
            raise LorafitError(f"{where}: {path}'s trained rows have shape {tuple(saved[path].shape)}, expected "
                               f"({len(ids)}, {model.get_submodule(path).weight.shape[1]}): another base?")
    wrapped = {path: _wrap(model, path, ids) for path, ids in layers.items() if not (tied and path == head_path)}
    if tied and head_path is not None and embed_path in wrapped:
        _wrap(model, head_path, layers[embed_path], wrapped[embed_path])
    for path, module in wrapped.items():
        module.trainable_tokens_delta.copy_(saved[path])


def _match_layers(model: nn.Module, per_layer: dict[str, list[int]], where: Any) -> dict[str, list[int]]:
    """The config's layer names as module paths (PEFT matches a name by the end of the path)."""
    paths = [name for name, _ in model.named_modules() if name]
    found = {}
    for key, ids in per_layer.items():
        matches = [p for p in paths if p == key or p.endswith(f".{key}")]
        if len(matches) != 1:
            raise LorafitError(f"{where}: {CONFIG_KEY} names {key!r}, which matches {len(matches)} modules of the "
                               "base model; expected exactly one (the embedding or the head)")
        found[matches[0]] = ids
    return found


def unwrap_tokens(model: nn.Module, merge: bool) -> None:
    """Put the plain layers back, with the trained rows written into the weight (``merge``) or not."""
    for name, module in token_wrappers(model).items():
        if merge:
            module.merge_into_base()
        model.set_submodule(name, module.base_layer)


def describe(model: nn.Module) -> str | None:
    """plan's line: the trained token rows (None without any)."""
    wrappers = token_wrappers(model)
    if not wrappers:
        return None
    owned = sum(m.delta.numel() for m in owned_token_rows(model).values())
    layers = ", ".join(f"{name}{' (tied)' if m.tied else ''}" for name, m in wrappers.items())
    ids = next(iter(wrappers.values())).indices
    return f"trainable token rows: ids {ids} in {layers} ({owned:,} parameters)"
