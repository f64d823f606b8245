"""Where a command computes: the one rule every command follows.

1. ``--device`` where a command takes it (``eval``, ``generate``): ``auto``, ``cpu``, ``cuda`` or ``cuda:N``;
2. else ``$LORAFIT_DEVICE`` (the same values; e.g. ``LORAFIT_DEVICE=cpu`` keeps a GPU machine's GPU free);
3. else the CUDA GPU when torch sees one (torch honours ``CUDA_VISIBLE_DEVICES``): ``cuda:LOCAL_RANK`` in a
   process launched as one of several, ``cuda:0`` otherwise;
4. else the CPU.

``train`` (and the EVA statistics pass before it) and ``plan``'s EVA pass, ``eval`` and ``generate`` compute
there; a 4/8-bit base is quantized there (bitsandbytes packs weights on the device they will run on).
``merge`` and ``export`` stream weights from file to file on the CPU and verify on the CPU by design: their
check compares with an fp32 base + adapter, which a consumer GPU often cannot hold beside nothing else.
"""

from __future__ import annotations

import os

import torch

from lorafit.errors import LorafitError

CHOICES = "auto, cpu, cuda or cuda:N"


def compute_device(requested: str | None = None) -> torch.device:
    """The device a command computes on (see the module docstring for the order of the rule)."""
    if requested is not None and requested != "auto":
        return _checked(requested, "--device")
    from_env = os.environ.get("LORAFIT_DEVICE", "").strip()
    if from_env and from_env != "auto":
        return _checked(from_env, "LORAFIT_DEVICE")
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0) % torch.cuda.device_count())
    return torch.device("cpu")


def _checked(name: str, where: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise LorafitError(f"{where} {name!r}: not a device; use {CHOICES}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise LorafitError(f"{where} {name!r}: lorafit runs on CUDA GPUs or the CPU; use {CHOICES}")
    if not torch.cuda.is_available():
        raise LorafitError(f"{where} {name!r}: torch sees no CUDA GPU here (torch {torch.__version__}, "
                           f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use cpu or auto")
    index = 0 if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise LorafitError(f"{where} {name!r}: this machine has {torch.cuda.device_count()} visible CUDA GPU(s), "
                           f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", index)
