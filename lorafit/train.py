"""``lorafit train``: the training loop, top to bottom, under accelerate.

One function (``train``) reads as the run happens: check the output folder, load data (so bad data fails
before anything is written), load and wrap the model, then step. Checkpoints hold everything needed to
continue bit-for-bit on CPU: adapter weights, optimizer, scheduler, RNG states and the data position.
"""

from __future__ import annotations

import json
import math
import random
import resource
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from lorafit import precision
from lorafit.adapter_io import restore_adapter_weights, save_adapter, write_adapter_files
from lorafit.config import Recipe
from lorafit.data import TokenizedData, collate, load_tokenized, pack, split_validation
from lorafit.errors import LorafitError
from lorafit.files import atomic_dir
from lorafit.inject import InjectionReport, adapters_to_float32, inject_lora
from lorafit.loss import evaluate_loss, token_loss_sum, trained_positions
from lorafit.model import compile_layers, load_base_model, load_tokenizer
from lorafit.report import targeting_table
from lorafit.schedule import make_scheduler

STATE_NAME = "training_state.pt"
RESULT_NAMES = ("recipe.yaml", "metrics.jsonl", "loss.png", "adapter", "checkpoints")


@dataclass
class RunSummary:
    adapter_dir: Path
    steps: int
    train_loss: float | None
    eval_loss: float | None
    base_eval_loss: float | None
    wall_seconds: float
    tokens_per_second: float
    peak_memory_bytes: int
    report: InjectionReport
    train_data: TokenizedData
    eval_data: TokenizedData | None


class Batches:
    """An endless, seeded stream of micro-batches, addressable by position for exact resume.

    Micro-batch ``k`` is batch ``k % per_epoch`` of epoch ``k // per_epoch``; each epoch's order is a
    permutation seeded by (seed, epoch), so no sampler state needs saving — only ``k``.
    """

    def __init__(self, rows: list[dict[str, list[int]]], micro_batch_size: int, seed: int, pad_id: int):
        self.rows, self.size, self.seed, self.pad_id = rows, micro_batch_size, seed, pad_id
        self.per_epoch = math.ceil(len(rows) / micro_batch_size)
        self._order: tuple[int, list[int]] | None = None

    def get(self, position: int) -> tuple[dict[str, torch.Tensor], int]:
        """The micro-batch at ``position`` and its number of real (non-padding) tokens."""
        epoch, index = divmod(position, self.per_epoch)
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.rows), generator=generator).tolist())
        chosen = [self.rows[i] for i in self._order[1][index * self.size : (index + 1) * self.size]]
        return collate(chosen, self.pad_id), sum(len(row["input_ids"]) for row in chosen)


def train(recipe: Recipe, resume: str | None = None, console: Console | None = None) -> RunSummary:
    """Run a recipe. ``resume`` is None, "latest", or a checkpoint folder."""
    console = console or Console()
    started = time.perf_counter()
    plan = precision.resolve(recipe.model.dtype, recipe.train.precision, recipe.model.quantize)
    # From here on the recipe says what runs on this machine (auto resolved); OUT/recipe.yaml records it.
    recipe = resolved_recipe(recipe, plan)
    cfg = recipe.train
    out = Path(recipe.output.dir)
    checkpoint, stale = prepare_output(out, recipe.output.overwrite, resume)
    accelerator = make_accelerator(plan.mixed_precision)
    console.print(plan.describe(), highlight=False)
    warning = precision.emulated_bf16_warning(plan)
    if warning:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)

    # Data first: a bad file must fail before anything lands in OUT or a model loads for nothing.
    tokenizer = load_tokenizer(recipe.model)
    train_data = load_tokenized(recipe.data.train, recipe.data, tokenizer)
    eval_data = load_tokenized(recipe.data.eval, recipe.data, tokenizer) if recipe.data.eval else None
    if recipe.data.val_fraction:
        train_data, eval_data = split_validation(train_data, recipe.data.val_fraction, cfg.seed)
    report_data(console, train_data, eval_data)
    train_rows = pack(train_data.examples, recipe.data.max_seq_len) if recipe.data.packing else train_data.examples

    torch.manual_seed(cfg.seed)  # LoRA A init, dropout
    random.seed(cfg.seed)
    model = load_base_model(recipe.model, training=True)
    report = inject_lora(model, recipe.lora)
    adapters_to_float32(model)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing recomputes inside autograd, so LoRA weights get gradients even
        # though no input to a checkpointed block requires grad.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        count = compile_layers(model, accelerator.device)
        console.print(f"compiling {count} decoder layers: the first step (and the first eval) will be slow")
    console.print(targeting_table(report))

    batches = Batches(train_rows, cfg.micro_batch_size, cfg.seed, tokenizer.pad_token_id)
    steps_per_epoch = math.ceil(batches.per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay)
    scheduler = make_scheduler(cfg.scheduler, optimizer, cfg.warmup_steps, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    start_step = 0
    if checkpoint is not None:
        start_step = restore_checkpoint(checkpoint, model, optimizer, scheduler)
        truncate_metrics(out / "metrics.jsonl", start_step)
        console.print(f"resumed from {checkpoint} at step {start_step}")
    else:
        # Only now, with data and model loaded fine, is the previous run (output.overwrite) removed.
        for path in stale:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(recipe.to_yaml())

    metrics = MetricsLog(out / "metrics.jsonl")

    def eval_now() -> float:
        with accelerator.autocast():  # the same precision as training
            return evaluate_loss(model, eval_data, cfg.micro_batch_size, tokenizer.pad_token_id, accelerator.device)

    base_eval_loss = None
    if eval_data is not None and start_step == 0:
        # B = 0, so this is exactly the base model: the number the adapter has to beat.
        base_eval_loss = eval_now()
        metrics.write({"event": "eval", "step": 0, "eval_loss": base_eval_loss})
        console.print(f"step 0 (base model) eval loss {base_eval_loss:.4f}")

    stop = StopRequest()
    train_loss = eval_loss = None
    tokens_seen, train_seconds = 0, 0.0
    step = start_step
    with stop, make_progress(console, total_steps, start_step) as progress:
        task = progress.tasks[0].id
        while step < total_steps:
            if stop.requested:
                path = save_checkpoint(out, step, model, optimizer, scheduler, recipe, cfg.keep_last)
                raise LorafitError(f"interrupted after step {step}; checkpoint saved to {path}. "
                                   f"Continue with: lorafit train RECIPE --resume")
            step_start = time.perf_counter()
            model.train()
            micro = [batches.get(step * cfg.grad_accum + k) for k in range(cfg.grad_accum)]
            step_loss = accumulate_gradients(model, [batch for batch, _ in micro], accelerator)
            if not math.isfinite(step_loss):
                last = latest_checkpoint(out)
                kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
                raise LorafitError(f"loss became {step_loss} at step {step + 1}; stopping ({kept}). "
                                   "Lower train.lr or raise warmup_steps (with fp16, prefer bf16).")
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm else None
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            tokens = sum(n for _, n in micro)
            tokens_seen += tokens
            elapsed = time.perf_counter() - step_start
            train_seconds += elapsed
            train_loss = step_loss
            if step % cfg.log_every == 0 or step == total_steps:
                metrics.write({"event": "train", "step": step, "loss": step_loss, "lr": lr,
                               "grad_norm": None if grad_norm is None else float(grad_norm),
                               "tokens_per_s": tokens / elapsed, "epoch": step / steps_per_epoch})
            progress.update(task, completed=step, loss=step_loss, lr=lr, tps=tokens / elapsed)
            if eval_data is not None and (step == total_steps or (cfg.eval_every and step % cfg.eval_every == 0)):
                eval_loss = eval_now()
                metrics.write({"event": "eval", "step": step, "eval_loss": eval_loss})
                progress.console.print(f"step {step} eval loss {eval_loss:.4f}")
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                save_checkpoint(out, step, model, optimizer, scheduler, recipe, cfg.keep_last)

    adapter_dir = save_adapter(accelerator.unwrap_model(model), out / "adapter", recipe.model.base)
    plot_losses(out / "metrics.jsonl", out / "loss.png")
    return RunSummary(
        adapter_dir=adapter_dir, steps=step, train_loss=train_loss, eval_loss=eval_loss,
        base_eval_loss=base_eval_loss, wall_seconds=time.perf_counter() - started,
        tokens_per_second=tokens_seen / train_seconds if train_seconds else 0.0,
        peak_memory_bytes=peak_memory(accelerator.device), report=report,
        train_data=train_data, eval_data=eval_data,
    )


def prepare_output(out: Path, overwrite: bool, resume: str | None) -> tuple[Path | None, list[Path]]:
    """Refuse to mix two runs in one folder. Returns the checkpoint to resume from, if any, and the
    previous run's files to delete (with output.overwrite) once the new run is ready to write."""
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


def resolved_recipe(recipe: Recipe, plan: precision.PrecisionPlan) -> Recipe:
    """The recipe with ``auto`` dtypes replaced by what this machine runs."""
    model = recipe.model.model_copy(update={"dtype": plan.model_dtype})
    train = recipe.train.model_copy(update={"precision": plan.precision})
    return recipe.model_copy(update={"model": model, "train": train})


def make_accelerator(mixed_precision: str):
    """CUDA when present, else CPU; autocast (and fp16 loss scaling) as ``mixed_precision`` says."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one precision per process and refuses a second; one process may train several
    # recipes (tests, notebooks), so each run sets its own. The process/device state (PartialState) stays.
    AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float):
    """AdamW from torch, or bitsandbytes' 8-bit / paged variants (8-bit states: 2 bytes per parameter
    instead of 8; paging only matters on CUDA, where it spills optimizer state to CPU memory)."""
    if name == "adamw":
        # fused: one kernel over all tensors instead of a dozen ops per tensor (SmolLM2 all-linear has 420
        # LoRA tensors), the same default transformers' Trainer uses; plain AdamW where it does not exist.
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
    try:
        import bitsandbytes as bnb
    except Exception as err:  # bitsandbytes raises several types when its native library is missing
        raise LorafitError(f"train.optimizer: {name!r} needs a working bitsandbytes ({err}); use adamw") from None
    optimizers = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
                  "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}
    return optimizers[name](params, lr=lr, weight_decay=weight_decay)


def accumulate_gradients(model, micro_batches: list[dict[str, torch.Tensor]], accelerator) -> float:
    """Backward over one optimizer step's micro-batches; returns the step's loss per trained token.

    Each micro-batch's summed loss is divided by the trained tokens of the whole step, so grad_accum=2
    with B rows gives the same gradient as one batch of 2B rows (not a mean of per-batch means).
    """
    target_tokens = max(sum(trained_positions(b) for b in micro_batches), 1)
    step_loss = 0.0
    for batch in micro_batches:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        # accelerate puts autocast around model.forward only; the fused loss runs the decoder directly.
        with accelerator.autocast():
            loss = token_loss_sum(model, batch) / target_tokens
        accelerator.backward(loss)
        step_loss += loss.item()
    return step_loss


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, recipe: Recipe, keep_last: int) -> Path:
    """OUT/checkpoints/step-NNNNNN: a loadable adapter plus the state to continue; written atomically."""
    final = out / "checkpoints" / f"step-{step:06d}"
    with atomic_dir(final) as tmp:
        write_adapter_files(model, tmp, recipe.model.base)
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }
        torch.save(state, tmp / STATE_NAME)
    for old in sorted((out / "checkpoints").glob("step-*"))[:-keep_last]:
        shutil.rmtree(old)
    return final


def restore_checkpoint(checkpoint: Path, model, optimizer, scheduler) -> int:
    restore_adapter_weights(model, checkpoint)
    # weights_only: the state is tensors, numbers and lists, so nothing executable is unpickled.
    state = torch.load(checkpoint / STATE_NAME, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(_as_tuple(state["rng"]["python"]))
    if state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step-*"))
    return found[-1] if found else None


class MetricsLog:
    """metrics.jsonl: one JSON object per event, flushed at once so a crash loses nothing logged."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop events logged after the checkpoint: they are about to be produced again."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


class StopRequest:
    """First Ctrl-C asks the loop to checkpoint and stop at the next step boundary; a second one kills."""

    requested = False

    def __enter__(self) -> StopRequest:
        # Signal handlers can only be set from the main thread; elsewhere Ctrl-C keeps its default.
        self._active = threading.current_thread() is threading.main_thread()
        if self._active:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._active:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)


def make_progress(console: Console, total: int, completed: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:.0f} tok/s"),
        TimeRemainingColumn(), console=console, transient=False,
    )
    progress.add_task("train", total=total, completed=completed, loss=float("nan"), lr=0.0, tps=0.0)
    return progress


def report_data(console: Console, train_data: TokenizedData, eval_data: TokenizedData | None) -> None:
    for name, data in (("train", train_data), ("eval", eval_data)):
        if data is None:
            continue
        counts = ((data.truncated, "truncated"), (data.skipped, "skipped"))
        notes = [f"{count} {what}" for count, what in counts if count]
        extra = f" ({', '.join(notes)} at data.max_seq_len)" if notes else ""
        console.print(f"{name}: {len(data.examples)} examples, {data.trained_tokens:,} trained tokens from "
                      f"{data.source}{extra}", highlight=False)


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    train = [(r["step"], r["loss"]) for r in records if r["event"] == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in records if r["event"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per trained token")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def peak_memory(device: torch.device) -> int:
    """Peak GPU memory allocated by torch on CUDA; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
