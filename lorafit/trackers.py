"""``train.report_to``: the run's scalars in the trackers users already watch — TensorBoard, MLflow, W&B.

The same events as ``metrics.jsonl`` (train: loss, lr, grad_norm, tokens_per_s, epoch; eval: loss), under
"train/..." and "eval/..." at the optimizer step, plus the resolved recipe as hyper-parameters. Everything
stays on this machine unless the user points a tracker elsewhere: TensorBoard event files in
``OUT/tensorboard``, MLflow in a local SQLite store ``OUT/mlflow.db`` (artifacts in ``OUT/mlruns``) unless
``MLFLOW_TRACKING_URI`` is set, W&B in offline mode under ``OUT/wandb`` unless ``WANDB_MODE`` says otherwise.
A resumed run continues the same TensorBoard log (events after the checkpoint are dropped), the same MLflow
run and the same W&B run (their ids are kept in ``OUT/trackers.json``). The libraries are optional extras,
imported only when named.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorafit.errors import LorafitError

IDS_NAME = "trackers.json"


def check_installed(names: list[str]) -> None:
    """Before anything runs: every tracker the recipe names must be importable."""
    missing = [name for name in names if importlib.util.find_spec(name) is None]  # module = extra = name
    if missing:
        extras = ",".join(missing)
        raise LorafitError(f"train.report_to names {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                           f"not installed; pip install 'lorafit[{extras}]' (or remove it from train.report_to)")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as tracker scalars: {"train/loss": ..., "eval/loss": ...}."""
    event = record.get("event", "train")
    values = {}
    for key, value in record.items():
        if key in ("event", "step") or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        values[f"{event}/{key.removeprefix('eval_')}"] = float(value)
    return values


def flat_params(recipe_dump: dict[str, Any], prefix: str = "") -> dict[str, str | float | int | bool]:
    """The resolved recipe as flat hyper-parameters: {"lora.r": 16, "lora.target_modules": "all-linear", ...}."""
    params: dict[str, Any] = {}
    for key, value in recipe_dump.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            params.update(flat_params(value, name + "."))
        elif isinstance(value, (int, float, bool, str)):
            params[name] = value
        else:
            params[name] = json.dumps(value)
    return params


class Trackers:
    """The trackers of one run (the main process's). ``log`` takes metrics.jsonl records."""

    def __init__(self, names: list[str], out: Path, params: dict[str, Any], resumed_at: int | None):
        self.trackers = []
        ids = _read_ids(out) if resumed_at is not None else {}
        for name in names:
            self.trackers.append({"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}[name](
                out, params, resumed_at, ids.get(name)))
        kept = {tracker.name: tracker.run_id for tracker in self.trackers if tracker.run_id}
        if kept:
            (out / IDS_NAME).write_text(json.dumps(kept, indent=2) + "\n")

    def log(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        for tracker in self.trackers:
            tracker.log(values, int(record["step"]))

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


@contextlib.contextmanager
def closing(trackers: Trackers | None) -> Iterator[None]:
    """Inside: the training loop; the trackers are closed (runs ended, files flushed) however it ends."""
    try:
        yield
    finally:
        if trackers is not None:
            trackers.close()


def _read_ids(out: Path) -> dict[str, str]:
    try:
        return json.loads((out / IDS_NAME).read_text())
    except (OSError, ValueError):
        return {}


class _TensorBoard:
    name, run_id = "tensorboard", None

    def __init__(self, out: Path, params: dict[str, Any], resumed_at: int | None, run_id: str | None):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # purge_step: events after the checkpoint were logged by the interrupted run and come again now
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"),
                                    purge_step=None if resumed_at is None else resumed_at + 1)
        if resumed_at is None:
            for summary in hparams(params, {}):
                self.writer._get_file_writer().add_summary(summary)

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    name = "mlflow"

    def __init__(self, out: Path, params: dict[str, Any], resumed_at: int | None, run_id: str | None):
        import mlflow

        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out / 'mlflow.db').resolve()}"
        mlflow.set_tracking_uri(uri)
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "lorafit")
        experiment = mlflow.get_experiment_by_name(experiment_name)
        artifacts = (out / "mlruns").resolve().as_uri()
        experiment_id = (experiment.experiment_id if experiment else
                         mlflow.create_experiment(experiment_name, artifact_location=artifacts))
        self.run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id,
                                    run_name=None if run_id else out.name)
        self.run_id = self.run.info.run_id
        if run_id is None:
            mlflow.log_params(params)

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class _WandB:
    name = "wandb"

    def __init__(self, out: Path, params: dict[str, Any], resumed_at: int | None, run_id: str | None):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lorafit"), dir=str(out), config=params,
                              mode=os.environ.get("WANDB_MODE", "offline"), id=run_id,
                              resume="allow" if run_id else None, name=out.name)
        self.run_id = self.run.id

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()
