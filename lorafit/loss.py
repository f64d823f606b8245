"""The training objective: next-token cross-entropy on trained tokens only, summed then normalised.

Shared by training and evaluation so that "eval loss" always means the same number.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.data import IGNORE_INDEX, TokenizedData, collate

# Model types whose loss is exactly CE(lm_head(final hidden state)): no soft-capping (Gemma 2/3), no
# logit scale (Cohere, Granite), no router loss (mixture-of-experts models). Others take the generic
# path through the model's own forward (which adds an MoE router's auxiliary loss when configured).
PLAIN_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo", "olmo2", "smollm3",
                               "starcoder2"})
LOGITS_BUDGET = 64 * 2**20  # logit elements per chunk: 256 MiB in fp32, whatever the vocabulary size


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over trained positions, computed in fp32.

    Position t predicts token t+1. Where the model's head is a plain frozen linear layer, only the
    hidden states of trained positions reach it, a chunk at a time (``linear_cross_entropy``): the
    [tokens, vocab] logits are the largest activation of a small model (SmolLM2: 49,152 wide) and
    prompt positions would only be thrown away by the loss.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = batch["labels"][:, 1:]  # (B, T-1)
    trained = targets != IGNORE_INDEX
    head = _plain_head(model)
    if head is not None:
        hidden = _unwrap(model).get_decoder()(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
        return linear_cross_entropy(hidden[:, :-1][trained], head.weight, targets[trained])
    keep = trained.any(dim=0).nonzero().squeeze(1)  # (K,) positions t trained in some row
    if "logits_to_keep" in inspect.signature(_unwrap(model).forward).parameters:
        output = model(**inputs, use_cache=False, logits_to_keep=keep)
        logits = output.logits  # (B, K, V)
    else:
        output = model(**inputs, use_cache=False)
        logits = output.logits[:, keep]  # (B, K, V)
    loss = F.cross_entropy(
        logits.flatten(0, 1).float(), targets[:, keep].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss + _router_loss(model, output, trained)


def _router_loss(model, output, trained: torch.Tensor) -> torch.Tensor | float:
    """A mixture-of-experts model configured with ``output_router_logits`` trains its router to balance the
    experts: transformers adds ``router_aux_loss_coef · aux_loss`` to the mean token loss. In this summed form
    that is the same term once per trained token, so a step's loss equals transformers' own."""
    config = getattr(_unwrap(model), "config", None)
    aux = getattr(output, "aux_loss", None)
    if aux is None or not getattr(config, "output_router_logits", False):
        return 0.0
    return getattr(config, "router_aux_loss_coef", 0.0) * aux.float() * trained.sum()


class TokenLoss(nn.Module):
    """The training objective as a module: ``TokenLoss(model)(**batch)`` == ``token_loss_sum(model, batch)``.

    This is what accelerate wraps for training. DDP arms its gradient all-reduce in the wrapper's forward,
    and the fused loss calls the decoder directly, so the wrapper must run the whole objective, not the
    model's own forward (which would compute every logit).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return token_loss_sum(self.model, batch)


def trained_positions(batch: dict[str, torch.Tensor]) -> int:
    """How many positions of ``batch`` are trained: position t counts when token t+1's label is kept.
    The denominator of the loss per trained token, in training, eval and the benchmarks alike."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum_i CE(hidden_i · weightᵀ, labels_i) without keeping any logits for backward.

    hidden: (N, H) trained positions only, weight: (V, H) frozen, labels: (N,). Returns an fp32 scalar.
    """
    return _LinearCrossEntropy.apply(hidden, weight, labels, max(1, LOGITS_BUDGET // weight.shape[0]))


class _LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of a frozen linear head, fused and chunked over tokens.

    The gradient w.r.t. the hidden states, (softmax - onehot) · W, is computed in forward chunk by
    chunk while the chunk's logits exist, and is all backward keeps: an (N, H) tensor instead of
    (N, V) logits plus their log-softmax. Same matmuls as autograd would run, no recomputation.
    Logits are computed in the dtype autocast gives the head's matmul and reduced in fp32, as
    transformers' own loss does.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = F.linear(hidden[rows], weight)  # (c, V) in the matmul's dtype
            matmul_dtype = logits.dtype
            logits = logits.float()
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            picked = logits.gather(1, labels[rows, None]).squeeze(1)
            total += (lse - picked).sum()
            if grad is not None:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(len(probs), device=probs.device), labels[rows]] -= 1.0
                grad[rows] = (probs.to(matmul_dtype) @ weight.to(matmul_dtype)).to(hidden.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def _plain_head(model) -> nn.Linear | None:
    """The output layer when the fused loss applies to this model, else None."""
    model = _unwrap(model)
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODELS or not hasattr(model, "get_decoder"):
        return None
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or head.bias is not None or head.weight.requires_grad:
        return None  # e.g. a LoRA-wrapped or trainable head: autograd must see the head itself
    return head


def _unwrap(model):
    return getattr(model, "module", model)


@torch.no_grad()
def evaluate_loss(model, data: TokenizedData, micro_batch_size: int, pad_id: int, device: torch.device) -> float:
    """Mean loss per trained token over the whole eval set (not a mean of batch means)."""
    total, count = evaluate_loss_sums(TokenLoss(model), data.examples, micro_batch_size, pad_id, device)
    return total / max(count, 1)


@torch.no_grad()
def evaluate_loss_sums(objective: nn.Module, examples: list[dict], micro_batch_size: int, pad_id: int,
                       device: torch.device, rounds: int = 0, filler: dict | None = None) -> tuple[float, int]:
    """Summed loss and trained positions of ``objective`` (a TokenLoss) over ``examples``: sums, so that
    processes each scoring a share of the eval set can add theirs into the loss of the whole set.

    At least ``rounds`` forward passes run, the extra ones on ``filler`` (default: the first example) with
    every label masked (they add nothing): a sharded model needs every process to run as many as the others.
    """
    objective.eval()
    batches = [examples[start : start + micro_batch_size] for start in range(0, len(examples), micro_batch_size)]
    filler = filler or (examples[0] if examples else None)
    if len(batches) < rounds and filler is not None:
        ghost = {**filler, "labels": [IGNORE_INDEX] * len(filler["labels"])}
        batches += [[ghost]] * (rounds - len(batches))
    total, count = 0.0, 0
    for rows in batches:
        batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
        total += float(objective(**batch))
        count += trained_positions(batch)
    return total, count
