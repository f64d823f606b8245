"""``lorafit train``: ``prepare`` a run, then ``fit`` it, under accelerate.

``prepare(recipe) -> Run`` does everything before the first step, in the order the user sees it: resolve the
precision, tidy OUT, load data (so bad data fails before anything is written), load the model and inject the
adapters, build objective, optimizer and schedule, then resume or start OUT. ``fit(run)`` is the loop: each
step is a phase comment and a call (step, log, evaluate, save), blind to the adapter variant (its schedule is
``run.hooks``) and to the objective (``run.objective``: a batch -> its loss). ``lorafit plan`` shares the
parts that need no optimizer and write nothing: ``resolve_precision``, ``training_data`` (only for a rank
allocation's batches), ``inject_adapters`` (the model train would build) and ``BatchShape``.
Output-folder rules and checkpoints live in ``checkpoint``; what the user sees and what is logged (progress,
metrics.jsonl, plot, summary) in ``report``.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from lorafit import loraplus, precision
from lorafit.adapter_io import adapter_content, save_adapter_content, start_from_adapter
from lorafit.adapters.base import TrainingHooks
from lorafit.adapters.tokens import add_tokens
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
from lorafit.config import LoRAConfig, Recipe, TrainConfig
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
from lorafit.fused import use_fused_layers
from lorafit.inject import InjectionReport, inject_lora, lora_modules, training_hooks
from lorafit.loss import TokenLoss, evaluate_loss_sums, trained_positions
from lorafit.model import DTYPES, compile_layers, load_base_model, load_tokenizer
from lorafit.preference_train import (
    PairBatches,
    dpo_reference,
    eval_rounds,
    evaluate_pair_sums,
    load_pair_sets,
    pair_count,
    pair_objective,
)
from lorafit.reference_cache import attach_reference
from lorafit.report import (
    MetricsLog,
    RunSummary,
    allocation_table,
    make_progress,
    peak_memory,
    plot_losses,
    plot_ranks,
    report_data,
    start_label,
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
            console = (console or Console()) if main else Console(quiet=True)
            return fit(prepare(recipe, resume, console, main=main, device=device))
    finally:
        end_process_group()  # also on errors: no process exits with live communication threads


@dataclass
class Run:
    """A prepared run: everything ``fit`` needs, built by ``prepare``. Every process holds one; ``main``
    says whether this one writes OUT."""

    recipe: Recipe  # resolved: ``auto`` dtypes replaced by what this machine runs (as OUT/recipe.yaml records)
    out: Path
    main: bool
    console: Console  # quiet in every process but the main one
    accelerator: Any
    tokenizer: Any
    train_data: TokenizedData | None  # None: a stream (data.streaming)
    eval_data: TokenizedData | None
    batches: Batches | StreamBatches  # this process's share of each global micro-batch
    model: torch.nn.Module  # the base with adapters injected (unwrapped)
    report: InjectionReport
    allocation: RankAllocation | None  # lora.rank_allocation's ranks
    objective: torch.nn.Module  # a batch -> its summed loss; what accelerate (DDP) or FSDP wrapped
    optimizer: Any
    scheduler: Any
    params: list[torch.nn.Parameter]  # the trainable ones (as the optimizer holds them), for clipping
    hooks: TrainingHooks  # the variant's loop hooks (AdaLoRA's schedule), no-ops for most
    total_steps: int
    steps_per_epoch: int | None  # None: a stream, whose length is unknown
    parallelism: str  # how the processes share a step (the summary's "processes" row)
    checkpoint: Path | None  # the checkpoint resumed from
    started: float  # time.perf_counter() when preparing began
    start_step: int = 0  # the last step already done (the checkpoint's)
    trackers: Trackers | None = None
    metrics: MetricsLog = field(default_factory=lambda: MetricsLog(None, None))

    @property
    def cfg(self) -> TrainConfig:
        return self.recipe.train

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def step(self, step: int) -> StepResult:
        """Optimizer step number ``step`` (1-based): see ``train_step``."""
        return train_step(self.objective, self.batches, step, self.cfg, self.accelerator, self.optimizer,
                          self.scheduler, self.params, self.hooks)

    def epoch(self, step: int) -> float | None:
        return step / self.steps_per_epoch if self.steps_per_epoch else None

    def eval_due(self, step: int) -> bool:
        """Evaluate every eval_every steps and at the end (when there is eval data)."""
        every = self.cfg.eval_every
        return self.eval_data is not None and (step == self.total_steps or bool(every and step % every == 0))

    def evaluate(self) -> tuple[float, dict[str, float]]:
        """Eval loss per trained token over the whole eval set, in training's precision (a pair objective: its
        loss per pair, and its other metrics by name).

        Each process scores every world-th example, in as many batches as every other process (a sharded
        model gathers weights in each forward, a collective); the sums give the whole set's loss."""
        if self.cfg.objective != "sft":
            return self.evaluate_pairs()
        examples, size = self.eval_data.examples, self.cfg.micro_batch_size
        rounds = math.ceil(math.ceil(len(examples) / self.world) / size)
        with self.accelerator.autocast():  # the same precision as training
            total, count = evaluate_loss_sums(self.accelerator.unwrap_model(self.objective),
                                              examples[self.rank::self.world], size, self.tokenizer.pad_token_id,
                                              self.device, rounds, filler=examples[0])
        total, count = sum_across([total, count], self.device)
        return total / max(count, 1), {}

    def evaluate_pairs(self) -> tuple[float, dict[str, float]]:
        pairs, size = self.eval_data.pairs, self.cfg.micro_batch_size
        objective = self.accelerator.unwrap_model(self.objective)
        with self.accelerator.autocast():
            sums, count = evaluate_pair_sums(objective, pairs[self.rank::self.world], size, self.tokenizer.pad_token_id,
                                             self.device, eval_rounds(len(pairs), self.world, size), filler=pairs[0])
        keys = sorted(sums)  # the same order in every process
        *totals, count = sum_across([sums[key] for key in keys] + [count], self.device)
        metrics = {key: total / max(count, 1) for key, total in zip(keys, totals, strict=True)}
        return metrics.pop("loss"), metrics

    def save(self, step: int) -> Path:
        """OUT/checkpoints/step-NNNNNN after ``step`` steps (every process calls it; the main one writes)."""
        return save_checkpoint(self.out, step, self.model, self.optimizer, self.scheduler, self.hooks, self.recipe,
                               self.cfg.keep_last, self.main, objective=self.objective,
                               data_state=self.batches.state_dict(step * self.cfg.grad_accum),
                               tokenizer=self.saved_tokenizer)

    @property
    def saved_tokenizer(self) -> Any:
        """The tokenizer to save beside the adapter: this run's when it added tokens (else the base's serves)."""
        return self.tokenizer if self.recipe.data.add_special_tokens else None


def prepare(recipe: Recipe, resume: str | None = None, console: Console | None = None, *, main: bool = True,
            device: torch.device | None = None) -> Run:
    """Everything before the first step (``resume`` as in ``train``). Every process calls it; only ``main``
    touches OUT, whose lock the caller holds. ``device``: default lorafit.device's rule."""
    started = time.perf_counter()
    console = console or Console()
    recipe, chosen = resolve_precision(recipe)  # from here on the recipe says what runs on this machine
    cfg, out = recipe.train, Path(recipe.output.dir)
    checkpoint, stale = prepare_output(out, recipe.output.overwrite, resume) if main else (None, [])
    checkpoint = from_main(checkpoint)  # the main process tidied OUT; every process resumes from its choice
    accelerator = make_accelerator(chosen.mixed_precision, device)
    console.print(chosen.describe(), highlight=False)
    warning = precision.emulated_bf16_warning(chosen)
    if warning:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)

    # Data first: a bad file must fail before anything lands in OUT or a model loads for nothing.
    tokenizer, token_ids = recipe_tokenizer(recipe)
    rank, world = accelerator.process_index, accelerator.num_processes
    train_data, eval_data, batches = training_data(recipe, tokenizer, rank, world, console)
    report_data(console, train_data, eval_data, recipe.data.train)
    parallelism = show_parallelism(console, BatchShape.of(cfg, world), accelerator.distributed_type.value)

    torch.manual_seed(cfg.seed)  # LoRA A init, dropout
    random.seed(cfg.seed)
    model = load_base_model(recipe.model, training=True, device=accelerator.device)
    report, allocation = inject_adapters(model, recipe, accelerator.device, batches, console,
                                         resumed_out=out if checkpoint else None, for_training=True,
                                         tokens=token_ids)
    if cfg.precompute_reference:  # DPO's reference scored once, before compiling, sharding or wrapping the model
        attach_reference(dpo_reference(model, recipe), recipe, tokenizer, train_data.pairs, accelerator.device,
                         console, accelerator.autocast)
    ready_for_training(model, cfg, accelerator.device, console)
    console.print(targeting_table(report))

    total_steps, steps_per_epoch = step_count(cfg, batches)
    objective, optimizer, scheduler, params = optimization(model, recipe, accelerator, total_steps)
    run = Run(recipe=recipe, out=out, main=main, console=console, accelerator=accelerator, tokenizer=tokenizer,
              train_data=train_data, eval_data=eval_data, batches=batches, model=model, report=report,
              allocation=allocation, objective=objective, optimizer=optimizer, scheduler=scheduler, params=params,
              hooks=training_hooks(model, total_steps), total_steps=total_steps, steps_per_epoch=steps_per_epoch,
              parallelism=parallelism, checkpoint=checkpoint, started=started)
    run.start_step = resume_or_start(run, stale)
    run.trackers, run.metrics = run_logs(run)
    return run


def fit(run: Run) -> RunSummary:
    """The loop, from ``run.start_step`` to ``run.total_steps``; then the adapter, the plots and the summary."""
    cfg = run.cfg
    base_eval_loss = evaluate_base(run)
    stop, done, eval_loss = StopRequest(), StepResult.none(), None
    with stop, make_progress(run.console, run.total_steps, run.start_step, run.world) as progress, \
            closing(run.trackers):
        for step in range(run.start_step + 1, run.total_steps + 1):
            # Ctrl-C (in any process): the previous step is complete, so checkpoint it and stop.
            if any_across(stop.requested, run.device):
                path = run.save(step - 1)
                raise LorafitError(f"interrupted after step {step - 1}; checkpoint saved to {path}. "
                                   f"Continue with: lorafit train RECIPE --resume")
            # Step: forward/backward over grad_accum micro-batches, clip, optimizer and schedule.
            result = run.step(step)
            if not math.isfinite(result.loss):
                raise non_finite_loss(result.loss, step, run.out)
            done = done.plus(result)
            # Log: metrics.jsonl every log_every steps and at the end; the progress bar every step.
            if step % cfg.log_every == 0 or step == run.total_steps:
                run.metrics.write({"event": "train", "step": step, **result.record(), "epoch": run.epoch(step)})
            progress.update(progress.tasks[0].id, completed=step, loss=result.loss, lr=result.lr,
                            tps=result.tokens / result.seconds, extra=result.progress_note())
            # Evaluate: every eval_every steps and at the end.
            if run.eval_due(step):
                eval_loss, eval_metrics = run.evaluate()
                run.metrics.write({"event": "eval", "step": step, "eval_loss": eval_loss,
                                   **{f"eval_{key}": value for key, value in eval_metrics.items()}})
                progress.console.print(f"step {step} eval loss {eval_loss:.4f}")
            # Save: every save_every steps (the end writes the final adapter instead).
            if cfg.save_every and step % cfg.save_every == 0 and step < run.total_steps:
                run.save(step)
    return finish(run, done, base_eval_loss, eval_loss)


def evaluate_base(run: Run) -> float | None:
    """A fresh run's step-0 eval loss: the model it starts from (B = 0: exactly the base model's; with
    lora.init_from the starting adapter's) — the number the adapter has to beat. DPO: log 2 (policy = reference)."""
    if run.eval_data is None or run.start_step != 0:
        return None
    loss, metrics = run.evaluate()
    run.metrics.write({"event": "eval", "step": 0, "eval_loss": loss,
                       **{f"eval_{key}": value for key, value in metrics.items()}})
    run.console.print(f"step 0 ({start_label(run.cfg.objective, run.recipe.lora.init_from)}) eval loss {loss:.4f}")
    return loss


def finish(run: Run, done: StepResult, base_eval_loss: float | None, eval_loss: float | None) -> RunSummary:
    """Write OUT/adapter and the plots (main process), wait for every process, and sum the run up."""
    if isinstance(run.batches, StreamBatches):
        run.console.print(run.batches.describe(), highlight=False)
    adapter_dir = run.out / "adapter"
    ranks = chosen_ranks(run.model, run.allocation)
    adapter = adapter_content(run.model, run.recipe.model.base)  # every process: gathered from the shards with FSDP
    if run.main:
        save_adapter_content(adapter_dir, adapter, run.saved_tokenizer)
        plot_losses(run.out / "metrics.jsonl", run.out / "loss.png", run.cfg.objective)
        if ranks is not None:
            how = "EVA allocation" if run.allocation else "kept after pruning"
            plot_ranks(ranks, run.out / "ranks.png", f"rank per module: {sum(ranks.values())} in all ({how})")
    run.accelerator.wait_for_everyone()  # no process reports success before the files are written
    return RunSummary(
        adapter_dir=adapter_dir, steps=run.total_steps, train_loss=done.loss, eval_loss=eval_loss,
        base_eval_loss=base_eval_loss, wall_seconds=time.perf_counter() - run.started,
        tokens_per_second=done.tokens / done.seconds if done.seconds else 0.0,
        peak_memory_bytes=peak_memory(run.device), report=run.report,
        train_data=run.train_data, eval_data=run.eval_data, ranks=ranks, main_process=run.main,
        world_size=run.world, parallelism=run.parallelism,
        start=start_label(run.cfg.objective, run.recipe.lora.init_from),
    )


def resolve_precision(recipe: Recipe) -> tuple[Recipe, precision.PrecisionPlan]:
    """This machine's precision for the recipe (lorafit.precision), and the recipe with it filled in."""
    chosen = precision.resolve(recipe.model.dtype, recipe.train.precision, recipe.model.quantize)
    return resolved_recipe(recipe, chosen), chosen


def resolved_recipe(recipe: Recipe, plan: precision.PrecisionPlan) -> Recipe:
    """The recipe with ``auto`` dtypes replaced by what this machine runs."""
    model = recipe.model.model_copy(update={"dtype": plan.model_dtype})
    train = recipe.train.model_copy(update={"precision": plan.precision})
    return recipe.model_copy(update={"model": model, "train": train})


@dataclass(frozen=True)
class BatchShape:
    """Rows per optimizer step: micro_batch_size (per process) x grad_accum x processes. ``train`` reports it
    for the processes it runs as, ``plan --nproc N`` for N."""

    micro_batch_size: int
    grad_accum: int
    processes: int
    fsdp: bool

    @staticmethod
    def of(cfg: TrainConfig, processes: int) -> BatchShape:
        return BatchShape(cfg.micro_batch_size, cfg.grad_accum, processes, cfg.fsdp)

    @property
    def per_process(self) -> int:
        return self.micro_batch_size * self.grad_accum

    @property
    def rows(self) -> int:
        return self.per_process * self.processes

    @property
    def sharded(self) -> bool:
        """FSDP shards only over several processes; one process trains unsharded whatever train.fsdp says."""
        return self.fsdp and self.processes > 1

    def run_line(self, backend: str) -> str:
        """``train``'s line for a launched run; ``backend``: accelerate's distributed type (MULTI_GPU, ...)."""
        how = "FSDP: weights sharded" if self.sharded else "DDP: a full copy each"
        return (f"{self.processes} processes ({backend}, {how}): micro-batch {self.micro_batch_size} per process "
                f"x grad_accum {self.grad_accum} x {self.processes} = global batch {self.rows} rows per step")

    def plan_line(self) -> str:
        """``plan``'s line: one process, or ``--nproc N``."""
        m, g = self.micro_batch_size, self.grad_accum
        if self.processes == 1:
            return (f"batch: micro-batch {m} x grad_accum {g} = {self.per_process} rows "
                    "per step (per process when launched as several: micro_batch_size is per process)")
        how = "FSDP: weights sharded over the processes" if self.fsdp else "DDP: a full copy per process"
        return (f"batch over {self.processes} processes ({how}): micro-batch {m} x grad_accum "
                f"{g} per process x {self.processes} = {self.rows} rows per step")


def show_parallelism(console: Console, shape: BatchShape, backend: str) -> str:
    """Print how the processes share a step (nothing for one process, unless train.fsdp asks for sharding);
    return the line either way, for the run summary."""
    line = shape.run_line(backend)
    if shape.processes > 1:
        console.print(line, highlight=False)
    elif shape.fsdp:
        console.print("train.fsdp: one process, so nothing to shard; training unsharded", highlight=False)
    return line


def training_data(recipe: Recipe, tokenizer, rank: int = 0, world: int = 1, console: Console | None = None
                  ) -> tuple[TokenizedData | None, TokenizedData | None, Batches | StreamBatches]:
    """The recipe's train and eval sets, tokenized (from the cache after the first time: memory-mapped, see
    lorafit/token_cache.py), and the seeded micro-batch stream training reads (this process's share of it,
    when there are ``world`` processes). With data.streaming the train set is read as training goes
    (lorafit/streaming.py): no train TokenizedData then."""
    data, cfg = recipe.data, recipe.train
    if data.format == "preference":  # pairs: lorafit/preference_train.py (no streaming, packing or val_fraction)
        train_pairs, eval_pairs = main_first(lambda: load_pair_sets(recipe, tokenizer))
        return train_pairs, eval_pairs, PairBatches(train_pairs.pairs, cfg.micro_batch_size, cfg.seed,
                                                    tokenizer.pad_token_id, rank, world)

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


def inject_adapters(model: torch.nn.Module, recipe: Recipe, device: torch.device,
                    batches: Batches | StreamBatches | None, console: Console, *, resumed_out: Path | None = None,
                    show_allocation: bool = True, for_training: bool = False, tokens: list[int] | None = None
                    ) -> tuple[InjectionReport, RankAllocation | None]:
    """Wrap the recipe's targets in ``model`` (on ``device``), at the ranks ``lora.rank_allocation`` gives
    when set (see ``rank_allocation``; ``batches`` may be None without one). ``train`` and ``plan`` both
    build their model here, so plan shows the ranks and counts train would train. ``for_training``: fp32
    adapter weights (the optimizer's master copy), whatever the base dtype. ``tokens``: the ids of
    data.add_special_tokens (``recipe_tokenizer``), whose rows train too."""
    allocation = rank_allocation(model, recipe.lora, batches, device, resumed_out, console, show=show_allocation)
    report = inject_lora(model, recipe.lora, allocation, for_training=for_training, tokens=tokens)
    if recipe.lora.init_from is not None:  # before a resume's checkpoint: DPO's reference is this starting adapter
        start_from_adapter(model, recipe.lora.init_from)
        console.print(f"starting from the adapter in {recipe.lora.init_from}", highlight=False)
    return report, allocation


def recipe_tokenizer(recipe: Recipe) -> tuple[Any, list[int]]:
    """The base's tokenizer with data.add_special_tokens added, and those tokens' ids (empty without any)."""
    tokenizer = load_tokenizer(recipe.model)
    return tokenizer, add_tokens(tokenizer, recipe.data.add_special_tokens)


def rank_allocation(model, lora: LoRAConfig, batches: Batches, device: torch.device, resumed_out: Path | None,
                    console: Console, show: bool = True) -> RankAllocation | None:
    """``lora.rank_allocation``'s per-layer ranks: computed on the first training batches (their table
    printed when ``show``), or, when resuming the run in ``resumed_out``, read back from it (the weights then
    come from the checkpoint)."""
    if lora.rank_allocation is None:
        return None
    if resumed_out is not None:
        return load_allocation(resumed_out)
    model.to(device)
    with console.status("allocating ranks (EVA: forward passes over training batches) ..."):
        # Whole global micro-batches: every process computes the same allocation (same layers everywhere).
        allocation = allocate_ranks(model, lora, batches.get_global)
    if show:
        console.print(allocation_table(allocation, lora.rank_allocation))
    return allocation


def ready_for_training(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, console: Console) -> None:
    """Gradient checkpointing and compilation, as the recipe asks; RMSNorm and SwiGLU with their hand-written
    backward (lorafit/fused.py) where the model is not compiled (compiling fuses them by itself)."""
    if not cfg.compile:
        use_fused_layers(model)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing recomputes inside autograd, so LoRA weights get gradients even
        # though no input to a checkpointed block requires grad.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        count = compile_layers(model, device)
        console.print(f"compiling {count} decoder layers: the first step (and the first eval) will be slow")


def step_count(cfg: TrainConfig, batches: Batches | StreamBatches) -> tuple[int, int | None]:
    """(optimizer steps in all, steps per epoch); per epoch is None for a stream, which needs max_steps."""
    steps_per_epoch = math.ceil(batches.per_epoch / cfg.grad_accum) if batches.per_epoch else None
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch)), steps_per_epoch


def optimization(model: torch.nn.Module, recipe: Recipe, accelerator, total_steps: int
                 ) -> tuple[torch.nn.Module, Any, Any, list[torch.nn.Parameter]]:
    """(objective, optimizer, scheduler, trainable params), the objective and optimizer as accelerate (DDP)
    or FSDP wrapped them. The objective — model + loss, a batch -> its summed loss — is what DDP or FSDP
    wraps, not the bare model: see loss.TokenLoss."""
    cfg, dtype = recipe.train, recipe.model.dtype
    sharded = BatchShape.of(cfg, accelerator.num_processes).sharded
    objective = TokenLoss(model) if cfg.objective == "sft" else pair_objective(model, recipe)
    if sharded:  # before the optimizer: sharding replaces the parameters
        shard(objective, model, accelerator.device, None if dtype == "float32" else DTYPES[dtype])
    params = [p for p in objective.parameters() if p.requires_grad]
    groups = loraplus.param_groups(objective, cfg.lr, cfg.loraplus_lr_ratio, cfg.weight_decay) \
        if cfg.loraplus_lr_ratio else params
    optimizer = make_optimizer(cfg.optimizer, groups, cfg.lr, cfg.weight_decay)
    scheduler = make_scheduler(cfg.scheduler, optimizer, cfg.warmup_steps, total_steps)
    # The scheduler stays ours: accelerate's would step once per process per step (it assumes a dataloader
    # it sharded). A sharded objective is not given to accelerate, which would wrap it in DDP as well.
    if sharded:
        optimizer = accelerator.prepare(optimizer)
    else:
        objective, optimizer = accelerator.prepare(objective, optimizer)
    return objective, optimizer, scheduler, params


def resume_or_start(run: Run, stale: list[Path]) -> int:
    """Restore ``run.checkpoint`` (every process) and return its step; or, for a fresh run, start OUT (main
    process: remove the previous run, write recipe.yaml and the rank allocation) and return 0."""
    if run.checkpoint is not None:
        start_step = restore_checkpoint(run.checkpoint, run.model, run.optimizer, run.scheduler, run.hooks,
                                        objective=run.objective, data=run.batches)
        if run.main:
            truncate_metrics(run.out / "metrics.jsonl", start_step)
        run.console.print(f"resumed from {run.checkpoint} at step {start_step}")
        return start_step
    if run.main:
        # Only now, with data and model loaded fine, is the previous run (output.overwrite) removed.
        for path in stale:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "recipe.yaml").write_text(run.recipe.to_yaml())
        if run.allocation is not None:
            save_allocation(run.out, run.allocation, run.recipe.lora.rank_allocation)
    return 0


def run_logs(run: Run) -> tuple[Trackers | None, MetricsLog]:
    """The trackers of train.report_to and OUT/metrics.jsonl (main process; the others log nothing)."""
    trackers = None
    if run.main and run.cfg.report_to:
        trackers = Trackers(run.cfg.report_to, run.out, flat_params(run.recipe.model_dump(mode="json")),
                            run.start_step if run.checkpoint is not None else None)
    return trackers, MetricsLog(run.out / "metrics.jsonl" if run.main else None, trackers)


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
    metrics: dict[str, float] = field(default_factory=dict)  # a pair objective's (TRL's names), over the step

    @staticmethod
    def none() -> StepResult:
        return StepResult(None, 0.0, None, 0, 0.0)

    def plus(self, later: StepResult) -> StepResult:
        return StepResult(later.loss, later.lr, later.grad_norm, self.tokens + later.tokens,
                          self.seconds + later.seconds, later.metrics)

    def record(self) -> dict[str, float | None]:
        return {"loss": self.loss, "lr": self.lr, "grad_norm": self.grad_norm,
                "tokens_per_s": self.tokens / self.seconds, **self.metrics}

    def progress_note(self) -> str:
        """The progress bar's words beside the loss: a pair objective's reward accuracy and margin."""
        if "rewards/accuracies" not in self.metrics:
            return ""
        return (f"  acc {self.metrics['rewards/accuracies']:.2f}  margin "
                f"{self.metrics['rewards/margins']:+.3f}")


def train_step(objective, batches: Batches | StreamBatches, step: int, cfg, accelerator, optimizer, scheduler, params,
               hooks: TrainingHooks) -> StepResult:
    """Optimizer step number ``step`` (1-based): its micro-batches are positions (step-1)·grad_accum + k.
    Loss and tokens are those of the whole step over all processes."""
    started = time.perf_counter()
    objective.train()
    micro = [batches.get((step - 1) * cfg.grad_accum + k) for k in range(cfg.grad_accum)]
    loss, metrics = accumulate_gradients(objective, [batch for batch, _ in micro], accelerator, hooks)
    grad_norm = full(accelerator.clip_grad_norm_(params, cfg.max_grad_norm)) if cfg.max_grad_norm else None
    lr = scheduler.get_last_lr()[0]
    if math.isfinite(loss):  # a non-finite step is reported by the caller and never applied
        optimizer.step()
        if not getattr(optimizer, "step_was_skipped", False):  # fp16 loss scaling skipped an overflowing step
            scheduler.step()
        hooks.on_step_end(step)  # the variant's schedule (AdaLoRA), with this step's gradients still there
    optimizer.zero_grad(set_to_none=True)
    tokens = int(sum_across([sum(n for _, n in micro)], accelerator.device)[0])
    return StepResult(loss, lr, None if grad_norm is None else float(grad_norm), tokens, time.perf_counter() - started,
                      metrics)


def non_finite_loss(loss: float, step: int, out: Path) -> LorafitError:
    last = latest_checkpoint(out)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    return LorafitError(f"loss became {loss} at step {step}; stopping ({kept}). "
                        "Lower train.lr or raise warmup_steps (with fp16, prefer bf16).")


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


def make_optimizer(name: str, params: list[torch.nn.Parameter] | list[dict[str, Any]], lr: float,
                   weight_decay: float):
    """AdamW from torch, or bitsandbytes' 8-bit / paged variants (8-bit states: 2 bytes per parameter
    instead of 8; paging only matters on CUDA, where it spills optimizer state to CPU memory). ``params``:
    tensors, or parameter groups with their own lr / weight_decay (LoRA+)."""
    if name == "adamw":
        # fused: one kernel over all tensors instead of a dozen ops per tensor (SmolLM2 all-linear has 420
        # LoRA tensors), the same default transformers' Trainer uses; plain AdamW where it does not exist.
        tensors = [p for group in params for p in group["params"]] if isinstance(params[0], dict) else params
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in tensors)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
    try:
        import bitsandbytes as bnb
    except Exception as err:  # bitsandbytes raises several types when its native library is missing
        raise LorafitError(f"train.optimizer: {name!r} needs a working bitsandbytes ({err}); use adamw") from None
    optimizers = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
                  "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}
    return optimizers[name](params, lr=lr, weight_decay=weight_decay)


def accumulate_gradients(objective, micro_batches: list[dict[str, torch.Tensor]], accelerator,
                         hooks: TrainingHooks | None = None) -> tuple[float, dict[str, float]]:
    """Backward over one optimizer step's micro-batches; returns the step's loss per trained token (and, for a
    pair objective, its loss and metrics per pair, weighted by pairs the same way).

    ``objective`` is a ``TokenLoss`` (as accelerate prepared it), or a pair objective (lorafit/objectives.py),
    which returns (mean loss over its pairs, metrics): it counts in ``pairs`` instead of trained tokens, its
    mean times the micro-batch's pairs standing for the sum. Each micro-batch's summed loss is divided
    by the trained tokens of the whole step — over all processes — so grad_accum=2 with B rows gives the
    same gradient as one batch of 2B rows, and N processes with B rows each the same as one with N·B (not a
    mean of per-batch means). DDP averages gradients over the N processes, hence the factor N. Gradients are
    all-reduced once, on the last micro-batch. A variant's regularization term joins each micro-batch's loss
    divided by their number: once per step. The returned loss is the language-model loss without that term
    (with an MoE router's auxiliary loss where the model's config asks for it, as transformers' loss has),
    comparable with eval loss.
    """
    device, world = accelerator.device, accelerator.num_processes
    pairs = not isinstance(accelerator.unwrap_model(objective), TokenLoss)
    weights = [pair_count(b) if pairs else trained_positions(b) for b in micro_batches]
    target_tokens = max(sum_across([sum(weights)], device)[0], 1)
    step_loss, sums = 0.0, {}
    for k, batch in enumerate(micro_batches):
        batch = {key: value.to(device) for key, value in batch.items()}
        with gradient_sync(objective, accelerator, enabled=k == len(micro_batches) - 1):
            with accelerator.autocast():  # around the loss too: the same precision as the model's forward
                loss = objective(**batch)
                if pairs:
                    loss, metrics = loss
                    loss = loss * weights[k]
                    for key, value in metrics.items():
                        sums[key] = sums.get(key, 0.0) + float(value) * weights[k]
                loss = loss / target_tokens
            step_loss += loss.item()
            penalty = hooks.regularization() if hooks is not None else None
            scaled = loss * world
            accelerator.backward(scaled if penalty is None else scaled + penalty / len(micro_batches))
    keys = sorted(sums)  # the same order in every process
    step_loss, *totals = sum_across([step_loss] + [sums[key] for key in keys], device)
    metrics = {key: total / target_tokens for key, total in zip(keys, totals, strict=True)}
    metrics.pop("loss", None)  # the step's loss, returned first
    return step_loss, metrics


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


