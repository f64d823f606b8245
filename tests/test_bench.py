"""The benchmark's own arithmetic (scripts/bench.py), its correctness gates (scripts/benchlib.py), and those
gates on real runs of a tiny model: they pass lorafit and fail lorafit made wrong on purpose."""

import math
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from .conftest import model_folder, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench  # noqa: E402
import benchlib  # noqa: E402
from benchlib import FLOOR, SPREAD_SLACK, curve_distance, loss_gate  # noqa: E402

BF16, FP32 = "bfloat16", "float32"


def run(name, tokens_per_s, peak, losses, weights="float32", autocast=False):
    return {"row": name, "tokens_per_s": tokens_per_s, "peak_memory_bytes": peak, "losses": losses,
            "step_times": [9.0, 1.0], "flops_per_token": 1e9, "weights": weights, "autocast": autocast}


def summarize(rows, runs, compute="float32"):
    summary = bench.summarize("x", compute, None, rows, runs, {"float32": 1e12, "bfloat16": 4e12})
    return {r["row"]: r for r in summary["rows"]}


def scaled(curve, factor_from_step, factor):
    """The curve with every loss from step ``factor_from_step`` (0-based) on multiplied by ``factor``."""
    return [x * (factor if k >= factor_from_step else 1.0) for k, x in enumerate(curve)]


# ---- the statistic and the band ---------------------------------------------------------------------------

def test_curve_distance_is_the_mean_gap_over_the_mean_loss_of_the_first_steps():
    assert curve_distance([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert curve_distance([1.5, 1.0, 9.0], [1.0, 3.0, 1.0], steps=2) == pytest.approx((0.5 + 2.0) / 4.0)
    # A tiny loss does not blow the statistic up, as one step's relative gap would: 0.03 vs 0.05 is 67%
    # relative at that step, but 0.02 / 4 of the curve.
    assert curve_distance([3.0, 0.05], [3.0, 0.03]) == pytest.approx(0.02 / 3.03)
    assert curve_distance([1.0] * 12, [1.0] * 10 + [5.0, 5.0]) == 0.0  # beyond GATE_STEPS: not judged
    assert math.isnan(curve_distance([], [1.0]))


def test_band_is_the_peer_spread_times_the_slack_and_never_below_the_floor():
    oracle = [2.0] * 10
    peer = [2.0] * 5 + [2.1] * 5  # distance 0.5 / 20 = 2.5e-2 from the oracle
    spread = 0.5 / 20
    gate = loss_gate(oracle, oracle, [peer, oracle], BF16)
    assert gate["spread"] == pytest.approx(spread) and gate["band"] == pytest.approx(SPREAD_SLACK * spread)
    inside = [2.0] * 10
    inside[-1] = 2.0 + 20 * SPREAD_SLACK * spread * 0.99  # one step carries the whole gap
    outside = [2.0] * 10
    outside[-1] = 2.0 + 20 * SPREAD_SLACK * spread * 1.01
    assert loss_gate(inside, oracle, [peer], BF16)["passed"]
    assert not loss_gate(outside, oracle, [peer], BF16)["passed"]
    # Peers that agree with the oracle exactly: the floor is the band (as in fp32, where there is no peer).
    for dtype in (BF16, FP32):
        assert loss_gate(oracle, oracle, [oracle], dtype)["band"] == FLOOR[dtype]
        assert loss_gate(oracle, oracle, [], dtype)["band"] == FLOOR[dtype]
        assert loss_gate(scaled(oracle, 0, 1 + 0.99 * FLOOR[dtype]), oracle, [], dtype)["passed"]
        assert not loss_gate(scaled(oracle, 0, 1 + 1.01 * FLOOR[dtype]), oracle, [], dtype)["passed"]


BAD = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("value", BAD, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("step", [0, 4, 11], ids=["first", "middle", "beyond-the-gated-steps"])
@pytest.mark.parametrize("where", ["lorafit", "oracle", "peer", "other run"])
def test_a_nan_or_inf_in_any_loss_of_any_run_fails_the_gate(value, step, where):
    curves = {name: [2.0 - 0.1 * k for k in range(12)] for name in ("lorafit", "oracle", "peer", "other run")}
    assert loss_gate(curves["lorafit"], curves["oracle"], [curves["peer"]], BF16, [curves["other run"]])["passed"]
    curves[where][step] = value  # max() over [1.0, nan] is 1.0: a gate built on max() alone lets it through
    gate = loss_gate(curves["lorafit"], curves["oracle"], [curves["peer"]], BF16, [curves["other run"]])
    assert not gate["passed"] and not gate["finite"]


def test_a_nan_statistic_fails_the_gate():
    assert not loss_gate([], [1.0], [], FP32)["passed"]  # nothing to compare: distance NaN
    assert not loss_gate([1.0], [1.0], [[]], BF16)["passed"]  # a peer without losses: spread NaN


def table(config, compute, rows, curves):
    runs = {r.name: [run(r.name, 100, 1, curves.get(r.name, [2.0, 1.0]),
                         *(("bfloat16", False) if r.framework == "lorafit" and compute == BF16 and config != "qlora"
                           else ("bfloat16", True) if r.framework == "lorafit" and compute == BF16
                           else (r.weights, r.autocast)))] for r in rows}
    return bench.summarize(config, compute, "4bit" if config == "qlora" else None, rows, runs,
                           {"float32": 1e12, "bfloat16": 4e12})


def test_a_nan_anywhere_fails_every_gate_of_every_config():
    """One NaN in one run (here PEFT's second bf16 setup, not even a gated row) fails every lorafit gate of
    its config through loss_gate's ``others``, and every gate of the other configs through the report."""
    fp32 = table("fp32", FP32, bench.rows_for("fp32", FP32, True, True), {})
    bf16_rows = bench.rows_for("bf16", BF16, True, False)
    bf16 = table("bf16", BF16, bf16_rows, {"peft+autocast": [2.0, math.nan]})
    gates = [r["gate"] for s in (fp32, bf16) for r in s["rows"] if "gate" in r]
    assert len(gates) == 5 and all(g["passed"] for g in gates[:3]) and not any(g["passed"] for g in gates[3:])
    report = {"results": [fp32, bf16]}
    assert not bench.fail_every_gate_unless_finite(report)
    assert not any(g["passed"] for g in gates)
    # A statistic that is NaN in one gate (a lorafit run with no losses) fails every gate too.
    no_losses = table("fp32", FP32, bench.rows_for("fp32", FP32, True, False), {"lorafit+compile": []})
    assert no_losses["rows"][0]["gate"]["passed"] and math.isnan(no_losses["rows"][1]["gate"]["distance"])
    assert not bench.fail_every_gate_unless_finite({"results": [no_losses]})
    assert not no_losses["rows"][0]["gate"]["passed"]
    clean = {"results": [table("fp32", FP32, bench.rows_for("fp32", FP32, True, True), {})]}
    assert bench.fail_every_gate_unless_finite(clean)
    assert all(r["gate"]["passed"] for r in clean["results"][0]["rows"] if "gate" in r)


# ---- the configurations -----------------------------------------------------------------------------------

def test_ratios_mfu_and_medians_over_rounds():
    losses = [1.0, 0.5, 0.25]
    rows = bench.rows_for("fp32", "float32", compile_rows=False, checkpointing=False)
    runs = {"lorafit": [run("lorafit", 300, 2, losses), run("lorafit", 100, 2, losses), run("lorafit", 200, 2, losses)],
            "peft": [run("peft", 100, 4, losses)]}
    t = summarize(rows, runs)
    assert t["lorafit"]["tokens_per_s"] == 200  # median of the rounds
    assert t["lorafit"]["speed_ratio"] == 2.0 and t["lorafit"]["memory_ratio"] == 0.5
    assert t["lorafit"]["mfu"] == pytest.approx(200 * 1e9 / 1e12)
    assert t["lorafit"]["gate"]["passed"] and t["lorafit"]["first_step_s"] == 9.0


def test_fp32_rows_are_gated_against_peft_at_the_fp32_floor():
    rows = bench.rows_for("fp32", "float32", compile_rows=True, checkpointing=True)
    assert [r.name for r in rows] == ["lorafit", "lorafit+compile", "lorafit+checkpointing", "peft"]
    peft = [2.0] * 12
    runs = {"lorafit": [run("lorafit", 1, 1, scaled(peft, 0, 1 + 0.9 * FLOOR[FP32]))],
            "lorafit+compile": [run("lorafit+compile", 1, 1, scaled(peft, 9, 1 + 11 * FLOOR[FP32]))],
            "lorafit+checkpointing": [run("lorafit+checkpointing", 1, 1, scaled(peft, 10, 2.0))],  # not gated
            "peft": [run("peft", 1, 1, peft)]}
    t = summarize(rows, runs)
    assert t["lorafit"]["gate"]["passed"] and t["lorafit"]["gate"]["oracle"] == "peft"
    assert t["lorafit"]["gate"]["band"] == FLOOR[FP32]
    assert not t["lorafit+compile"]["gate"]["passed"]  # one step 11 floors off: 1.1 floors over 10 steps
    assert t["lorafit+checkpointing"]["gate"]["passed"]


def test_bf16_rows_are_gated_against_peft_in_their_own_setup_with_the_other_setup_as_the_band():
    rows = bench.rows_for("bf16", BF16, compile_rows=False, checkpointing=False)
    assert [(r.name, r.weights, r.autocast, r.reference) for r in rows] == [
        ("lorafit", "float32", False, False), ("peft", BF16, False, False), ("peft+autocast", "float32", True, False),
        ("peft fp32 (reference)", "float32", False, True)]
    peft = [2.0, 1.0, 0.05, 0.03]  # losses this small made the old per-step relative gate fail
    autocast = [2.0, 1.01, 0.06, 0.05]
    lorafit = [2.0, 1.005, 0.04, 0.05]  # 67% off at the last step, 0.031 / 3.08 = 1.0e-2 over the curve
    runs = {"lorafit": [run("lorafit", 400, 1, lorafit, BF16)],  # lorafit's plan: bf16 weights, no autocast
            "peft": [run("peft", 200, 4, peft, BF16)],
            "peft+autocast": [run("peft+autocast", 100, 2, autocast, autocast=True)],
            "peft fp32 (reference)": [run("peft fp32 (reference)", 50, 8, [1.9, 0.5, 0.02, 0.01])]}
    t = summarize(rows, runs, BF16)
    lorafit_row = t["lorafit"]
    assert lorafit_row["speed_ratio"] == 2.0 and lorafit_row["memory_ratio"] == 0.25  # vs the faster PEFT setup
    assert lorafit_row["mfu"] == pytest.approx(400 * 1e9 / 4e12)
    gate = lorafit_row["gate"]
    assert gate["oracle"] == "peft" and gate["peers"] == ["peft+autocast"]
    assert gate["spread"] == pytest.approx(0.04 / 3.08) and gate["band"] == pytest.approx(SPREAD_SLACK * 0.04 / 3.08)
    assert gate["distance"] == pytest.approx(0.035 / 3.08) and gate["passed"]


def test_a_bf16_row_that_learns_like_fp32_passes_against_peft_fp32_and_a_wrong_one_fails_both():
    """lorafit's once-rounded bf16 tracks PEFT's fp32 run, not PEFT's bf16 setups: it passes when within the
    band (PEFT's two bf16 setups' spread) of either reference; a curve far from both fails."""
    rows = bench.rows_for("bf16", BF16, compile_rows=False, checkpointing=False)
    peft, autocast, fp32 = [2.0, 1.0, 0.5, 0.3], [2.0, 1.01, 0.51, 0.31], [2.0, 0.8, 0.4, 0.2]
    runs = {"peft": [run("peft", 200, 4, peft, BF16)],
            "peft+autocast": [run("peft+autocast", 100, 2, autocast, autocast=True)],
            "peft fp32 (reference)": [run("peft fp32 (reference)", 50, 8, fp32)]}
    like_fp32 = summarize(rows, {**runs, "lorafit": [run("lorafit", 400, 1, [2.0, 0.802, 0.401, 0.2], BF16)]}, BF16)
    gate = like_fp32["lorafit"]["gate"]
    assert gate["passed"] and gate["oracle"] == "peft fp32 (reference)" and gate["distance"] < gate["band"]
    assert "gate" not in like_fp32["peft fp32 (reference)"]
    wrong = summarize(rows, {**runs, "lorafit": [run("lorafit", 400, 1, [2.0, 1.3, 0.8, 0.6], BF16)]}, BF16)
    assert not wrong["lorafit"]["gate"]["passed"] and wrong["lorafit"]["gate"]["oracle"] == "peft"
    fast_reference = {**runs, "lorafit": [run("lorafit", 400, 1, peft, BF16)],
                      "peft fp32 (reference)": [run("peft fp32 (reference)", 900, 8, fp32)]}
    summary = bench.summarize("x", BF16, None, rows, fast_reference, {"float32": 1e12, "bfloat16": 4e12})
    assert summary["best_peft"] == "peft"  # ratios stay against PEFT's bf16 setups, never the fp32 reference


def test_qlora_in_bf16_has_two_peft_setups_and_gates_lorafit_against_its_own():
    rows = bench.rows_for("qlora", BF16, compile_rows=True, checkpointing=True)
    assert [(r.name, r.weights, r.autocast) for r in rows] == [
        ("lorafit", "float32", False), ("peft", BF16, True), ("peft fp32 4-bit compute", "float32", True)]
    s = table("qlora", BF16, rows, {})
    gate = s["rows"][0]["gate"]
    assert gate["oracle"] == "peft" and gate["peers"] == ["peft fp32 4-bit compute"] and gate["passed"]
    assert [r.name for r in bench.rows_for("qlora", FP32, True, True)] == ["lorafit", "peft"]


def test_qlora_1b_compares_memory_with_peft_qlora_and_with_lorafit_over_the_unquantized_base():
    rows = bench.rows_for("qlora-1b", BF16, compile_rows=True, checkpointing=True)
    assert [(r.name, r.weights, r.autocast, r.baseline, r.unquantized, r.reference) for r in rows] == [
        ("lorafit", "float32", False, False, False, False),
        ("lorafit, 16/32-bit base", "float32", False, True, True, False),
        ("peft", BF16, True, False, False, False), ("peft fp32 (reference)", "float32", False, False, False, True)]
    assert [r.name for r in bench.rows_for("qlora-1b", FP32, True, True)] == ["lorafit", "lorafit, 16/32-bit base",
                                                                              "peft"]
    assert bench.CONFIGS["qlora-1b"] == "4bit" and bench.SHAPES["qlora-1b"] == (2, 512, 3)
    assert bench.compute_dtypes("qlora-1b", native_bf16=False) == [FP32]
    losses = [10.9, 10.8, 10.7]
    runs = {"lorafit": [run("lorafit", 30, 2.0, losses, BF16, True)],
            "lorafit, 16/32-bit base": [run("lorafit, 16/32-bit base", 40, 5.0, losses, BF16)],
            "peft": [run("peft", 20, 4.0, losses, BF16, True)],
            "peft fp32 (reference)": [run("peft fp32 (reference)", 8, 7.0, losses)]}
    t = summarize(rows, runs, BF16)
    assert t["lorafit"]["memory_vs_baseline"] == 0.4 and t["lorafit"]["memory_ratio"] == 0.5
    assert t["lorafit"]["speed_ratio"] == 1.5  # against PEFT in lorafit's setup, never the fp32 run
    assert t["lorafit"]["gate"]["oracle"] == "peft" and t["lorafit"]["gate"]["passed"]
    assert "gate" not in t["lorafit, 16/32-bit base"]  # the memory reference: other math, not gated


def test_without_a_second_peft_setup_the_fp32_run_stands_in_for_the_band():
    """qlora-1b's measured curves (2-core Intel Xeon with AMX, 2026-12-06): lorafit sits between PEFT in its setup
    and PEFT's fp32 run, and passes within 2x their distance (band 2.4e-3, lorafit 8.7e-4); with its LoRA update
    scaled 2x it is at 9.3e-2 and fails. Without the fp32 run the band would be the floor (2.4e-4) alone."""
    rows = bench.rows_for("qlora-1b", BF16, compile_rows=False, checkpointing=False)
    peft, fp32 = [11.3393, 10.2826, 8.3635], [11.3413, 10.2551, 8.3574]
    runs = {"lorafit": [run("lorafit", 30, 2.0, [11.3397, 10.2580, 8.3623], BF16, True)],
            "lorafit, 16/32-bit base": [run("lorafit, 16/32-bit base", 40, 5.0, [11.3589, 10.2632, 8.2939], BF16)],
            "peft": [run("peft", 20, 4.0, peft, BF16, True)],
            "peft fp32 (reference)": [run("peft fp32 (reference)", 8, 7.0, fp32)]}
    gate = summarize(rows, runs, BF16)["lorafit"]["gate"]
    assert gate["peers"] == ["peft fp32 (reference)"] and gate["passed"]
    assert gate["band"] == pytest.approx(SPREAD_SLACK * curve_distance(fp32, peft))
    runs["lorafit"] = [run("lorafit", 30, 2.0, [11.3397, 9.2875, 6.5633], BF16, True)]  # LoRA update scaled 2x
    assert not summarize(rows, runs, BF16)["lorafit"]["gate"]["passed"]
    del runs["peft fp32 (reference)"]
    rows = [r for r in rows if not r.reference]
    assert summarize(rows, runs, BF16)["lorafit"]["gate"]["band"] == FLOOR[BF16]


def test_a_lorafit_row_without_peft_in_its_setup_fails():
    rows = bench.rows_for("bf16", BF16, compile_rows=False, checkpointing=False)
    runs = {r.name: [run(r.name, 1, 1, [2.0, 1.0], BF16, False)] for r in rows}
    runs["lorafit"] = [run("lorafit", 1, 1, [2.0, 1.0], "float32", True)]  # a plan no PEFT row ran
    gate = summarize(rows, runs, BF16)["lorafit"]["gate"]
    assert gate["oracle"] is None and not gate["passed"]


def test_dora_config_reports_the_step_against_lorafit_lora_and_gates_against_peft_dora():
    rows = bench.rows_for("dora", "float32", compile_rows=True, checkpointing=False)
    assert [(r.name, r.variant) for r in rows] == [
        ("lorafit dora", "dora"), ("lorafit lora (baseline)", "lora"), ("peft dora", "dora")]
    runs = {"lorafit dora": [run("lorafit dora", 120, 1, [1.0, 0.9])],
            "lorafit lora (baseline)": [run("lorafit lora (baseline)", 150, 1, [1.0, 0.5])],
            "peft dora": [run("peft dora", 60, 2, [1.0, 0.9 * (1 + FLOOR[FP32])])]}
    t = summarize(rows, runs)
    assert t["lorafit dora"]["step_vs_lorafit_lora"] == pytest.approx(1.25)
    assert t["lorafit dora"]["speed_ratio"] == 2.0 and t["lorafit dora"]["gate"]["passed"]
    assert "gate" not in t["lorafit lora (baseline)"]  # other math: not gated against PEFT's DoRA


def test_dora_config_in_bf16_adds_a_second_peft_dora_setup_for_the_band():
    assert bench.compute_dtypes("dora", native_bf16=True) == [BF16]
    assert bench.compute_dtypes("dora", native_bf16=False) == [FP32]
    rows = bench.rows_for("dora", BF16, compile_rows=False, checkpointing=False)
    assert [(r.name, r.weights, r.autocast) for r in rows] == [
        ("lorafit dora", "float32", False), ("lorafit lora (baseline)", "float32", False),
        ("peft dora", BF16, False), ("peft dora+autocast", "float32", True)]
    runs = {"lorafit dora": [run("lorafit dora", 300, 1, [2.0, 1.802, 1.603, 1.404], BF16)],
            "lorafit lora (baseline)": [run("lorafit lora (baseline)", 360, 1, [2.0, 1.7, 1.5, 1.3], BF16)],
            "peft dora": [run("peft dora", 150, 2, [2.0, 1.805, 1.61, 1.41], BF16)],
            "peft dora+autocast": [run("peft dora+autocast", 100, 1, [2.0, 1.8, 1.6, 1.4], autocast=True)]}
    t = summarize(rows, runs, BF16)
    assert t["lorafit dora"]["step_vs_lorafit_lora"] == pytest.approx(1.2)
    assert t["lorafit dora"]["speed_ratio"] == 2.0  # against the faster PEFT DoRA setup
    gate = t["lorafit dora"]["gate"]
    assert gate["oracle"] == "peft dora" and gate["peers"] == ["peft dora+autocast"] and gate["passed"]


# ---- the gate on real runs of a tiny model ----------------------------------------------------------------
# A 2-layer Llama, 64 wide (multiples of the 4-bit block), with small initial weights (std 0.02, as real
# checkpoints are initialised) so the adapters' updates matter within 10 steps: 10 steps of the bench's own
# loop (bench.run_one, 4 x 128 tokens of the dates data, AdamW at 1e-3) take ~0.3 s each on one thread.
# Measured on a 2-core AMD EPYC (family 25 model 17, avx512_bf16), 2026-12-06, curve distances over 10 steps:
#   correct lorafit vs PEFT in its setup   LoRA 2.8e-5, with dropout 0.5 2.3e-5, DoRA 1.7e-5
#   PEFT's two setups (the spread)         2.7e-5 .. 3.8e-5
#   LoRA scaled 2x                         1.1e-2
#   dropout 0.5 without its 1/(1-p)        1.3e-2
#   DoRA magnitude not trained             9.9e-4
# The band is the bf16 floor here (2^-12 = 2.4e-4 > 2 x spread): ~9x above the correct runs and 4x .. 50x
# below the wrong ones, so another CPU's (or a GPU's) roundings, which move the correct distances by their
# own scale, leave both verdicts standing. The asserts are the gate's own verdicts, plus a check that each
# broken run changed the curve (a monkeypatch that stopped reaching lorafit shows, rather than passing).

LR_TINY, SEQ_TINY = 1e-3, 128


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench") / "tiny"
    model_folder(tiny_model(hidden_size=64, intermediate_size=128, initializer_range=0.02), folder)
    return folder


@pytest.fixture
def bench_loop(tiny_base, tmp_path, monkeypatch):
    """run(row_name, config) -> the 10 losses of bench.run_one for that row on the tiny model, one thread
    (tiny matmuls on a shared 2-core machine: OpenMP threads waiting on each other cost more than they gain)."""
    monkeypatch.setattr(bench, "SEQ", SEQ_TINY)
    monkeypatch.setattr(bench, "LR", LR_TINY)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    init = tmp_path / "init.pt"
    bench.make_initial_weights(init, str(tiny_base))

    def losses(name: str, config: str = "bf16") -> list[float]:
        row = next(r for r in bench.rows_for(config, BF16, False, False) if r.name == name)
        return bench.run_one(asdict(row), None, benchlib.GATE_STEPS, str(init), str(tiny_base))["losses"]

    yield losses
    torch.set_num_threads(threads)


def judge(bench_loop, peft_rows: tuple[str, str], config: str = "bf16"):
    """The bf16 gate as the bench applies it: lorafit against PEFT in lorafit's setup (bf16 weights, no
    autocast), the band from PEFT's other setup (fp32 weights under bf16 autocast)."""
    oracle, peer = (bench_loop(name, config) for name in peft_rows)
    assert oracle[-1] < 0.97 * oracle[0]  # the runs learn: the gate compares real trajectories
    return oracle, peer, lambda losses: loss_gate(losses, oracle, [peer], BF16)


def test_gate_on_real_runs_passes_lorafit_and_fails_a_lora_update_scaled_2x(bench_loop, monkeypatch):
    oracle, _, gate = judge(bench_loop, ("peft", "peft+autocast"))
    good = bench_loop("lorafit")
    assert gate(good)["passed"], gate(good)
    import lorafit.adapters.lora

    scaling = lorafit.adapters.lora.lora_scaling
    monkeypatch.setattr(lorafit.adapters.lora, "lora_scaling", lambda *args, **kwargs: 2 * scaling(*args, **kwargs))
    broken = bench_loop("lorafit")
    assert broken != good
    assert not gate(broken)["passed"], gate(broken)


def test_gate_on_real_runs_fails_a_dropout_that_is_not_rescaled(bench_loop, monkeypatch):
    """Inverted dropout scales what it keeps by 1/(1-p), so the update is unbiased; without it the update is
    (1-p) times too small in training. p = 0.5 here: half the update (p = 0.1 measured 2e-3, also caught)."""
    import lorafit.adapters.lora

    monkeypatch.setattr(bench, "DROPOUT", 0.5)
    oracle, _, gate = judge(bench_loop, ("peft", "peft+autocast"))
    good = bench_loop("lorafit")
    assert gate(good)["passed"], gate(good)

    class NotRescaled(nn.Dropout):  # the same masks as nn.Dropout (same generator calls), without 1/(1-p)
        def forward(self, x):
            return F.dropout(x, self.p, self.training) * (1 - self.p) if self.training else x

    build = lorafit.adapters.lora.AdapterLayer.__init__

    def adapter_init(self, *args, **kwargs):
        build(self, *args, **kwargs)
        if isinstance(self.lora_dropout, nn.Dropout):
            self.lora_dropout = NotRescaled(self.lora_dropout.p)

    monkeypatch.setattr(lorafit.adapters.lora.AdapterLayer, "__init__", adapter_init)
    broken = bench_loop("lorafit")
    assert broken != good
    assert not gate(broken)["passed"], gate(broken)


def test_gate_on_real_runs_fails_a_dora_magnitude_that_is_not_trained(bench_loop, monkeypatch):
    import lorafit.inject

    oracle, _, gate = judge(bench_loop, ("peft dora", "peft dora+autocast"), "dora")
    good = bench_loop("lorafit dora", "dora")
    assert gate(good)["passed"], gate(good)
    trainable = lorafit.inject.set_trainable

    def magnitude_frozen(model):  # A and B train; the magnitude keeps its initial ||W||_row
        trainable(model)
        for name, param in model.named_parameters():
            if name.endswith("lora_magnitude_vector"):
                param.requires_grad_(False)

    monkeypatch.setattr(lorafit.inject, "set_trainable", magnitude_frozen)
    broken = bench_loop("lorafit dora", "dora")
    assert broken != good
    assert not gate(broken)["passed"], gate(broken)


# ---- the dpo config: lorafit's DPO against TRL's DPOTrainer (scripts/bench_dpo.py) ---------------------------

def test_dpo_config_runs_fp32_everywhere_and_bf16_where_native_and_gates_lorafit_against_trl():
    assert bench.compute_dtypes("dpo", native_bf16=False) == [FP32]
    assert bench.compute_dtypes("dpo", native_bf16=True) == [FP32, BF16]
    rows = bench.rows_for("dpo", FP32, compile_rows=True, checkpointing=True)
    assert [(r.name, r.framework, r.checkpointing) for r in rows] == [
        ("lorafit", "lorafit", False), ("lorafit+checkpointing", "lorafit", True), ("trl", "trl", False),
        ("trl+checkpointing", "trl", True)]
    runs = {"lorafit": [run("lorafit", 300, 3.0, [0.6931, 0.60, 0.50])],
            "lorafit+checkpointing": [run("lorafit+checkpointing", 250, 2.0, [0.6931, 0.60, 0.50])],
            "trl": [run("trl", 150, 6.0, [0.6931, 0.60, 0.50])],
            "trl+checkpointing": [run("trl+checkpointing", 100, 4.0, [0.6931, 0.60, 0.50])]}
    t = summarize(rows, runs)
    assert t["lorafit"]["speed_ratio"] == 2.0 and t["lorafit"]["memory_ratio"] == 0.5  # against the fastest TRL
    gate = t["lorafit"]["gate"]
    assert gate["oracle"] == "trl" and gate["peers"] == ["trl+checkpointing"] and gate["passed"]
    bf16 = bench.rows_for("dpo", BF16, compile_rows=True, checkpointing=True)
    assert t["lorafit+checkpointing"]["gate"]["passed"]
    assert [(r.name, r.weights, r.autocast, r.reference) for r in bf16] == [
        ("lorafit", "float32", False, False), ("lorafit+checkpointing", "float32", False, False),
        ("trl", BF16, False, False), ("trl+checkpointing", BF16, False, False),
        ("trl+autocast", "float32", True, False), ("trl fp32 (reference)", "float32", False, True)]


@pytest.fixture
def dpo_loop(tiny_base, tmp_path):
    """run(row_name) -> the losses of bench_dpo.run_dpo for that fp32 row on the tiny model, one thread."""
    pytest.importorskip("trl")
    import bench_dpo

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    init = tmp_path / "init.pt"
    bench.make_initial_weights(init, str(tiny_base))

    def losses(name: str) -> list[float]:
        row = next(r for r in bench.rows_for("dpo", FP32, False, False) if r.name == name)
        out = bench_dpo.run_dpo(row, benchlib.GATE_STEPS, str(init), str(tiny_base), 4, 8, 0.0, 3e-3, 1)
        assert out["tokens_per_s"] > 0 and out["peak_memory_bytes"] > 0
        return out["losses"]

    yield losses
    torch.set_num_threads(threads)


def test_dpo_gate_on_real_runs_passes_lorafit_against_trl_and_fails_a_wrong_beta(dpo_loop, monkeypatch):
    """lorafit's DPO and TRL's on the same tiny model, pairs and initial adapter (r 4, AdamW lr 3e-3, 10 steps of 8
    pairs): the gate passes lorafit; with β doubled in lorafit's loss only, it fails. The first loss is log 2 in
    both (policy = reference at the start). Measured on a 2-core Intel Xeon with AMX (family 6 model 207),
    2026-12-06: distance 5.4e-7 correct, 3.7e-2 with 2β, band 1.2e-4 (the fp32 floor; TRL's two rows agree
    exactly): 225x margin on each side. At lr 1e-2 the tiny run turns chaotic (Adam's sign-like first steps
    amplify last-bit differences: 4.5e-5), hence the small lr."""
    oracle, peer = dpo_loop("trl"), dpo_loop("trl+checkpointing")
    good = dpo_loop("lorafit")
    assert good[0] == pytest.approx(math.log(2), abs=1e-6) and oracle[-1] < oracle[0] - 0.01  # it learns
    assert loss_gate(good, oracle, [peer], FP32)["passed"], (good, oracle)
    import lorafit.objectives

    dpo_loss = lorafit.objectives.dpo_loss
    monkeypatch.setattr(lorafit.objectives, "dpo_loss", lambda *a: dpo_loss(*a[:4], 2 * a[4]))
    broken = dpo_loop("lorafit")
    assert broken != good
    assert not loss_gate(broken, oracle, [peer], FP32)["passed"], (broken, oracle)
