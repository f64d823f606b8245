"""The benchmark's own arithmetic and gates (scripts/bench.py), and the bf16 gate on real runs of a tiny model."""

import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from .conftest import model_folder, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench  # noqa: E402


def run(name, tokens_per_s, peak, losses, weights="float32", autocast=False):
    return {"row": name, "tokens_per_s": tokens_per_s, "peak_memory_bytes": peak, "losses": losses,
            "step_times": [9.0, 1.0], "flops_per_token": 1e9, "weights": weights, "autocast": autocast}


def summarize(rows, runs, compute="float32"):
    summary = bench.summarize("x", compute, None, rows, runs, {"float32": 1e12, "bfloat16": 4e12})
    return {r["row"]: r for r in summary["rows"]}


def test_ratios_mfu_and_medians_over_rounds():
    losses = [1.0, 0.5, 0.25]
    rows = bench.rows_for("fp32", "float32", compile_rows=False, checkpointing=False)
    runs = {"lorafit": [run("lorafit", 300, 2, losses), run("lorafit", 100, 2, losses), run("lorafit", 200, 2, losses)],
            "peft": [run("peft", 100, 4, losses)]}
    table = summarize(rows, runs)
    assert table["lorafit"]["tokens_per_s"] == 200  # median of the rounds
    assert table["lorafit"]["speed_ratio"] == 2.0 and table["lorafit"]["memory_ratio"] == 0.5
    assert table["lorafit"]["mfu"] == pytest.approx(200 * 1e9 / 1e12)
    assert table["lorafit"]["gate"]["passed"] and table["lorafit"]["first_step_s"] == 9.0


def test_fp32_gate_fails_when_a_loss_is_off_by_more_than_one_percent():
    rows = bench.rows_for("fp32", "float32", compile_rows=True, checkpointing=True)
    peft = [1.0] * 12
    close = [1.0] * 9 + [1.0099] + [1.0] * 2
    off = [1.0] * 9 + [1.0101] + [1.0] * 2
    late = [1.0] * 10 + [2.0, 2.0]  # beyond the first 10 steps: not gated
    runs = {"lorafit": [run("lorafit", 1, 1, close)], "lorafit+compile": [run("lorafit+compile", 1, 1, off)],
            "lorafit+checkpointing": [run("lorafit+checkpointing", 1, 1, late)], "peft": [run("peft", 1, 1, peft)]}
    table = summarize(rows, runs)
    assert table["lorafit"]["gate"]["passed"]
    assert not table["lorafit+compile"]["gate"]["passed"]
    assert table["lorafit+checkpointing"]["gate"]["passed"]


def test_bf16_rows_compare_with_the_fastest_peft_setup_and_gate_against_the_fp32_reference():
    rows = bench.rows_for("bf16", "bfloat16", compile_rows=False, checkpointing=False)
    assert [r.name for r in rows] == ["lorafit", "peft", "peft+autocast", "fp32 reference (peft)"]
    reference = [2.0, 1.8, 1.6, 1.4]
    runs = {"lorafit": [run("lorafit", 400, 1, [2.0, 1.81, 1.62, 1.41], "bfloat16")],
            "peft": [run("peft", 200, 4, [2.0, 1.81, 1.615, 1.42], "bfloat16")],
            "peft+autocast": [run("peft+autocast", 100, 2, [2.001, 1.805, 1.61, 1.405], autocast=True)],
            "fp32 reference (peft)": [run("fp32 reference (peft)", 1000, 1, reference)]}
    table = summarize(rows, runs, "bfloat16")
    lorafit = table["lorafit"]
    assert lorafit["speed_ratio"] == 2.0 and lorafit["memory_ratio"] == 0.25  # vs "peft", the faster PEFT row
    assert lorafit["mfu"] == pytest.approx(400 * 1e9 / 4e12)
    assert table["fp32 reference (peft)"]["mfu"] == pytest.approx(1000 * 1e9 / 1e12)  # its own dtype's peak
    gate = lorafit["gate"]
    assert gate["passed"] and gate["step1_gap"] == 0.0
    assert gate["peft_envelope"] == pytest.approx([0.0005, 0.01 / 1.8, 0.015 / 1.6, 0.02 / 1.4], rel=1e-9)


def test_bf16_gate_fails_on_excess_drift_or_a_bad_first_step():
    reference = [2.0] * 10
    peft = [[2.0] + [2.002] * 9]  # PEFT drifts 1e-3 from the reference
    inside = [2.0] + [2.002 + 2.0 * 2**-8 * 0.99] * 9
    assert bench.bf16_gate(inside, reference, peft)["passed"]
    drifting = [2.0] * 9 + [2.002 + 2.0 * 2**-8 * 1.01]
    gate = bench.bf16_gate(drifting, reference, peft)
    assert not gate["passed"] and gate["worst_step"] == 10
    first_off = [2.0 * (1 + 2**-8 * 1.01)] + [2.0] * 9
    assert not bench.bf16_gate(first_off, reference, peft)["passed"]


@pytest.fixture
def tiny_base(tmp_path):
    """A tiny Llama whose layers are 64 wide (multiples of the 4-bit block), able to fit the dates data."""
    folder = tmp_path / "tiny"
    model_folder(tiny_model(hidden_size=64, intermediate_size=128, initializer_range=0.1), folder)
    return str(folder)


def bench_losses(tmp_path, base, row, steps=10) -> list[float]:
    init = tmp_path / "init.pt"
    if not init.exists():
        bench.make_initial_weights(init, base)
    return bench.run_one(asdict(row), None, steps, str(init), base)["losses"]


def test_bf16_gate_on_real_runs_passes_for_lorafit_and_catches_a_wrong_update(tmp_path, tiny_base, monkeypatch):
    """lorafit in bf16 (bf16 base, fp32 LoRA weights, no autocast) against PEFT's two bf16 setups and PEFT in
    fp32, 10 steps of the bench's own loop on a tiny model (bf16 is emulated on CPUs without it: slow for a
    real model, fine for this one). A lorafit whose LoRA update is scaled twice as much must fail the gate."""
    monkeypatch.setattr(bench, "SEQ", 128)
    monkeypatch.setattr(bench, "LR", 1e-3)  # larger steps than the bench, so the tiny model learns in 10
    rows = {r.name: r for r in bench.rows_for("bf16", "bfloat16", compile_rows=False, checkpointing=False)}
    reference = bench_losses(tmp_path, tiny_base, rows["fp32 reference (peft)"])
    peft = [bench_losses(tmp_path, tiny_base, rows[name]) for name in ("peft", "peft+autocast")]
    lorafit = bench_losses(tmp_path, tiny_base, rows["lorafit"])
    gate = bench.bf16_gate(lorafit, reference, peft)
    assert gate["passed"], gate
    assert reference[-1] < 0.9 * reference[0]  # the runs learn, so the gate compares real trajectories
    monkeypatch.setattr(bench, "ALPHA", 2 * bench.ALPHA)
    broken = bench_losses(tmp_path, tiny_base, rows["lorafit"])
    assert not bench.bf16_gate(broken, reference, peft)["passed"]


def test_dora_config_reports_the_step_against_lorafit_lora_and_gates_against_peft_dora():
    rows = bench.rows_for("dora", "float32", compile_rows=True, checkpointing=False)
    assert [(r.name, r.variant) for r in rows] == [
        ("lorafit dora", "dora"), ("lorafit lora (baseline)", "lora"), ("peft dora", "dora")]
    runs = {"lorafit dora": [run("lorafit dora", 120, 1, [1.0, 0.9])],
            "lorafit lora (baseline)": [run("lorafit lora (baseline)", 150, 1, [1.0, 0.5])],
            "peft dora": [run("peft dora", 60, 2, [1.0, 0.905])]}
    table = summarize(rows, runs)
    assert table["lorafit dora"]["step_vs_lorafit_lora"] == pytest.approx(1.25)
    assert table["lorafit dora"]["speed_ratio"] == 2.0 and table["lorafit dora"]["gate"]["passed"]
    assert "gate" not in table["lorafit lora (baseline)"]  # other math: not gated against PEFT's DoRA


def test_dora_config_in_bf16_adds_an_fp32_reference_and_gates_on_drift():
    assert bench.compute_dtype("dora", native_bf16=True) == "bfloat16"
    assert bench.compute_dtype("dora", native_bf16=False) == "float32"
    rows = bench.rows_for("dora", "bfloat16", compile_rows=False, checkpointing=False)
    assert [(r.name, r.compute, r.weights) for r in rows] == [
        ("lorafit dora", "bfloat16", "float32"), ("lorafit lora (baseline)", "bfloat16", "float32"),
        ("peft dora", "bfloat16", "bfloat16"), ("fp32 reference (peft dora)", "float32", "float32")]
    reference = [2.0, 1.8, 1.6, 1.4]
    runs = {"lorafit dora": [run("lorafit dora", 300, 1, [2.0, 1.802, 1.603, 1.404], "bfloat16")],
            "lorafit lora (baseline)": [run("lorafit lora (baseline)", 360, 1, [2.0, 1.7, 1.5, 1.3], "bfloat16")],
            "peft dora": [run("peft dora", 150, 2, [2.0, 1.805, 1.61, 1.41], "bfloat16")],
            "fp32 reference (peft dora)": [run("fp32 reference (peft dora)", 100, 1, reference)]}
    table = summarize(rows, runs, "bfloat16")
    assert table["lorafit dora"]["step_vs_lorafit_lora"] == pytest.approx(1.2)
    assert table["lorafit dora"]["speed_ratio"] == 2.0  # against PEFT's DoRA, not the fp32 reference
    assert table["lorafit dora"]["gate"]["kind"] == "bf16" and table["lorafit dora"]["gate"]["passed"]
