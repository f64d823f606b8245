"""Tolerances by rule (tests/README.md): two computations of one value through different kernels are compared
at a tolerance derived from the dtype's eps, the values' magnitude and the reduction length, never at a few
ulp of what one machine gave.

The derivation. A sum of n terms in a floating-point dtype with unit roundoff u = eps/2, accumulated in any
order (sequential, blocked, pairwise, split over threads or SIMD lanes), rounds once per addition, each time
by at most u times the partial sum. Those errors behave like independent zero-mean variables (Higham & Mary
2019, "A new approach to probabilistic rounding error analysis"), so they grow with sqrt(n), not with the
worst-case n: with partial sums no larger than M, one sum's error has a standard deviation of at most
u·M·sqrt(n/3), and the difference of two kernels' sums at most sqrt(2)·u·M·sqrt(n/3) = 0.41·eps·sqrt(n)·M.
Through a network the layers' errors add in quadrature (they are independent): sqrt of the sum of the
layers' reduction lengths, ``reduction_through``. Hence

    atol = C · eps(dtype) · sqrt(reduction) · magnitude,   C = 2

which is about 5 standard deviations of that worst case (every partial sum as large as the largest value);
blocked and SIMD sums and the smaller elements of a tensor sit far inside it (tests/README.md has the margins
measured). It is floored at torch.testing's own defaults for the dtype (rtol 1.3e-6 / atol 1e-5 for fp32,
rtol 1.6e-2 for bf16), what a test gets when it says nothing.

``magnitude`` is max |expected| unless ``scale`` is given: pass the scale of the terms when the result is a
cancellation (a small difference of large sums), whose error follows the terms, not the result.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

C = 2.0

# torch.testing.assert_close's defaults (rtol, atol) per dtype: the floor of every tolerance here.
FLOOR = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
}


def tolerance(expected: Any, *, reduction: int, dtype: torch.dtype, scale: float | None = None) -> tuple[float, float]:
    """(rtol, atol) for comparing a ``dtype`` computation of ``expected`` that sums ``reduction`` terms."""
    if reduction < 1:
        raise ValueError(f"reduction is a count of summed terms, at least 1 (got {reduction})")
    rtol_floor, atol_floor = FLOOR[dtype]
    if scale is None:
        values = torch.as_tensor(expected)
        scale = float(values.abs().max()) if values.numel() else 0.0
    return rtol_floor, max(atol_floor, C * torch.finfo(dtype).eps * math.sqrt(reduction) * scale)


def reduction_through(model: torch.nn.Module, tokens: int = 1) -> int:
    """The reduction length for an output (or a gradient) of a whole model: the quadrature sum of its layers'
    reductions, counted as in + out of every weight matrix (forward sums over in, backward over out; embeddings
    and parallel projections overcount a little, which the square root forgives) plus the ``tokens`` that
    attention, a loss or a weight gradient sums over."""
    return sum(p.shape[-1] + p.shape[-2] for p in model.parameters() if p.dim() >= 2) + tokens


def assert_close_by_rule(actual: Any, expected: Any, *, reduction: int, dtype: torch.dtype | None = None,
                         scale: float | None = None, msg: str | None = None) -> None:
    """torch.testing.assert_close at ``tolerance(...)``. ``dtype`` is the precision the computation ran in
    (default: the coarser of the two inputs' dtypes; pass it when a result was upcast for the comparison).
    Both sides are compared in fp64, so an fp32 result can be held against an fp64 formula directly."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    if dtype is None:
        dtype = max(actual.dtype, expected.dtype, key=lambda d: torch.finfo(d).eps)
    rtol, atol = tolerance(expected, reduction=reduction, dtype=dtype, scale=scale)
    actual, expected = actual.detach().double(), expected.detach().to(actual.device).double()
    rule = f"rule: {dtype} eps, reduction {reduction} -> rtol {rtol:.3g}, atol {atol:.3g}"
    _log(actual, expected, rtol, atol, msg)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol,
                               msg=lambda text: f"{msg + ': ' if msg else ''}{text}\n({rule})")


def _log(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, msg: str | None) -> None:
    """With LORAFIT_TOLERANCE_LOG=path, append each comparison's margin: max |a - e| / (atol + rtol·|e|), the
    share of the allowed tolerance used (1 = at the limit). How tests/README.md's margins were measured."""
    path = os.environ.get("LORAFIT_TOLERANCE_LOG")
    if not path or actual.shape != expected.shape:
        return
    used = float(((actual - expected).abs() / (atol + rtol * expected.abs())).max()) if actual.numel() else 0.0
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").removesuffix(" (call)")
    with open(path, "a") as log:
        log.write(f"{used:.4f}\t{test}\t{msg or ''}\n")
