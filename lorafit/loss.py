"""The training objective: next-token cross-entropy on trained tokens only, summed then normalised.

Shared by training and evaluation so that "eval loss" always means the same number.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from lorafit.data import IGNORE_INDEX, TokenizedData, collate


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over trained positions, computed in fp32.

    Position t predicts token t+1. Logits are only computed at positions whose next token is trained
    in some row (``logits_to_keep``): the output head is the biggest matmul in a small model
    (SmolLM2: 49,152 x 576), and prompt positions would only be thrown away by the loss.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = batch["labels"][:, 1:]  # (B, T-1)
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # (K,) positions t
    if _accepts_logits_to_keep(model):
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # (B, K, V)
    else:
        logits = model(**inputs, use_cache=False).logits[:, keep]  # (B, K, V)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets[:, keep].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _accepts_logits_to_keep(model) -> bool:
    model = getattr(model, "module", model)
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.no_grad()
def evaluate_loss(model, data: TokenizedData, micro_batch_size: int, pad_id: int, device: torch.device) -> float:
    """Mean loss per trained token over the whole eval set (not a mean of batch means)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data.examples), micro_batch_size):
        batch = collate(data.examples[start : start + micro_batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        total += float(token_loss_sum(model, batch))
        count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return total / max(count, 1)
