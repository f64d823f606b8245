"""The benchmark's own arithmetic: ratios, MFU and the loss-agreement gate (scripts/bench.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench  # noqa: E402


def run(framework, tokens_per_s, peak, losses):
    return {"framework": framework, "tokens_per_s": tokens_per_s, "peak_memory_bytes": peak, "losses": losses,
            "step_times": [9.0, 1.0], "flops_per_token": 1e9}


def test_ratios_mfu_and_medians_over_rounds():
    losses = [1.0, 0.5, 0.25]
    runs = {"lorafit": [run("lorafit", 300, 2, losses), run("lorafit", 100, 2, losses),
                        run("lorafit", 200, 2, losses)],
            "peft": [run("peft", 100, 4, losses)]}
    rows = {r["framework"]: r for r in bench.summarize("fp32", runs, peak_flops=1e12)["rows"]}
    assert rows["lorafit"]["tokens_per_s"] == 200  # median of the rounds
    assert rows["lorafit"]["speed_ratio"] == 2.0 and rows["lorafit"]["memory_ratio"] == 0.5
    assert rows["lorafit"]["mfu"] == pytest.approx(200 * 1e9 / 1e12)
    assert rows["lorafit"]["losses_agree"] and rows["lorafit"]["first_step_s"] == 9.0


def test_gate_fails_when_a_loss_is_off_by_more_than_one_percent():
    peft = [1.0] * 12
    close = [1.0] * 9 + [1.0099] + [1.0] * 2
    off = [1.0] * 9 + [1.0101] + [1.0] * 2
    late = [1.0] * 10 + [2.0, 2.0]  # beyond the first 10 steps: not gated
    runs = {"lorafit": [run("lorafit", 1, 1, close)], "lorafit+compile": [run("lorafit+compile", 1, 1, off)],
            "lorafit+checkpointing": [run("lorafit+checkpointing", 1, 1, late)], "peft": [run("peft", 1, 1, peft)]}
    rows = {r["framework"]: r for r in bench.summarize("fp32", runs, peak_flops=1.0)["rows"]}
    assert rows["lorafit"]["losses_agree"]
    assert not rows["lorafit+compile"]["losses_agree"]
    assert rows["lorafit+checkpointing"]["losses_agree"]
