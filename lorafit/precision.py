"""What a run stores and computes in: ``model.dtype`` and ``train.precision``, ``auto`` resolved for this machine.

- ``auto`` means bf16 where the hardware has it natively (a CUDA GPU with bf16; a CPU with avx512_bf16
  or AMX, or an Arm CPU with the BF16 extension), fp16 on a CUDA GPU without bf16, and fp32 elsewhere:
  emulated bf16 on an AVX2-only CPU is slower than fp32, not faster.
- A 16-bit base that computes in its own dtype (``bfloat16`` + ``bf16``) runs **without autocast**: the
  frozen weights are already in the compute dtype, and autocast would only add casts. The trainable LoRA
  weights stay fp32 (the optimizer's master copy) and are cast to the compute dtype inside each layer.
- An fp32 base with ``bf16``/``fp16`` compute, a 4/8-bit base, and ``fp16`` (which needs loss scaling)
  run under autocast.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.errors import LorafitError

COMPUTE_DTYPES = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}
# /proc/cpuinfo flags that mean bf16 arithmetic in hardware (x86: AVX512-BF16 or AMX; Arm: FEAT_BF16).
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@dataclass(frozen=True)
class PrecisionPlan:
    """The resolved choice. ``model_dtype`` is what the base is loaded in, ``precision`` what it computes in."""

    model_dtype: str    # float32 | bfloat16 | float16
    precision: str      # no | bf16 | fp16
    autocast: bool      # True: weights wider than the compute dtype (or k-bit, or fp16), autocast does the casts
    reason: str         # why, in one sentence, for plan and train

    @property
    def mixed_precision(self) -> str:
        """accelerate's setting: autocast (and fp16 loss scaling) only where this plan needs it."""
        return self.precision if self.autocast else "no"

    def describe(self) -> str:
        if self.precision == "no":
            how = "fp32" if self.model_dtype == "float32" else f"{self.model_dtype} weights, no autocast"
        elif self.autocast:
            how = f"{self.precision} autocast over {self.model_dtype} weights"
        else:
            how = f"{self.precision} weights and compute, no autocast"
        return f"precision: {how}; LoRA weights fp32 ({self.reason})"


@dataclass(frozen=True)
class Hardware:
    """What the resolution depends on, gathered once (and replaceable in tests)."""

    cuda: bool
    cuda_bf16: bool
    name: str              # GPU name or CPU model
    cpu_bf16_flags: tuple[str, ...]

    @property
    def native_bf16(self) -> bool:
        return self.cuda_bf16 if self.cuda else bool(self.cpu_bf16_flags)


def resolve(model_dtype: str, precision: str, quantize: str | None = None,
            hardware: Hardware | None = None) -> PrecisionPlan:
    """Turn the recipe's ``model.dtype`` / ``train.precision`` (either may be ``auto``) into a plan."""
    hw = hardware or detect_hardware()
    reasons = []
    if precision == "auto":
        precision, why = _auto_precision(hw)
        reasons.append(f"train.precision auto: {why}")
    check_supported(precision, hw)
    if model_dtype == "auto":
        model_dtype = COMPUTE_DTYPES[precision]
        layers = " (the 4/8-bit layers compute in it)" if quantize else ""
        reasons.append(f"model.dtype auto: the compute dtype{layers}")
    autocast = precision != "no" and not (precision == "bf16" and model_dtype == "bfloat16" and not quantize)
    return PrecisionPlan(model_dtype, precision, autocast, "; ".join(reasons) or "as the recipe sets")


def _auto_precision(hw: Hardware) -> tuple[str, str]:
    if hw.cuda:
        if hw.cuda_bf16:
            return "bf16", f"{hw.name} has bf16"
        return "fp16", f"{hw.name} has no bf16, so fp16 with loss scaling"
    if hw.cpu_bf16_flags:
        return "bf16", f"this CPU has native bf16 ({', '.join(hw.cpu_bf16_flags)})"
    return "no", "this CPU has no native bf16 (it would be emulated and slower than fp32), so fp32"


def check_supported(precision: str, hw: Hardware) -> None:
    """Settings this machine cannot run, refused before anything loads."""
    if precision == "fp16" and not hw.cuda:
        raise LorafitError("train.precision: fp16 needs a CUDA GPU; on CPU use bf16, no, or auto")
    if precision == "bf16" and hw.cuda and not hw.cuda_bf16:
        raise LorafitError(f"train.precision: {hw.name} has no bf16 support; use fp16 or auto")


def emulated_bf16_warning(plan: PrecisionPlan, hw: Hardware | None = None) -> str | None:
    """bf16 asked for explicitly on a CPU that has to emulate it, which is many times slower than fp32."""
    hw = hw or detect_hardware()
    if hw.cuda or hw.native_bf16 or "bfloat16" not in (plan.model_dtype, COMPUTE_DTYPES[plan.precision]):
        return None
    return ("this CPU has no native bf16, so bf16 runs emulated and far slower than fp32; for CPU training "
            "set model.dtype and train.precision to auto (or float32 and no)")


def detect_hardware() -> Hardware:
    """The hardware of the device this process computes on (lorafit.device's rule): a GPU, or the CPU."""
    from lorafit.device import compute_device

    device = compute_device()
    return _hardware(device.index or 0 if device.type == "cuda" else None)


@functools.cache
def _hardware(cuda_index: int | None) -> Hardware:
    if cuda_index is not None:
        return Hardware(True, torch.cuda.is_bf16_supported(including_emulation=False),
                        torch.cuda.get_device_name(cuda_index), ())
    flags = cpu_flags()
    return Hardware(False, False, cpu_model(), tuple(f for f in NATIVE_BF16_CPU_FLAGS if f in flags))


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 'flags', Arm 'Features'); empty where unreadable."""
    for line in _cpuinfo_lines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_model() -> str:
    for line in _cpuinfo_lines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return platform.processor() or platform.machine()


def _cpuinfo_lines() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
