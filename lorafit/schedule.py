"""Learning-rate schedules: linear warm-up, then constant, linear decay to zero, or half a cosine to zero.

The same formulas as transformers' ``get_scheduler`` (tested step by step against it), written here so a
plain run does not import ``transformers.trainer_utils``: that module imports PEFT and, through it,
bitsandbytes whenever they are installed — seconds of start-up and a bitsandbytes kernel warning on runs
that use neither.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(name: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """step -> multiplier of the base learning rate."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}: use one of {', '.join(SCHEDULES)}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if name == "constant":
            return 1.0
        decay_steps = max(1, total_steps - warmup_steps)
        if name == "linear":
            return max(0.0, (total_steps - step) / decay_steps)
        progress = (step - warmup_steps) / decay_steps  # 0 -> 1 over the decay
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return factor


def make_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(name, warmup_steps, total_steps))
