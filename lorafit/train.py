"""``lorafit train``: the training loop, top to bottom, under accelerate.

One function (``train``) reads as the run happens: check the output folder, load data (so bad data fails
before anything is written), load and wrap the model, then step: each step is a phase comment and a call
(step, log, evaluate, save). Output-folder rules and checkpoints live in ``checkpoint``; what the user
sees and what is logged (progress, metrics.jsonl, plot, summary) in ``report``.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from lorafit import precision
from lorafit.adapter_io import adapter_content, save_adapter_content
from lorafit.checkpoint import (
    check_output_dir,
    latest_checkpoint,
    load_allocation,
    prepare_output,
    restore_checkpoint,
    save_allocation,
    save_checkpoint,
    truncate_metrics,
)
from lorafit.config import LoRAConfig, Recipe
from lorafit.data import Batches, TokenizedData, split_validation
from lorafit.device import compute_device
from lorafit.distributed import (
    any_across,
    end_process_group,
    from_main,
    full,
    gradient_sync,
    main_first,
    process_state,
    shard,
    sum_across,
)
from lorafit.errors import LorafitError
from lorafit.eva import RankAllocation, allocate_ranks
from lorafit.examples import PackedRows
from lorafit.files import FolderLock
from lorafit.inject import adapters_to_float32, inject_lora, lora_modules, training_hooks
from lorafit.lora import TrainingHooks
from lorafit.loss import TokenLoss, evaluate_loss_sums, trained_positions
from lorafit.model import DTYPES, compile_layers, load_base_model, load_tokenizer
from lorafit.report import (
    MetricsLog,
    RunSummary,
    allocation_table,
    make_progress,
    peak_memory,
    plot_losses,
    plot_ranks,
    report_data,
    targeting_table,
)
from lorafit.schedule import make_scheduler
from lorafit.streaming import StreamBatches
from lorafit.token_cache import load_tokenized
from lorafit.trackers import Trackers, check_installed, closing, flat_params


def train(recipe: Recipe, resume: str | None = None, console: Console | None = None) -> RunSummary:
    """Run a recipe. ``resume`` is None, "latest", or a checkpoint folder.

    Launched as several processes (torchrun, accelerate launch, ``--nproc``), every process runs this same
    function on its share of each micro-batch; the main process alone owns the output folder: it holds the
    folder's lock for the life of the run and writes every file.
    """
    out = Path(recipe.output.dir)
    check_output_dir(out, resume, recipe.inputs())
    check_installed(recipe.train.report_to)
    device = compute_device()
    processes = process_state(device)
    main = processes.is_main_process
    try:
        with FolderLock(out) if main else contextlib.nullcontext():
            return _train(recipe, resume, (console or Console()) if main else Console(quiet=True), main, device)
    finally:
        end_process_group()  # also on errors: no process exits with live communication threads


def _train(recipe: Recipe, resume: str | None, console: Console, main: bool, device: torch.device) -> RunSummary:
    started = time.perf_counter()
    plan = precision.resolve(recipe.model.dtype, recipe.train.precision, recipe.model.quantize)
    # From here on the recipe says what runs on this machine (auto resolved); OUT/recipe.yaml records it.
    recipe = resolved_recipe(recipe, plan)
    cfg = recipe.train
    out = Path(recipe.output.dir)
    checkpoint, stale = prepare_output(out, recipe.output.overwrite, resume) if main else (None, [])
    checkpoint = from_main(checkpoint)  # the main process tidied OUT; every process resumes from its choice
    accelerator = make_accelerator(plan.mixed_precision, device)
    rank, world = accelerator.process_index, accelerator.num_processes
    console.print(plan.describe(), highlight=False)
    warning = precision.emulated_bf16_warning(plan)
    if warning:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)

    # Data first: a bad file must fail before anything lands in OUT or a model loads for nothing.
    tokenizer = load_tokenizer(recipe.model)
    train_data, eval_data, batches = training_data(recipe, tokenizer, rank, world, console)
    report_data(console, train_data, eval_data, recipe.data.train)
    sharded = cfg.fsdp and world > 1
    parallelism = (f"{world} processes ({accelerator.distributed_type.value}, "
                   f"{'FSDP: weights sharded' if sharded else 'DDP: a full copy each'}): micro-batch "
                   f"{cfg.micro_batch_size} per process x grad_accum {cfg.grad_accum} x {world} = global batch "
                   f"{cfg.micro_batch_size * cfg.grad_accum * world} rows per step")
    if world > 1:
        console.print(parallelism, highlight=False)
    elif cfg.fsdp:
        console.print("train.fsdp: one process, so nothing to shard; training unsharded", highlight=False)

    torch.manual_seed(cfg.seed)  # LoRA A init, dropout
    random.seed(cfg.seed)
    model = load_base_model(recipe.model, training=True, device=accelerator.device)
    allocation = rank_allocation(model, recipe.lora, batches, accelerator.device, out if checkpoint else None, console)
    report = inject_lora(model, recipe.lora, allocation)
    adapters_to_float32(model)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing recomputes inside autograd, so LoRA weights get gradients even
        # though no input to a checkpointed block requires grad.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        count = compile_layers(model, accelerator.device)
        console.print(f"compiling {count} decoder layers: the first step (and the first eval) will be slow")
    console.print(targeting_table(report))

    steps_per_epoch = math.ceil(batches.per_epoch / cfg.grad_accum) if batches.per_epoch else None  # None: a stream
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    # The objective (model + loss) is what DDP or FSDP wraps, not the bare model: see loss.TokenLoss.
    objective = TokenLoss(model)
    if sharded:  # before the optimizer: sharding replaces the parameters
        shard(objective, model, accelerator.device, None if plan.model_dtype == "float32" else DTYPES[plan.model_dtype])
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay)
    scheduler = make_scheduler(cfg.scheduler, optimizer, cfg.warmup_steps, total_steps)
    # The scheduler stays ours: accelerate's would step once per process per step (it assumes a dataloader
    # it sharded). A sharded objective is not given to accelerate, which would wrap it in DDP as well.
    if sharded:
        optimizer = accelerator.prepare(optimizer)
    else:
        objective, optimizer = accelerator.prepare(objective, optimizer)
    hooks = training_hooks(model, total_steps)

    start_step = 0
    if checkpoint is not None:
        start_step = restore_checkpoint(checkpoint, model, optimizer, scheduler, hooks, objective=objective,
                                        data=batches)
        if main:
            truncate_metrics(out / "metrics.jsonl", start_step)
        console.print(f"resumed from {checkpoint} at step {start_step}")
    elif main:
        # Only now, with data and model loaded fine, is the previous run (output.overwrite) removed.
        for path in stale:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(recipe.to_yaml())
        if allocation is not None:
            save_allocation(out, allocation, recipe.lora.rank_allocation)

    trackers = None
    if main and cfg.report_to:
        trackers = Trackers(cfg.report_to, out, flat_params(recipe.model_dump(mode="json")),
                            start_step if checkpoint is not None else None)
    metrics = MetricsLog(out / "metrics.jsonl" if main else None, trackers)

    def eval_now() -> float:
        # Each process scores every world-th example, in as many batches as every other process (a sharded
        # model gathers weights in each forward, a collective); the sums give the whole set's loss.
        rounds = math.ceil(math.ceil(len(eval_data.examples) / world) / cfg.micro_batch_size)
        with accelerator.autocast():  # the same precision as training
            total, count = evaluate_loss_sums(accelerator.unwrap_model(objective), eval_data.examples[rank::world],
                                              cfg.micro_batch_size, tokenizer.pad_token_id, accelerator.device, rounds,
                                              filler=eval_data.examples[0])
        total, count = sum_across([total, count], accelerator.device)
        return total / max(count, 1)

    base_eval_loss = None
    if eval_data is not None and start_step == 0:
        # B = 0, so this is exactly the base model: the number the adapter has to beat.
        base_eval_loss = eval_now()
        metrics.write({"event": "eval", "step": 0, "eval_loss": base_eval_loss})
        console.print(f"step 0 (base model) eval loss {base_eval_loss:.4f}")

    stop = StopRequest()
    done = StepResult.none()
    eval_loss = None
    with stop, make_progress(console, total_steps, start_step, world) as progress, closing(trackers):
        for step in range(start_step + 1, total_steps + 1):
            # Ctrl-C (in any process): the previous step is complete, so checkpoint it and stop.
            if any_across(stop.requested, accelerator.device):
                path = save_checkpoint(out, step - 1, model, optimizer, scheduler, hooks, recipe, cfg.keep_last,
                                       main, objective=objective,
                                       data_state=batches.state_dict((step - 1) * cfg.grad_accum))
                raise LorafitError(f"interrupted after step {step - 1}; checkpoint saved to {path}. "
                                   f"Continue with: lorafit train RECIPE --resume")
            # Step: forward/backward over grad_accum micro-batches, clip, optimizer and schedule.
            result = train_step(objective, batches, step, cfg, accelerator, optimizer, scheduler, params, hooks)
            if not math.isfinite(result.loss):
                raise non_finite_loss(result.loss, step, out)
            done = done.plus(result)
            # Log: metrics.jsonl every log_every steps and at the end; the progress bar every step.
            if step % cfg.log_every == 0 or step == total_steps:
                epoch = step / steps_per_epoch if steps_per_epoch else None
                metrics.write({"event": "train", "step": step, **result.record(), "epoch": epoch})
            progress.update(progress.tasks[0].id, completed=step, loss=result.loss, lr=result.lr,
                            tps=result.tokens / result.seconds)
            # Evaluate: every eval_every steps and at the end.
            if eval_data is not None and (step == total_steps or (cfg.eval_every and step % cfg.eval_every == 0)):
                eval_loss = eval_now()
                metrics.write({"event": "eval", "step": step, "eval_loss": eval_loss})
                progress.console.print(f"step {step} eval loss {eval_loss:.4f}")
            # Save: every save_every steps (the end writes the final adapter instead).
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                save_checkpoint(out, step, model, optimizer, scheduler, hooks, recipe, cfg.keep_last, main,
                                objective=objective, data_state=batches.state_dict(step * cfg.grad_accum))

    if isinstance(batches, StreamBatches):
        console.print(batches.describe(), highlight=False)
    adapter_dir = out / "adapter"
    ranks = chosen_ranks(model, allocation)
    adapter = adapter_content(model, recipe.model.base)  # every process: gathered from the shards with FSDP
    if main:
        save_adapter_content(adapter_dir, adapter)
        plot_losses(out / "metrics.jsonl", out / "loss.png")
        if ranks is not None:
            plot_ranks(ranks, out / "ranks.png", f"rank per module: {sum(ranks.values())} in all "
                                                  f"({'EVA allocation' if allocation else 'kept after pruning'})")
    accelerator.wait_for_everyone()  # no process reports success before the files are written
    return RunSummary(
        adapter_dir=adapter_dir, steps=total_steps, train_loss=done.loss, eval_loss=eval_loss,
        base_eval_loss=base_eval_loss, wall_seconds=time.perf_counter() - started,
        tokens_per_second=done.tokens / done.seconds if done.seconds else 0.0,
        peak_memory_bytes=peak_memory(accelerator.device), report=report,
        train_data=train_data, eval_data=eval_data, ranks=ranks, main_process=main, world_size=world,
        parallelism=parallelism,
    )


def training_data(recipe: Recipe, tokenizer, rank: int = 0, world: int = 1, console: Console | None = None
                  ) -> tuple[TokenizedData | None, TokenizedData | None, Batches | StreamBatches]:
    """The recipe's train and eval sets, tokenized (from the cache after the first time: memory-mapped, see
    lorafit/token_cache.py), and the seeded micro-batch stream training reads (this process's share of it,
    when there are ``world`` processes). With data.streaming the train set is read as training goes
    (lorafit/streaming.py): no train TokenizedData then."""
    data, cfg = recipe.data, recipe.train
    def tokenized() -> tuple[TokenizedData | None, TokenizedData | None]:
        return (None if data.streaming else load_tokenized(data.train, data, tokenizer, console),
                load_tokenized(data.eval, data, tokenizer, console) if data.eval else None)

    train_data, eval_data = main_first(tokenized)  # one process tokenizes; the others read its cache entry
    if data.streaming:
        return None, eval_data, StreamBatches(data.train, data, tokenizer, cfg.micro_batch_size,
                                              tokenizer.pad_token_id, rank, world)
    if data.val_fraction:
        train_data, eval_data = split_validation(train_data, data.val_fraction, cfg.seed)
    rows = PackedRows(train_data.examples, data.max_seq_len) if data.packing else train_data.examples
    batches = Batches(rows, cfg.micro_batch_size, cfg.seed, tokenizer.pad_token_id, rank, world)
    return train_data, eval_data, batches


def rank_allocation(model, lora: LoRAConfig, batches: Batches, device: torch.device, resumed_out: Path | None,
                    console: Console) -> RankAllocation | None:
    """``lora.rank_allocation``'s per-layer ranks: computed on the first training batches, or, when resuming
    the run in ``resumed_out``, read back from it (the weights then come from the checkpoint)."""
    if lora.rank_allocation is None:
        return None
    if resumed_out is not None:
        return load_allocation(resumed_out)
    model.to(device)
    with console.status("allocating ranks (EVA: forward passes over training batches) ..."):
        # Whole global micro-batches: every process computes the same allocation (same layers everywhere).
        allocation = allocate_ranks(model, lora, batches.get_global)
    console.print(allocation_table(allocation, lora.rank_allocation))
    return allocation


def chosen_ranks(model, allocation: RankAllocation | None) -> dict[str, int] | None:
    """Each targeted module's final rank where the run chose it — an allocation before training (0: not
    adapted) or the variant during training (AdaLoRA's kept triplets) — else None."""
    modules = lora_modules(model)
    if allocation is None and not any(module.adaptive_rank for module in modules.values()):
        return None
    ranks = dict(allocation.ranks) if allocation is not None else {}
    ranks.update({name: module.trained_rank for name, module in modules.items()})
    return ranks


@dataclass(frozen=True)
class StepResult:
    """One optimizer step: its loss per trained token, lr, gradient norm, tokens and wall time. ``plus``
    accumulates tokens and time over steps and keeps the latest loss."""

    loss: float | None
    lr: float
    grad_norm: float | None
    tokens: int
    seconds: float

    @staticmethod
    def none() -> StepResult:
        return StepResult(None, 0.0, None, 0, 0.0)

    def plus(self, later: StepResult) -> StepResult:
        return StepResult(later.loss, later.lr, later.grad_norm, self.tokens + later.tokens,
                          self.seconds + later.seconds)

    def record(self) -> dict[str, float | None]:
        return {"loss": self.loss, "lr": self.lr, "grad_norm": self.grad_norm,
                "tokens_per_s": self.tokens / self.seconds}


def train_step(objective, batches: Batches | StreamBatches, step: int, cfg, accelerator, optimizer, scheduler, params,
               hooks: TrainingHooks) -> StepResult:
    """Optimizer step number ``step`` (1-based): its micro-batches are positions (step-1)·grad_accum + k.
    Loss and tokens are those of the whole step over all processes."""
    started = time.perf_counter()
    objective.train()
    micro = [batches.get((step - 1) * cfg.grad_accum + k) for k in range(cfg.grad_accum)]
    loss = accumulate_gradients(objective, [batch for batch, _ in micro], accelerator, hooks)
    grad_norm = full(accelerator.clip_grad_norm_(params, cfg.max_grad_norm)) if cfg.max_grad_norm else None
    lr = scheduler.get_last_lr()[0]
    if math.isfinite(loss):  # a non-finite step is reported by the caller and never applied
        optimizer.step()
        if not getattr(optimizer, "step_was_skipped", False):  # fp16 loss scaling skipped an overflowing step
            scheduler.step()
        hooks.on_step_end(step)  # the variant's schedule (AdaLoRA), with this step's gradients still there
    optimizer.zero_grad(set_to_none=True)
    tokens = int(sum_across([sum(n for _, n in micro)], accelerator.device)[0])
    return StepResult(loss, lr, None if grad_norm is None else float(grad_norm), tokens, time.perf_counter() - started)


def non_finite_loss(loss: float, step: int, out: Path) -> LorafitError:
    last = latest_checkpoint(out)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    return LorafitError(f"loss became {loss} at step {step}; stopping ({kept}). "
                        "Lower train.lr or raise warmup_steps (with fp16, prefer bf16).")


def resolved_recipe(recipe: Recipe, plan: precision.PrecisionPlan) -> Recipe:
    """The recipe with ``auto`` dtypes replaced by what this machine runs."""
    model = recipe.model.model_copy(update={"dtype": plan.model_dtype})
    train = recipe.train.model_copy(update={"precision": plan.precision})
    return recipe.model_copy(update={"model": model, "train": train})


def make_accelerator(mixed_precision: str, device: torch.device | None = None):
    """accelerate on ``device`` (default: lorafit.device's rule); autocast (and fp16 loss scaling) as
    ``mixed_precision`` says. Several processes each take the GPU of their local rank (accelerate's choice)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    device = device or compute_device()
    # accelerate keeps one precision and one device per process and refuses a second; one process may train
    # several recipes (tests, notebooks), so each run sets its own. A process group (several processes) stays.
    AcceleratorState._reset_state(reset_partial_state=not torch.distributed.is_initialized())
    if device.type == "cuda":
        torch.cuda.set_device(device)  # accelerate's single-process CUDA device is the current one
    return Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")


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


def accumulate_gradients(objective, micro_batches: list[dict[str, torch.Tensor]], accelerator,
                         hooks: TrainingHooks | None = None) -> float:
    """Backward over one optimizer step's micro-batches; returns the step's loss per trained token.

    ``objective`` is a ``TokenLoss`` (as accelerate prepared it). Each micro-batch's summed loss is divided
    by the trained tokens of the whole step — over all processes — so grad_accum=2 with B rows gives the
    same gradient as one batch of 2B rows, and N processes with B rows each the same as one with N·B (not a
    mean of per-batch means). DDP averages gradients over the N processes, hence the factor N. Gradients are
    all-reduced once, on the last micro-batch. A variant's regularization term joins each micro-batch's loss
    divided by their number: once per step. The returned loss is the language-model loss without that term
    (with an MoE router's auxiliary loss where the model's config asks for it, as transformers' loss has),
    comparable with eval loss.
    """
    device, world = accelerator.device, accelerator.num_processes
    target_tokens = max(sum_across([sum(trained_positions(b) for b in micro_batches)], device)[0], 1)
    step_loss = 0.0
    for k, batch in enumerate(micro_batches):
        batch = {key: value.to(device) for key, value in batch.items()}
        with gradient_sync(objective, accelerator, enabled=k == len(micro_batches) - 1):
            with accelerator.autocast():  # around the loss too: the same precision as the model's forward
                loss = objective(**batch) / target_tokens
            step_loss += loss.item()
            penalty = hooks.regularization() if hooks is not None else None
            scaled = loss * world
            accelerator.backward(scaled if penalty is None else scaled + penalty / len(micro_batches))
    return sum_across([step_loss], device)[0]


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


