"""Training and evaluating on preference pairs (``train.objective: dpo | orpo``, ``data.format: preference``).

What the loop in lorafit/train.py needs beside SFT's pieces: the pairs (lorafit/preference.py) as a seeded,
resumable stream of pair batches (``PairBatches``: micro-batch k holds micro_batch_size PAIRS per process, i.e.
2 x that many rows, chosen first), the objective (lorafit/objectives.py) with DPO's reference switched on the
same model (lorafit/adapters/switch.py: adapters off for a fresh adapter; the frozen starting adapter's weights
for ``lora.init_from``), how much a micro-batch weighs in a step (its pairs), and evaluation over pairs (the
objective's loss and metrics in the loop; chosen-answer NLL, preference accuracy and margin in ``lorafit eval``).

The reference log-probs are computed in each step (one extra no-grad forward of the batch), or, with
``train.precompute_reference: true``, once per dataset before the first step and cached on disk
(lorafit/reference_cache.py, which says when that pays).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorafit.adapters.switch import adapter_snapshot, adapter_weights, adapters_disabled
from lorafit.config import Recipe
from lorafit.data import Batches
from lorafit.examples import IGNORE_INDEX
from lorafit.objectives import (
    DPOObjective,
    ORPOObjective,
    ReferenceLogps,
    batch_logps,
    reference_under,
    split_pairs,
)
from lorafit.preference import Pair, PreferenceData, collate_pairs, load_preference


class PairBatches(Batches):
    """``data.Batches`` over pairs: the same seeded order, positions and per-process shares, with each share
    collated as one batch of chosen rows then rejected rows (``collate_pairs``)."""

    def get(self, position: int) -> tuple[dict[str, torch.Tensor], int]:
        """This process's pairs at ``position`` and their real tokens (prompt counted once per answer). An empty
        share (end of an epoch, several processes) is one pair with every label masked: it weighs nothing."""
        chosen = self.global_rows(position)
        share = chosen[self.rank * self.micro : (self.rank + 1) * self.micro]
        if not share:
            batch = collate_pairs(chosen[:1], self.pad_id)
            batch["labels"].fill_(IGNORE_INDEX)
            return batch, 0
        tokens = sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in share)
        return collate_pairs(share, self.pad_id), tokens

    def get_global(self, position: int) -> dict[str, torch.Tensor]:
        return collate_pairs(self.global_rows(position), self.pad_id)


def pair_count(batch: dict[str, torch.Tensor]) -> int:
    """The pairs a micro-batch trains: half its rows, or 0 for a padding share (every label masked)."""
    return len(batch["labels"]) // 2 if bool((batch["labels"] != IGNORE_INDEX).any()) else 0


def load_pair_sets(recipe: Recipe, tokenizer) -> tuple[PreferenceData, PreferenceData | None]:
    """data.train and data.eval as tokenized pairs (errors name the row)."""
    data = recipe.data
    train = load_preference(data.train, tokenizer, data.max_seq_len)
    return train, load_preference(data.eval, tokenizer, data.max_seq_len) if data.eval else None


def pair_objective(model: nn.Module, recipe: Recipe) -> nn.Module:
    """The recipe's DPO or ORPO objective over ``model`` (adapters injected, ``lora.init_from`` already loaded).

    DPO's reference: the base (adapters switched off) for a fresh adapter; base + the starting adapter for
    ``lora.init_from`` — its weights kept as a frozen copy of the adapter tensors (not of the base), swapped in
    for the no-grad reference pass. Taken here, before a resume restores later weights."""
    cfg = recipe.train
    if cfg.objective == "orpo":
        return ORPOObjective(model, lam=cfg.beta)
    return DPOObjective(model, beta=cfg.beta, reference_logps=dpo_reference(model, recipe))


def dpo_reference(model: nn.Module, recipe: Recipe) -> ReferenceLogps:
    """DPO's reference log-probs on ``model`` (see ``pair_objective``): the model with its adapters off, or with
    the starting adapter's weights (a frozen copy taken now) swapped in."""
    if recipe.lora.init_from is None:
        context = lambda: adapters_disabled(model)  # noqa: E731
    else:
        start = adapter_snapshot(model)
        context = lambda: adapter_weights(model, start)  # noqa: E731
    return reference_under(model, context)


@torch.no_grad()
def evaluate_pair_sums(objective: nn.Module, pairs: list[Pair], micro_batch_size: int, pad_id: int,
                       device: torch.device, rounds: int = 0, filler: Pair | None = None
                       ) -> tuple[dict[str, float], int]:
    """The objective's metrics (loss included) summed over ``pairs``, each batch's weighted by its pairs, and the
    pair count: sums, so that processes scoring shares of the eval set add up. At least ``rounds`` batches run
    (the extra ones on ``filler`` with every label masked, weighing nothing), as ``loss.evaluate_loss_sums``."""
    objective.eval()
    chunks = [pairs[start : start + micro_batch_size] for start in range(0, len(pairs), micro_batch_size)]
    chunks += [[]] * max(0, rounds - len(chunks))
    sums: dict[str, float] = {}
    count = 0
    for chunk in chunks:
        batch = collate_pairs(chunk or [filler or pairs[0]], pad_id)
        if not chunk:
            batch["labels"].fill_(IGNORE_INDEX)
        _, metrics = objective(**{k: v.to(device) for k, v in batch.items()})
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value) * len(chunk)
        count += len(chunk)
    return sums, count


@torch.no_grad()
def score_pairs(model: nn.Module, pairs: list[Pair], micro_batch_size: int, pad_id: int,
                device: torch.device) -> tuple[float, float, float]:
    """For ``lorafit eval``: (loss, preference accuracy, mean margin) over ``pairs``. Loss is the NLL of the chosen
    answers per answer token (the SFT loss of prompt + chosen); accuracy the share of pairs whose chosen answer
    has the higher summed log-prob; margin the mean of log p(chosen) − log p(rejected) (nats)."""
    nll = tokens = correct = margin = 0.0
    for start in range(0, len(pairs), micro_batch_size):
        batch = {k: v.to(device) for k, v in collate_pairs(pairs[start : start + micro_batch_size], pad_id).items()}
        chosen, rejected = split_pairs(batch_logps(model, batch).float())
        chosen_labels, _ = split_pairs(batch["labels"][:, 1:])
        nll -= float(chosen.sum())
        tokens += int((chosen_labels != IGNORE_INDEX).sum())
        correct += int((chosen > rejected).sum())
        margin += float((chosen - rejected).sum())
    n = len(pairs)
    return nll / max(tokens, 1), correct / n, margin / n


def eval_rounds(items: int, world: int, micro_batch_size: int) -> int:
    """Batches each process runs when ``world`` processes share ``items`` eval items round-robin."""
    return math.ceil(math.ceil(items / world) / micro_batch_size)
