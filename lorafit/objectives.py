"""Training objectives beside SFT: each maps (model, batch) to (loss, metrics), so the loop stays objective-blind.

    SFT   lorafit.loss.token_loss_sum(model, batch) / trained_positions(batch): next-token cross-entropy over
          trained tokens (``sft_objective`` below gives it the same (loss, metrics) shape; lorafit/loss.py is
          unchanged and remains what the loop calls for SFT, summed then normalised over a whole step).
    DPO   ``DPOObjective``: -logsigmoid(β·((π_c − ref_c) − (π_r − ref_r))) per pair, mean over pairs; π and ref
          are log-probs of the whole answer (summed over its tokens). Rafailov et al. 2023; TRL's DPOTrainer
          with loss_type "sigmoid".
    ORPO  ``ORPOObjective``: NLL of the chosen answers (mean over their tokens) − λ·mean(logsigmoid(log odds
          ratio)), the odds taken on per-token AVERAGED log-probs. Hong et al. 2024; TRL's ORPOTrainer.

A batch is what ``lorafit.preference.collate_pairs`` makes: 2B rows, chosen first, labels -100 on prompt and
padding. Chosen and rejected go through the model in ONE forward. Metrics are 0-dim detached tensors named as
TRL logs them (``float()`` them when logging: no device sync per step unless asked).

DPO's reference log-probs come from ``reference_logps(batch) -> (chosen, rejected)``, or from the batch itself
(``ref_chosen_logps`` / ``ref_rejected_logps``, precomputed once per dataset; TRL's keys). The intended
reference is the same model with its adapters switched off (``reference_under(model, adapters_off)``), never a
second copy of the base weights.

Differences from TRL, on purpose: ORPO's NLL term counts only the chosen ANSWER tokens (TRL's ORPOTrainer puts
the whole prompt + answer into it: "orpo chosen nll loss is computed over the full prompt and response"); lorafit
trains answers only, as for SFT and DPO. The two agree exactly when the prompt is one token (a token at
position 0 is never a target). TRL's logits/* metrics (mean logit of the answer tokens) are not computed: the
fused path never builds the logits.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.examples import IGNORE_INDEX
from lorafit.loss import _plain_head, _unwrap, linear_cross_entropy, token_loss_sum, trained_positions

Metrics = dict[str, torch.Tensor]
ReferenceLogps = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's labelled tokens, in fp32: (N, T, V), (N, T) -> (N,).

    Shifted as a causal LM: logits at position t score the label at t+1; label -100 (prompt, padding) counts 0.
    """
    return _scored_sum(logits[:, :-1], labels[:, 1:])


def _scored_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over k of log softmax(logits[:, k])[targets[:, k]] where targets != -100: (N, K, V), (N, K) -> (N,)."""
    scored = targets != IGNORE_INDEX
    logps = torch.log_softmax(logits.float(), dim=-1)
    picked = logps.gather(-1, targets.masked_fill(~scored, 0).unsqueeze(-1)).squeeze(-1)  # (N, K)
    return (picked * scored).sum(dim=-1)


def answer_tokens(labels: torch.Tensor) -> torch.Tensor:
    """How many tokens of each row are scored by ``sequence_logps``: (N, T) -> (N,) long."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=-1)


def batch_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``sequence_logps`` of the model's logits on ``batch`` (2B rows), from one forward pass.

    Where the model's head is a plain frozen linear layer (``lorafit.loss._plain_head``), only the hidden states
    of scored positions reach it, a chunk at a time, through the same fused cross-entropy SFT uses (one call per
    row: the summed CE of a row is minus its log-prob); no [tokens, vocab] logits are kept for backward.
    Otherwise the model's forward computes logits for the scored positions only (``logits_to_keep``).
    """
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    targets = batch["labels"][:, 1:]  # (N, T-1)
    trained = targets != IGNORE_INDEX
    head = _plain_head(model)
    if head is not None:
        hidden = _unwrap(model).get_decoder()(**inputs, use_cache=False).last_hidden_state[:, :-1]  # (N, T-1, H)
        rows = [-linear_cross_entropy(hidden[i][trained[i]], head.weight, targets[i][trained[i]])
                for i in range(len(hidden))]
        return torch.stack(rows)
    keep = trained.any(dim=0).nonzero().squeeze(1)  # (K,) positions t scored in some row
    if "logits_to_keep" in inspect.signature(_unwrap(model).forward).parameters:
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # (N, K, V)
    else:
        logits = model(**inputs, use_cache=False).logits[:, keep]
    return _scored_sum(logits, targets[:, keep])  # logits k score targets[:, keep[k]]


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, ...) -> chosen (B, ...), rejected (B, ...): the layout of ``collate_pairs``."""
    chosen, rejected = values.chunk(2, dim=0)
    return chosen, rejected


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's sigmoid loss per pair, and the implicit rewards (detached): each input (B,) -> three (B,) tensors.

    loss = -logsigmoid(β·((π_c − ref_c) − (π_r − ref_r))), reward_c = β·(π_c − ref_c), reward_r = β·(π_r − ref_r).
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate on both sides of −log 2 (Mächler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_odds_ratio(chosen_avg_logps: torch.Tensor,
                    rejected_avg_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsigmoid(log odds ratio), log odds ratio) per pair, from per-token averaged log-probs, in fp32.

    odds(y) = p / (1 − p) with log p the averaged log-prob; log odds ratio = log odds(chosen) − log odds(rejected).
    """
    chosen, rejected = chosen_avg_logps.float(), rejected_avg_logps.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return F.logsigmoid(log_odds), log_odds


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                       rejected_logps: torch.Tensor) -> Metrics:
    """TRL's reward metrics: means over the pairs of the batch, detached."""
    return {
        "rewards/chosen": chosen_rewards.detach().mean(),
        "rewards/rejected": rejected_rewards.detach().mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).detach().mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


def reference_under(model, context: Callable[[], contextlib.AbstractContextManager]) -> ReferenceLogps:
    """A ``reference_logps`` callable: the model's own log-probs, without gradient, inside ``context()``.

    ``context`` is what turns the policy into the reference, e.g. the adapter layers switched off (a fresh
    adapter: the base) or switched to a frozen copy of the starting adapter (SFT, then DPO).
    """
    def reference_logps(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), context():
            return split_pairs(batch_logps(model, batch))

    return reference_logps


class DPOObjective(nn.Module):
    """``DPOObjective(model, beta, reference_logps)(**batch) -> (loss, metrics)``; loss is the mean over pairs.

    A module, like ``lorafit.loss.TokenLoss``, so accelerate can wrap the whole objective (DDP arms its all-reduce
    in the wrapper's forward). The reference comes from the batch's ``ref_chosen_logps`` / ``ref_rejected_logps``
    when present (precomputed), else from ``reference_logps``.
    """

    def __init__(self, model: nn.Module, beta: float = 0.1, reference_logps: ReferenceLogps | None = None):
        super().__init__()
        self.model, self.beta, self.reference_logps = model, beta, reference_logps

    def forward(self, **batch: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        # The reference first: a context that switches adapters (or swaps their weights) then runs before the
        # policy's graph exists, so no tensor saved for backward can be changed under it.
        if "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        elif self.reference_logps is not None:
            ref_chosen, ref_rejected = self.reference_logps(batch)
        else:
            raise ValueError("DPO needs reference log-probs: pass reference_logps or put ref_*_logps in the batch")
        policy_chosen, policy_rejected = split_pairs(batch_logps(self.model, batch))
        losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen.detach(),
                                                            ref_rejected.detach(), self.beta)
        loss = losses.mean()
        metrics = {"loss": loss.detach(),
                   **preference_metrics(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)}
        return loss, metrics


class ORPOObjective(nn.Module):
    """``ORPOObjective(model, lam)(**batch) -> (loss, metrics)``: no reference model.

    loss = NLL(chosen answers, mean over their tokens in the batch) − λ · mean over pairs of
    logsigmoid(log odds ratio of the per-token averaged log-probs). Rewards (TRL's) are λ · averaged log-prob.
    """

    def __init__(self, model: nn.Module, lam: float = 0.1):
        super().__init__()
        self.model, self.lam = model, lam

    def forward(self, **batch: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        logps = batch_logps(self.model, batch)
        counts = answer_tokens(batch["labels"])
        chosen_sum, _ = split_pairs(logps)
        chosen_count, _ = split_pairs(counts)
        # A row with no scored token (a padding share, which weighs nothing in its step) gets a finite stand-in:
        # an average log-prob of 0 would make the odds infinite and the (zero-weighted) loss NaN.
        chosen_avg, rejected_avg = split_pairs(torch.where(counts > 0, logps / counts.clamp(min=1), -1.0))
        nll = -chosen_sum.sum() / chosen_count.sum().clamp(min=1)
        ratio, log_odds = orpo_odds_ratio(chosen_avg, rejected_avg)
        loss = nll - self.lam * ratio.mean()
        chosen_rewards, rejected_rewards = self.lam * chosen_avg.detach(), self.lam * rejected_avg.detach()
        metrics = {"loss": loss.detach(),
                   **preference_metrics(chosen_rewards, rejected_rewards, chosen_avg, rejected_avg),
                   "nll_loss": nll.detach(), "log_odds_ratio": ratio.detach().mean(),
                   "log_odds_chosen": log_odds.detach().mean()}
        return loss, metrics


def sft_objective(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
    """SFT in the same shape: mean next-token cross-entropy over the batch's trained tokens, and {"loss"}.

    The training loop keeps using ``token_loss_sum`` (a sum, normalised by the trained tokens of the whole step
    across micro-batches and processes); this is the per-batch view, for code that wants any objective alike.
    """
    loss = token_loss_sum(model, batch) / max(trained_positions(batch), 1)
    return loss, {"loss": loss.detach()}


@torch.no_grad()
def preference_scores(model, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """For ``lorafit eval`` on preference data: per pair, does the model give the chosen answer the higher
    (summed) log-prob, and by how much. Sums, so that batches and processes add up: correct, margin_sum, pairs."""
    chosen, rejected = split_pairs(batch_logps(model, batch))
    return {"correct": int((chosen > rejected).sum()), "margin_sum": float((chosen - rejected).sum()),
            "pairs": len(chosen)}
