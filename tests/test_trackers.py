"""train.report_to: TensorBoard and MLflow receive the metrics.jsonl scalars (read back with their own readers),
W&B is driven in offline mode (checked with a stand-in module: wandb itself is not installed here)."""

import json
import sys
import types

import pytest

from lorafit.errors import LorafitError
from lorafit.train import train as run_training

from .conftest import ctrl_c_after_step, losses, recipe_at


def eval_losses(out):
    return [(r["step"], r["eval_loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["event"] == "eval"]


def same_points(got, want, rel):
    """Same steps, values equal to ``rel`` (TensorBoard stores float32)."""
    assert [step for step, _ in got] == [step for step, _ in want]
    assert [value for _, value in got] == pytest.approx([value for _, value in want], rel=rel)


def tensorboard_scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder)).Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_tensorboard_events_hold_the_logged_losses_also_after_a_resume(run_dir, monkeypatch):
    run_training(recipe_at(run_dir, "train.report_to=[tensorboard]", out="straight"))
    straight = run_dir / "straight"
    logged = tensorboard_scalars(straight / "tensorboard", "train/loss")
    same_points(logged, losses(straight), rel=1e-6)
    same_points(tensorboard_scalars(straight / "tensorboard", "eval/loss"), eval_losses(straight), rel=1e-6)
    # interrupted after step 3 and resumed from checkpoint 2: step 3 is logged again, once in the end
    with ctrl_c_after_step(monkeypatch, 3), pytest.raises(LorafitError, match="interrupted after step 3"):
        run_training(recipe_at(run_dir, "train.report_to=[tensorboard]", out="resumed"))
    run_training(recipe_at(run_dir, "train.report_to=[tensorboard]", out="resumed"), resume="latest")
    same_points(tensorboard_scalars(run_dir / "resumed" / "tensorboard", "train/loss"), logged, rel=1e-6)


def test_mlflow_run_has_the_losses_and_the_recipe(run_dir):
    from mlflow.tracking import MlflowClient

    run_training(recipe_at(run_dir, "train.report_to=[mlflow]"))
    out = run_dir / "out"
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]
    same_points([(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")], losses(out), rel=1e-9)
    same_points([(m.step, m.value) for m in client.get_metric_history(run_id, "eval/loss")], eval_losses(out),
                rel=1e-9)
    params = client.get_run(run_id).data.params
    assert params["lora.r"] == "4" and params["train.lr"] == "0.01" and params["train.report_to"] == '["mlflow"]'


def test_wandb_runs_offline_in_the_output_folder(run_dir, monkeypatch):
    calls = {"log": []}

    class Run:
        id = "abc123"

        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr("lorafit.train.check_installed", lambda names: None)  # the stand-in is not a package
    run_training(recipe_at(run_dir, "train.report_to=[wandb]"))
    out = run_dir / "out"
    assert calls["init"]["mode"] == "offline" and calls["init"]["dir"] == str(out)
    assert calls["init"]["config"]["lora.r"] == 4 and calls["finished"]
    assert [(step, values["train/loss"]) for step, values in calls["log"] if "train/loss" in values] == losses(out)


def test_a_tracker_that_is_not_installed_is_one_message_before_anything_runs(run_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(LorafitError, match=r"train.report_to names wandb, which is not installed; pip install "
                                           r"'lorafit\[wandb\]'"):
        run_training(recipe_at(run_dir, "train.report_to=[tensorboard, wandb]"))
    assert not (run_dir / "out").exists()
