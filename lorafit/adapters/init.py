"""Initialisations that start LoRA from the base weight (``lora.init: pissa | olora | loftq``), each equal to PEFT's
``init_lora_weights`` of the same name; ``kaiming`` / ``gaussian`` (A random, B zero) stay in lora.py.

Each is a function of the base weight W (fp32 [out, in]) and the rank, returning (A [r, in], B [out, r], W'):

    pissa   W = U·S·Vᵀ;  B = U_r·sqrt(S_r/s),  A = sqrt(S_r/s)·V_rᵀ;  W' = W − s·B·A  (the principal part trains)
            with ``init_iter`` N: torch.svd_lowrank with N subspace iterations (PEFT's "pissa_niter_N")
    olora   W = Q·R;  B = Q[:, :r],  A = R[:r];  W' = W − s·B·A
    loftq   over a 4-bit base Q(W): B·A = the rank-r SVD part of W − Q(W), the residual the quantizer lost;
            W' = Q(W) unchanged (PEFT's loftq_init with loftq_iter 1; more iterations re-quantize the base)

s is the layer's scaling (alpha/r, or alpha/sqrt(r)). PiSSA and OLoRA change the base (W' + s·B·A = W, so the
model's output at step 0 is the base's). Their adapter is saved against the ORIGINAL base, as PEFT's
``save_pretrained(path_initial_model_for_weight_conversion=...)`` does: ΔW = s·(B·A − B0·A0) is the rank-2r
plain LoRA [B, −B0]·[A; A0] at alpha·2 (rsLoRA: alpha·sqrt 2), so the scaling is unchanged. A0, B0 (the
initial factors) are kept on the layer as buffers; a checkpoint holds them in its second half, so a resume
rebuilds W' exactly (see ``take_saved``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lorafit.adapters.recipes import BASE_INITS, MUTATES_BASE
from lorafit.errors import LorafitError

# ``layer`` below is a lorafit.adapters.lora.LoRALinear (typed Any: lora.py imports this file).
LoRALinear = Any

__all__ = ["BASE_INITS", "MUTATES_BASE", "initialise_from_base", "loftq", "olora", "pissa"]

Init = Callable[[torch.Tensor, int, float, "int | None"], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@torch.no_grad()
def pissa(weight: torch.Tensor, r: int, scaling: float, niter: int | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEFT's pissa_init: A, B from W's top-r singular triplets (fp32 W [out, in]); ``niter``: fast SVD."""
    if niter is None:
        V, S, Uh = torch.linalg.svd(weight, full_matrices=False)
        Vr, Sr, Uhr = V[:, :r], S[:r] / scaling, Uh[:r]
    else:
        Vr, Sr, Ur = torch.svd_lowrank(weight, r, niter=niter)
        Sr, Uhr = Sr / scaling, Ur.t()
    lora_A = torch.diag(torch.sqrt(Sr)) @ Uhr  # as PEFT writes them, so both round alike
    lora_B = Vr @ torch.diag(torch.sqrt(Sr))
    return lora_A, lora_B, weight - scaling * lora_B @ lora_A


@torch.no_grad()
def olora(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEFT's olora_init: W = Q·R, B = Q[:, :r], A = R[:r] (fp32 W [out, in])."""
    Q, R = torch.linalg.qr(weight)
    lora_A, lora_B = R[:r].contiguous(), Q[:, :r].contiguous()
    return lora_A, lora_B, weight - scaling * lora_B @ lora_A


# The inits that rewrite W: (W, r, scaling, init_iter) -> (A, B, W').
MUTATING: dict[str, Init] = {
    "pissa": pissa,
    "olora": lambda weight, r, scaling, _: olora(weight, r, scaling),
}


def residual_low_rank(residual: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's _low_rank_decomposition: (A, B) = (sqrt(S_r)·V_rᵀ, U_r·sqrt(S_r)) of a [out, in] residual."""
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    return torch.sqrt(torch.diag(S)[0:r, :]) @ Vh, U @ torch.sqrt(torch.diag(S)[:, 0:r])


@torch.no_grad()
def loftq(weight: torch.Tensor, r: int, iters: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEFT's loftq_init (4 bits: NF4, blocks of 64, no double quantization) on W's own device: alternately
    quantize W − B·A and fit B·A to W − Q. Returns A, B and W' = the last Q, de-quantized, fp32."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    if iters < 1:
        raise ValueError(f"LoftQ needs at least one iteration, got {iters}")
    weight = weight.float()
    residual = weight
    for i in range(iters):
        packed, state = quantize_4bit(residual.contiguous(), blocksize=64, compress_statistics=False,
                                      quant_type="nf4")
        dequantized = dequantize_4bit(packed, state)
        lora_A, lora_B = residual_low_rank(weight - dequantized, r)
        if i + 1 < iters:
            residual = weight - lora_B @ lora_A
    return lora_A, lora_B, dequantized


@torch.no_grad()
def initialise_from_base(layer: LoRALinear, init: str, init_iter: int | None,
                         original: torch.Tensor | None = None) -> None:
    """Set the layer's A, B (fp32, as PEFT keeps them) and, for pissa / olora, its base weight W' and the
    initial factors (buffers ``initial_A`` / ``initial_B``). ``original``: loftq's full-precision W."""
    if init == "loftq":
        lora_A, lora_B = _loftq_over_4bit(layer, original, init_iter)
    else:
        weight = _float_weight(layer, init)
        lora_A, lora_B, residual = MUTATING[init](weight, layer.r, layer.scaling, init_iter)
        layer._float_base_weight().copy_(residual)  # rounds to the base dtype once, as PEFT's cast does
        layer.initial_A, layer.initial_B = lora_A.clone(), lora_B.clone()
    layer.lora_A.weight.data = lora_A.contiguous()
    layer.lora_B.weight.data = lora_B.contiguous()


def _float_weight(layer: LoRALinear, init: str) -> torch.Tensor:
    weight = layer.base_weight
    if not weight.dtype.is_floating_point:
        raise LorafitError(f"lora.init: {init} rewrites the base weight as W − s·B·A, which a quantized base cannot "
                           "hold without quantizing it a second time. Train over the full-precision base (remove "
                           "model.quantize), or use lora.init: loftq, which is made for a 4-bit base")
    return layer._float_base_weight().detach().float()


def _loftq_over_4bit(layer: LoRALinear, original: torch.Tensor | None, init_iter: int | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """B·A fitted to W − Q(W), with Q(W) the layer's own 4-bit weight (PEFT's replace_lora_weights_loftq)."""
    from bitsandbytes.functional import dequantize_4bit

    state = getattr(layer.base_weight, "quant_state", None)
    if state is None or original is None:
        raise LorafitError("lora.init: loftq fits B·A to what 4-bit quantization loses (W − Q(W)); this base is "
                           "not 4-bit. Set model.quantize: 4bit, or use lora.init: pissa over a full-precision base")
    if (init_iter or 1) != 1:
        raise LorafitError("lora.init_iter > 1 with loftq re-quantizes the base weight, which the saved adapter "
                           "would then need beside it; lorafit keeps the 4-bit base as loaded: use init_iter 1")
    quantized = dequantize_4bit(layer.base_weight.data, state).float()
    return residual_low_rank(original.to(quantized.device).float() - quantized, layer.r)


# --- the adapter as saved: against the original base --------------------------------------------------------


def record_rank_alpha(layer: LoRALinear) -> tuple[int, float]:
    """r and alpha of the layer's saved record: 2r and alpha·2 (rsLoRA: ·sqrt 2) when saved against the original
    base, which keep the scaling alpha/r (alpha/sqrt(r))."""
    if layer.initial_A is None:
        return layer.r, layer.alpha
    return 2 * layer.r, layer.alpha * (math.sqrt(2) if layer.use_rslora else 2)


def against_original(layer: LoRALinear, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """[A; A0] and [B, −B0]: ΔW of the trained model over the original base, as a rank-2r LoRA."""
    A, B = params["lora_A.weight"], params["lora_B.weight"]
    A0, B0 = layer.initial_A.to(A.dtype), layer.initial_B.to(B.dtype)
    return {**params, "lora_A.weight": torch.cat([A, A0], dim=0), "lora_B.weight": torch.cat([B, -B0], dim=1)}


@torch.no_grad()
def take_saved(layer: LoRALinear, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``against_original`` (a checkpoint resumed): the trained A, B, and the saved A0, B0. When
    the saved A0, B0 are not bit-equal to those computed now (another device's SVD), W' is moved to the saved
    ones, W' + s·(B0·A0 − B0'·A0'), so the adapter in the file still describes the model that trains."""
    r = layer.r
    A_all, B_all = tensors["lora_A.weight"], tensors["lora_B.weight"]
    A0, B0 = A_all[r:].float(), -B_all[:, r:].float()
    device = layer.initial_A.device
    if not (torch.equal(A0.to(device), layer.initial_A) and torch.equal(B0.to(device), layer.initial_B)):
        weight = layer._float_base_weight()
        shift = layer.scaling * (layer.initial_B @ layer.initial_A - B0.to(device) @ A0.to(device))
        weight.copy_(weight.float() + shift)
        layer.initial_A, layer.initial_B = A0.to(device), B0.to(device)
    return {**tensors, "lora_A.weight": A_all[:r], "lora_B.weight": B_all[:, :r]}


def base_weights_from_files(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The full-precision weights [out, in] of modules ``names``, read from the base's safetensors files (the
    loaded model holds them 4-bit): LoftQ's W. The folder is the one the model was loaded from."""
    from safetensors import safe_open

    folder = Path(getattr(model, "name_or_path", "") or "")
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        raise LorafitError(f"lora.init: loftq reads the full-precision weights of the base from its safetensors "
                           f"files, and found none in {str(folder) or '(unknown folder)'}; give model.base as a "
                           "folder (or hub id) with *.safetensors")
    wanted = {f"{name}.weight": name for name in names}
    found: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                name = wanted.get(key) or wanted.get(key.split(".", 1)[-1])  # with or without the model prefix
                if name is not None:
                    found[name] = handle.get_tensor(key)
    missing = [name for name in names if name not in found]
    if missing:
        raise LorafitError(f"lora.init: loftq: {folder} has no weight for {missing[0]} (and {len(missing) - 1} "
                           "more); the base files must be the model that was loaded")
    return found
