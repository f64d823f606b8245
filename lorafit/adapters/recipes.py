"""Each method's recipe side, torch-free (``import lorafit.cli`` must not import torch): its ``lora.<method>``
options block, the ``lora`` keys it ignores, its checks of the recipe, and its one-line description for ``plan``.
The registry (lorafit/adapters/__init__.py) names these per method; config.py and cli.py only ask it."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VeRAConfig(_Block):
    """VeRA's own settings (lorafit/adapters/vera.py); lora.r is VeRA's rank."""

    projection_prng_key: int = Field(0, ge=0)  # seed of the shared frozen projections (PEFT's default 0)
    d_initial: float = Field(0.1, gt=0)  # λ_d's start value (PEFT's default)


class AdaLoRAConfig(_Block):
    """AdaLoRA's schedule (lorafit/adapters/adalora.py), PEFT's names; lora.r is the target rank. total_step is
    the run's."""

    init_r: int | None = Field(None, ge=1)  # initial rank per layer; null: 1.5 x lora.r, rounded up
    tinit: int | None = Field(None, ge=0)  # steps before the budget starts falling; null: 10% of the run
    tfinal: int | None = Field(None, ge=0)  # steps at the final budget; null: 20% of the run
    deltaT: int = Field(1, ge=1)  # noqa: N815 (PEFT's name) -- mask every deltaT steps while the budget falls
    beta1: float = Field(0.85, gt=0, lt=1)  # EMA of the sensitivity
    beta2: float = Field(0.85, gt=0, lt=1)  # EMA of its uncertainty
    orth_reg_weight: float = Field(0.5, ge=0)  # weight of the orthogonality penalty

    def initial_rank(self, target_r: int) -> int:
        return self.init_r if self.init_r is not None else -(-3 * target_r // 2)


# lora.init values that start from the base weight (lorafit/adapters/init.py; the others: A random, B zero), and
# those of them that change W, so the adapter is saved against the original base as a rank-2r LoRA.
BASE_INITS = {  # name -> plan's words
    "pissa": "A, B from W's top-r singular vectors, base W - s·B·A",
    "olora": "A, B from W = Q·R (first r), base W - s·B·A",
    "loftq": "B·A fits W - Q(W), what 4-bit quantization loses; starts at Q(W) + s·B·A, W at alpha = r",
}
MUTATES_BASE = ("pissa", "olora")
INIT_NAMES = ("kaiming", "gaussian", *BASE_INITS)  # lora.init's values


def describe_init(lora: Any) -> str:
    """The plan's words for lora.init (empty for the default)."""
    if lora.init == "kaiming":
        return ""
    if lora.init not in BASE_INITS:
        return f" init={lora.init}"
    fast = {"pissa": f" (fast SVD, {lora.init_iter} iterations)", "loftq": f" ({lora.init_iter} iteration)"}
    saved = "; saved as a rank-2r LoRA of the original base" if lora.init in MUTATES_BASE else ""
    return f" init={lora.init}{fast[lora.init] if lora.init_iter else ''}: {BASE_INITS[lora.init]}{saved}"


# What VeRA and AdaLoRA set their own way (ranks, scaling, init): a recipe that sets these with them is refused.
OWN_RANKS = ("use_rslora", "rank_pattern", "alpha_pattern", "rank_allocation", "init", "init_iter")


def describe_lora(title: str, lora: Any) -> str:
    """LoRA / DoRA: rank, alpha and the scaling they give."""
    scaling = lora.alpha / math.sqrt(lora.r) if lora.use_rslora else lora.alpha / lora.r
    return (f"{title} r={lora.r} alpha={lora.alpha:g} scaling={scaling:g}"
            f"{' (rsLoRA: alpha/sqrt(r))' if lora.use_rslora else ''} dropout={lora.dropout:g}"
            f"{' (per-module r and alpha below)' if lora.rank_pattern or lora.alpha_pattern else ''}"
            f"{describe_init(lora)}")


def describe_vera(title: str, lora: Any) -> str:
    key = lora.vera.projection_prng_key if lora.vera else 0
    return f"{title} r={lora.r} (shared frozen projections, seed {key}) dropout={lora.dropout:g}"


def describe_adalora(title: str, lora: Any) -> str:
    options = lora.adalora or AdaLoRAConfig()
    return (f"{title}: r={options.initial_rank(lora.r)} per layer at start, budget falling to r={lora.r} per "
            f"layer; alpha={lora.alpha:g} dropout={lora.dropout:g}")


# Why LoRA+ (a faster lr for B of an update B·A whose B starts at zero) means nothing for these methods.
LORAPLUS_VERA = ("VeRA trains only its scaling vectors λ_b and λ_d, both 1-D, which PEFT's LoRA+ puts in B's group: "
                 "the ratio would only multiply train.lr (raise train.lr instead)")
LORAPLUS_ADALORA = ("AdaLoRA's update is P·Λ·Q with P (its lora_B) and Q both random from the start and Λ at zero, "
                    "not the B·A with B at zero that LoRA+ speeds B up for")


def check_dora(lora: Any) -> None:
    if lora.init in BASE_INITS:
        raise ValueError(f"lora.init: {lora.init} does not combine with variant: dora: DoRA's magnitude rescales "
                         "each row of W' + s·B·A, so the adapter cannot be saved as a LoRA over the original base "
                         "(PEFT's conversion drops the magnitude). Use variant: lora with it, or dora with init "
                         "kaiming / gaussian")


def check_adalora(lora: Any) -> None:
    if (lora.adalora or AdaLoRAConfig()).initial_rank(lora.r) < lora.r:
        raise ValueError(f"lora.adalora.init_r must be at least lora.r ({lora.r}), the rank AdaLoRA prunes down to")
