"""Shared by the benchmark scripts: peak memory of a training loop on CPU, and the correctness gates."""

from __future__ import annotations

import math
import os
import threading


class RssSampler:
    """Samples this process's resident set size every 5 ms in a thread; stop() returns the maximum."""

    def __init__(self) -> None:
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, _rss())
            self._done.wait(0.005)

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---- correctness gates -------------------------------------------------------------------------------------
# Pure functions of loss curves (lists of per-step losses, one per run), so tests can feed them real runs.

GATE_STEPS = 10  # the first 10 steps of every run are judged (the bench's default run length)
# FLOOR: the band never goes below this. bf16: one bf16 rounding of each position's loss (unit roundoff 2^-8),
# averaged over the >= 256 positions a step trains (independent roundings shrink by sqrt(256) = 16): 2^-12,
# 2.4e-4. Two correct bf16 runs that agree closer than that cannot be told apart, so a band below it would
# judge noise. fp32 has a single PEFT setup, so this is its whole band: one rounding (2^-24) is far below
# what 10 AdamW steps make of two correct kernels' rounding differences (fused head + cross-entropy vs
# transformers' loss, in-place addmm vs separate GEMMs; each op's rounding grows with eps * sqrt(reduction
# length), e.g. 2^-24 * sqrt(49152 vocab) = 1.3e-5, and Adam's normalised steps amplify it where gradients
# are near zero). SmolLM2 measured per-step gaps up to 9.2e-5 (2026-11-25) and a curve distance of 1.2e-5
# (2026-12-06); 2^-13 (1.2e-4) bounds both, and stays ~8x below the weakest wrong math the tests catch (an
# untrained DoRA magnitude: 1e-3 on the tiny model).
FLOOR = {"float32": 2.0**-13, "bfloat16": 2.0**-12}
# The band is SPREAD_SLACK x the distance between PEFT's own setups: that distance is one sample of how far
# correct runs drift apart, and lorafit differs from PEFT by other roundings than the setups do (its LoRA
# update computed in bf16, a fused loss), measured at 0.5x .. 1.4x the setups' distance on the tiny model and
# 1.0x (lorafit) / 1.3x (lorafit+compile) on SmolLM2 in bf16.
SPREAD_SLACK = 2.0


def curve_distance(losses: list[float], oracle: list[float], steps: int = GATE_STEPS) -> float:
    """Relative L1 distance of two loss curves over their first ``steps`` steps: sum|a - b| / sum|b|.

    The mean gap over several steps, relative to the mean loss: one step's relative gap divides by that
    step's loss, which is tiny once a run has learnt its data (0.03), so two correct bf16 runs reach 70% there
    while their curves are indistinguishable. NaN when a curve is empty or anything is non-finite."""
    n = min(len(losses), len(oracle), steps)
    if n == 0:
        return math.nan
    gap = sum(abs(a - b) for a, b in zip(losses[:n], oracle[:n]))
    scale = sum(abs(b) for b in oracle[:n])
    if not math.isfinite(gap) or not math.isfinite(scale):
        return math.nan
    return gap / scale if scale > 0 else (0.0 if gap == 0 else math.inf)


def finite(*curves: list[float]) -> bool:
    return all(math.isfinite(x) for curve in curves for x in curve)


def loss_gate(losses: list[float], oracle: list[float], peers: list[list[float]], dtype: str,
              others: list[list[float]] = (), steps: int = GATE_STEPS) -> dict:
    """Does ``losses`` (a lorafit run) do PEFT's math? Judged against ``oracle``: PEFT in the same setup
    (same base dtype, autocast or not, same variant, same initial weights, data and seed).

    Statistic: d = curve_distance(losses, oracle), the mean |gap| over the first ``steps`` steps relative to
    the mean loss. Band: what two correct runs of the same training differ by here, measured, not assumed:
    the largest curve_distance between ``peers`` (PEFT's other setups for this dtype, e.g. fp32 weights under
    bf16 autocast beside bf16 weights) and the oracle, times SPREAD_SLACK (that distance is one sample), and
    never below FLOOR[dtype] (one rounding of the loss; the whole band where there is no peer, as in fp32).
    Passes when d <= band and every loss of every run given (``others``: the rest of the configuration's
    runs) and every statistic is finite: a NaN or inf anywhere fails the gate (``max`` or ``<=`` alone
    would let a NaN through).

    Why not the fp32 run as the bf16 reference: a bf16 base is a different model from the fp32 one (its
    weights are rounded), so every bf16 run drifts from fp32 training, and at losses near 0.03 by 70%
    relative per step; lorafit vs PEFT over the same bf16 weights differs by the arithmetic alone."""
    distance = curve_distance(losses, oracle, steps)
    spreads = [curve_distance(peer, oracle, steps) for peer in peers]
    spread = 0.0 if not spreads else max(spreads) if all(math.isfinite(s) for s in spreads) else math.nan
    band = max(FLOOR[dtype], SPREAD_SLACK * spread) if math.isfinite(spread) else math.nan
    ok = finite(losses, oracle, *peers, *others) and all(math.isfinite(x) for x in (distance, spread, band))
    return {"dtype": dtype, "steps": min(len(losses), len(oracle), steps), "distance": distance,
            "peer_spreads": spreads, "spread": spread, "floor": FLOOR[dtype], "band": band,
            "passed": ok and distance <= band, "finite": ok}
