"""Learning-rate schedules: lorafit's own, equal to transformers' get_scheduler at every step."""

import pytest
import torch
from transformers import get_scheduler

from lorafit.schedule import make_scheduler

HF_NAMES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def lrs(scheduler, optimizer, steps: int) -> list[float]:
    seen = []
    for _ in range(steps):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return seen


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
@pytest.mark.parametrize(("warmup", "total"), [(0, 10), (3, 20), (5, 5), (1, 1)])
def test_schedule_equals_transformers(name, warmup, total):
    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)

    ours_opt, theirs_opt = optimizer(), optimizer()
    ours = make_scheduler(name, ours_opt, warmup, total)
    theirs = get_scheduler(HF_NAMES[name], theirs_opt, num_warmup_steps=warmup, num_training_steps=total)
    assert lrs(ours, ours_opt, total + 2) == lrs(theirs, theirs_opt, total + 2)  # exact, past the end too


def test_scheduler_state_round_trips():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = make_scheduler("cosine", optimizer, 2, 10)
    lrs(scheduler, optimizer, 4)
    state = scheduler.state_dict()
    fresh_opt = torch.optim.SGD([param], lr=1.0)
    fresh = make_scheduler("cosine", fresh_opt, 2, 10)
    fresh.load_state_dict(state)
    assert fresh.get_last_lr() == scheduler.get_last_lr()
