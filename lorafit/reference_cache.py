"""DPO's reference log-probs computed once per dataset (``train.precompute_reference: true``) and cached on disk.

Without it, each DPO step runs the reference (the policy's model with its adapters switched off, or switched to the
starting adapter) as one extra no-grad forward of the step's pairs: about a quarter of a step's compute (reference
forward; policy forward; policy backward, about two forwards). With it, that forward runs once per training pair
before the first step, in micro-batches of the recipe's size, and the two numbers per pair (summed log-prob of the
chosen and of the rejected answer) ride in every batch (``ref_chosen_logps`` / ``ref_rejected_logps``, TRL's keys),
so the steps skip it. When it pays:
- several epochs over the same pairs: the pass costs what one epoch of reference forwards costs, then saves it in
  every later epoch;
- a second run over the same pairs, base, starting adapter and data settings (a sweep over beta, lr or the
  schedule; a run started again): the table comes from the cache, and every step saves the forward;
- not a run shorter than an epoch: the pass scores pairs the run never reaches.

The cache entry ``$LORAFIT_CACHE/reference/<fingerprint>.safetensors`` holds two fp32 vectors in the training file's
pair order. Its fingerprint covers what changes the numbers: the data (lorafit.token_cache's fingerprint: file
content, format, max_seq_len, tokenizer), the model recipe block (base, dtype, quantization), the base's files
(name, size, modification time), the starting adapter's weights (``lora.init_from``, hashed), the lora block,
the micro-batch size (padding changes the last bits), the device type and the torch version. A hit is checked
before use: the first micro-batch is scored again and must agree with the table (a base changed in place, with
the same names and sizes, is caught there); otherwise the table is computed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

from lorafit.config import Recipe
from lorafit.distributed import main_first
from lorafit.model import cache_dir
from lorafit.objectives import ReferenceLogps
from lorafit.preference import REF_LOGPS, Pair, collate_pairs

# Bump when the way reference log-probs are computed changes, so that no run reads numbers made by older code.
REFERENCE_VERSION = 1
# The cache check: the first micro-batch scored again, on the same device and batch composition as when the table
# was made (same code, same inputs: equal in practice). The allowance covers another kernel's roundings of a sum
# of up to a few hundred log-probs (fp32: ~1e-5 relative); a different base moves them by whole nats.
PROBE_ATOL, PROBE_RTOL = 1e-3, 1e-4


def attach_reference(reference: ReferenceLogps, recipe: Recipe, tokenizer, pairs: list[Pair], device: torch.device,
                     console: Console, autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext) -> None:
    """Put ``reference``'s log-probs of every pair into it (``pair[REF_LOGPS]``): from the cache when this exact
    table was made before and still checks out, else computed now (one no-grad pass) and cached. With several
    processes the main one computes and writes; the others read its entry (and check it). ``autocast``: the
    training steps' autocast (accelerate's), so the table is what the steps' reference forward would give."""
    micro, pad = recipe.train.micro_batch_size, tokenizer.pad_token_id
    reference = with_context(reference, autocast)
    path = cache_dir() / "reference" / f"{fingerprint(recipe, tokenizer, device)}.safetensors"

    def table() -> torch.Tensor:
        cached = read_table(path, len(pairs))
        if cached is not None and probe_agrees(cached, reference, pairs[:micro], pad, device):
            console.print(f"DPO reference log-probs of {len(pairs)} pairs read from the cache ({path})",
                          highlight=False)
            return cached
        with console.status(f"DPO reference: scoring {len(pairs)} pairs once (train.precompute_reference) ..."):
            computed = score(reference, pairs, micro, pad, device)
        write_table(path, computed, console)
        console.print(f"DPO reference log-probs of {len(pairs)} pairs computed and cached ({path})", highlight=False)
        return computed

    values = main_first(table).tolist()
    for pair, (chosen, rejected) in zip(pairs, values, strict=True):
        pair[REF_LOGPS] = [chosen, rejected]


def with_context(reference: ReferenceLogps, context: Callable[[], AbstractContextManager]) -> ReferenceLogps:
    def scored(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with context():
            return reference(batch)

    return scored


@torch.no_grad()
def score(reference: ReferenceLogps, pairs: list[Pair], micro: int, pad: int, device: torch.device) -> torch.Tensor:
    """(len(pairs), 2) fp32 on the CPU: the reference's (chosen, rejected) log-probs, ``micro`` pairs a batch."""
    parts = []
    for start in range(0, len(pairs), micro):
        batch = collate_pairs(pairs[start : start + micro], pad)
        chosen, rejected = reference({k: v.to(device) for k, v in batch.items()})
        parts.append(torch.stack([chosen, rejected], dim=1).float().cpu())
    return torch.cat(parts)


def probe_agrees(table: torch.Tensor, reference: ReferenceLogps, first: list[Pair], pad: int,
                 device: torch.device) -> bool:
    again = score(reference, first, len(first), pad, device)
    return bool(torch.allclose(again, table[: len(first)], rtol=PROBE_RTOL, atol=PROBE_ATOL))


def read_table(path: Path, pairs: int) -> torch.Tensor | None:
    """The cached table, or None when there is none or it cannot be used (damaged, another length)."""
    try:
        table = load_file(path)["logps"]
    except (OSError, KeyError, ValueError, RuntimeError):  # missing, or not a readable safetensors file
        return None
    return table if table.shape == (pairs, 2) and bool(torch.isfinite(table).all()) else None


def write_table(path: Path, table: torch.Tensor, console: Console) -> None:
    """Written whole under a temporary name, then renamed: a killed run never leaves half an entry. A cache that
    cannot be written costs only the next run's pass, so it is a warning."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"logps": table.contiguous()}, temporary)
        os.replace(temporary, path)
    except OSError as err:
        temporary.unlink(missing_ok=True)
        console.print(f"[yellow]warning:[/] could not cache the DPO reference log-probs in {path.parent} ({err}); "
                      "the next run computes them again", highlight=False)


def fingerprint(recipe: Recipe, tokenizer, device: torch.device) -> str:
    from lorafit.token_cache import fingerprint as data_fingerprint

    settings = {"version": REFERENCE_VERSION, "data": data_fingerprint(recipe.data.train, recipe.data, tokenizer),
                "model": recipe.model.model_dump(mode="json"), "base_files": files_identity(recipe.model.base),
                "init_from": adapter_digest(recipe.lora.init_from), "lora": recipe.lora.model_dump(mode="json"),
                "micro_batch_size": recipe.train.micro_batch_size, "device": device.type,
                "torch": torch.__version__}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:32]


def files_identity(base: str) -> list[tuple[str, int, int]]:
    """(name, size, mtime_ns) of a local base's files (a folder's top level, or the file itself); empty for a
    hub id or ``pkg:`` (their names pin them; the cache check catches the rest)."""
    path = Path(base).expanduser()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def adapter_digest(folder: str | None) -> str | None:
    """sha256 of the starting adapter's files (weights and config), or None without ``lora.init_from``."""
    if folder is None:
        return None
    digest = hashlib.sha256()
    for path in sorted(Path(folder).expanduser().glob("adapter_*")):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()
