"""The output folder of a run and its checkpoints: what may be written where, and how a run continues.

OUT/checkpoints/step-NNNNNN holds a loadable adapter plus ``training_state.pt`` (optimizer, scheduler,
the variant's loop state, RNG states, step): everything needed to continue bit-for-bit on CPU. The data
position is the step itself (see data.Batches). A run whose ranks were allocated before training keeps them
in OUT/rank_allocation.json. Checkpoints are written atomically; only the last ``keep_last`` are kept.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from lorafit.adapter_io import adapter_content, restore_adapter_weights, write_adapter_content
from lorafit.config import RankAllocationConfig, Recipe
from lorafit.distributed import gather_all, is_sharded, world_size
from lorafit.errors import LorafitError
from lorafit.eva import RankAllocation
from lorafit.files import atomic_dir, tidy_after_kill, write_bytes

STATE_NAME = "training_state.pt"
ALLOCATION_NAME = "rank_allocation.json"
RESULT_NAMES = ("recipe.yaml", ALLOCATION_NAME, "metrics.jsonl", "loss.png", "ranks.png", "adapter", "checkpoints",
                "tensorboard", "mlflow.db", "mlruns", "wandb", "trackers.json")  # the last five: train.report_to


def check_output_dir(out: Path, resume: str | None, inputs: dict[str, Path]) -> None:
    """Before anything is created: OUT must be a folder (or missing), and no input of the run (the recipe,
    its data, its base) may be a file the run writes or deletes there, e.g. ``output.dir: .`` next to a
    recipe called recipe.yaml."""
    if out.exists() and not out.is_dir():
        raise LorafitError(f"output.dir {out} is a file, not a folder; give a folder path (it is created if missing)")
    written = [name for name in RESULT_NAMES if not (resume is not None and name == "recipe.yaml")]
    for label, path in inputs.items():
        for name in written:
            target = (out / name).resolve()
            if path.resolve() == target or target in path.resolve().parents:
                raise LorafitError(f"output.dir {out}: the run writes {out / name}, which is {label} ({path}); "
                                   "choose another output.dir so that nothing you gave lorafit is overwritten")


def prepare_output(out: Path, overwrite: bool, resume: str | None) -> tuple[Path | None, list[Path]]:
    """Refuse to mix two runs in one folder (call while holding OUT's lock). Returns the checkpoint to resume
    from, if any, and the previous run's files to delete (with output.overwrite) once the new run is ready."""
    for folder in (out, out / "checkpoints"):
        tidy_after_kill(folder)  # a killed run's half-written temp folders, an interrupted replace
    existing = [name for name in RESULT_NAMES if (out / name).exists()]
    if resume is not None:
        checkpoint = latest_checkpoint(out) if resume == "latest" else Path(resume)
        if checkpoint is None:
            raise LorafitError(f"--resume: no checkpoint in {out / 'checkpoints'}; train without --resume")
        if not (checkpoint / STATE_NAME).is_file():
            raise LorafitError(f"--resume-from {checkpoint}: not a lorafit checkpoint (no {STATE_NAME})")
        return checkpoint, []
    if existing and not overwrite:
        raise LorafitError(f"output.dir {out} already holds a run ({', '.join(existing)}). Use --resume to "
                           "continue it, --set output.overwrite=true to replace it, or another output.dir")
    return None, [out / name for name in existing]


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, hooks, recipe: Recipe, keep_last: int,
                    main: bool = True, *, objective=None, data_state: dict | None = None, tokenizer=None) -> Path:
    """OUT/checkpoints/step-NNNNNN: a loadable adapter plus the state to continue; written atomically.

    Every process calls this: each one's RNG state is gathered (dropout draws differ per process), and with
    FSDP (``objective`` sharded) the adapter and optimizer state are gathered from their shards. Only the
    main process writes. With DDP, model and optimizer state are the same in every process. ``tokenizer``
    is saved beside the adapter when given (a run that added tokens).
    """
    final = out / "checkpoints" / f"step-{step:06d}"
    rng = gather_all({"torch": torch.get_rng_state(), "python": random.getstate(),
                      "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []})
    adapter = adapter_content(model, recipe.model.base)
    optimizer_state = full_optimizer_state(objective, optimizer)
    if not main:
        return final
    previous = latest_checkpoint(out)
    kept = (f"the previous checkpoint {previous} is intact (continue from it with --resume)" if previous
            else "no checkpoint was written yet")
    with atomic_dir(final, "checkpoint", kept) as tmp:
        write_adapter_content(tmp, adapter, tokenizer)
        state = {
            "step": step,
            "sharded": is_sharded(objective),  # FSDP: optimizer state keyed by name
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "hooks": hooks.state_dict(),  # the variant's loop state (AdaLoRA), {} for most
            "rng_per_process": rng,  # [rank] -> that process's RNG states
            "data": data_state or {},  # a stream's place in its source; {} when the step number says it all
        }
        buffer = io.BytesIO()  # the state is the adapter's size (optimizer moments), so it fits in memory
        torch.save(state, buffer)
        write_bytes(tmp / STATE_NAME, buffer.getvalue())
    for old in sorted((out / "checkpoints").glob("step-*"))[:-keep_last]:
        shutil.rmtree(old)
    return final


def full_optimizer_state(objective, optimizer) -> dict:
    """The optimizer's state dict; with FSDP the whole of it, gathered from every process's shard (a
    collective), keyed by parameter name, on the main process."""
    if not is_sharded(objective):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(objective, getattr(optimizer, "optimizer", optimizer), options=options)


def load_optimizer_state(objective, optimizer, state: dict, checkpoint: Path) -> None:
    sharded = is_sharded(objective)
    if bool(state.get("sharded")) != sharded:
        written = "with train.fsdp: true" if state.get("sharded") else "without train.fsdp"
        raise LorafitError(f"{checkpoint} was written {written}; resume with the same train.fsdp setting")
    if not sharded:
        optimizer.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(objective, getattr(optimizer, "optimizer", optimizer), state["optimizer"],
                             options=StateDictOptions(full_state_dict=True))


def restore_checkpoint(checkpoint: Path, model, optimizer, scheduler, hooks, *, objective=None, data=None) -> int:
    path = checkpoint / STATE_NAME
    try:
        # weights_only: the state is tensors, numbers and lists, so nothing executable is unpickled (a
        # pickled object is refused here, as a damaged file).
        state = torch.load(path, weights_only=True)
        rng = _own_rng(state, checkpoint)  # first: a run of another process count cannot continue it at all
        hooks.load_state_dict(state.get("hooks", {}))  # first: AdaLoRA's masks decide what the adapter holds
        if data is not None:
            data.load_state_dict(state.get("data", {}), checkpoint)
        restore_adapter_weights(model, checkpoint)
        load_optimizer_state(objective, optimizer, state, checkpoint)
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(rng["torch"])
        random.setstate(_as_tuple(rng["python"]))
        if rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
        return int(state["step"])
    except LorafitError:
        raise
    except Exception as err:  # any failure to read it back means the file is not a checkpoint of this run
        raise LorafitError(_damaged(path, checkpoint, err)) from None


def _own_rng(state: dict, checkpoint: Path) -> dict:
    """This process's RNG states. The data split (and so the run) depends on the number of processes, so a
    checkpoint continues exactly only with as many processes as wrote it."""
    # checkpoints written before runs of several processes hold one "rng"
    per_process = state["rng_per_process"] if "rng_per_process" in state else [state["rng"]]
    if len(per_process) != world_size():
        raise LorafitError(f"{checkpoint} was written by a run of {len(per_process)} process(es) and this run has "
                           f"{world_size()}; resume with {len(per_process)} (each process's share of every batch "
                           "depends on the count), or train again without --resume")
    return per_process[torch.distributed.get_rank() if world_size() > 1 else 0]


def _damaged(path: Path, checkpoint: Path, err: Exception) -> str:
    """What is wrong with a checkpoint that cannot be read, and the checkpoint before it, if any."""
    reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
    older = [p for p in sorted(checkpoint.parent.glob("step-*")) if p.name < checkpoint.name]
    offer = (f"resume from the one before it: --resume-from {older[-1]}" if older
             else "no earlier checkpoint exists: train again without --resume")
    return f"{path} is damaged or not a lorafit checkpoint ({type(err).__name__}: {reason}); {offer}"


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_allocation(out: Path, allocation: RankAllocation, settings: RankAllocationConfig) -> None:
    """OUT/rank_allocation.json: the per-module ranks a rank allocation chose, with its settings."""
    record = allocation.to_json(settings.model_dump())
    (out / ALLOCATION_NAME).write_text(json.dumps(record, indent=2) + "\n")


def load_allocation(out: Path) -> RankAllocation:
    """The ranks of the run in ``out``, so that a resumed run builds the layers its checkpoint holds."""
    path = out / ALLOCATION_NAME
    try:
        return RankAllocation.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LorafitError(f"--resume: {path} is missing or unreadable ({err}); it holds the per-layer ranks "
                           "this run was built with. Train again without --resume") from None


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop events logged after the checkpoint: they are about to be produced again. A last line
    cut short by a kill is dropped too; a damaged line before it is an error naming it."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line]
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # written half when the run was killed
            raise LorafitError(f"{path}:{number}: not a JSON line (the file was edited or damaged); remove that "
                               "line, or train again without --resume") from None
        if record.get("step", 0) <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))
