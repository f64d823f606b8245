"""What the user sees of a run and writes down: tables for `plan`, `train` and `eval`, the progress bar,
metrics.jsonl, the loss plot and the run summary.

The CLI imports this module for every command, `--help` included, so torch and the rest of lorafit are
only imported for type checking or inside the functions that need them.
"""

from __future__ import annotations

import json
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

if TYPE_CHECKING:
    import torch
    from rich.console import Console

    from lorafit.config import RankAllocationConfig
    from lorafit.data import TokenizedData
    from lorafit.eva import RankAllocation
    from lorafit.evaluate import EvalResult
    from lorafit.inject import InjectionReport


@dataclass
class RunSummary:
    adapter_dir: Path
    steps: int
    train_loss: float | None
    eval_loss: float | None
    base_eval_loss: float | None  # step 0's: the model the run started from (``start``)
    wall_seconds: float
    tokens_per_second: float
    peak_memory_bytes: int
    report: InjectionReport
    train_data: TokenizedData | None  # None: streamed
    eval_data: TokenizedData | None
    ranks: dict[str, int] | None = None  # final rank per module, when the run chose them (EVA, AdaLoRA)
    main_process: bool = True  # the process that wrote the files and shows the summary
    world_size: int = 1  # processes that trained together
    parallelism: str = ""  # with several: how (DDP/FSDP) and the batch per process and in all
    start: str = "base model"  # what step 0 scored (``start_label``)


class MetricsLog:
    """metrics.jsonl: one JSON object per event, flushed at once so a crash loses nothing logged; each event
    also goes to the run's trackers (``train.report_to``). ``path`` None: a process that is not the main one
    logs nothing."""

    def __init__(self, path: Path | None, trackers=None):
        self.path, self.trackers = path, trackers

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.log(record)


def summary_table(summary: RunSummary) -> Table:
    table = Table(title="run summary", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    fmt = lambda value: "-" if value is None else f"{value:.4f}"  # noqa: E731
    table.add_row("steps", str(summary.steps))
    table.add_row("final train loss", fmt(summary.train_loss))
    if summary.eval_data is not None:
        start = summary.start.removesuffix(" model")
        table.add_row("eval loss", f"{fmt(summary.base_eval_loss)} ({start}) -> {fmt(summary.eval_loss)} (adapter)")
    table.add_row("wall time", f"{summary.wall_seconds:.1f} s")
    processes = f", all {summary.world_size} processes together" if summary.world_size > 1 else ""
    table.add_row("throughput", f"{summary.tokens_per_second:,.0f} tokens/s (training steps only{processes})")
    if summary.world_size > 1:
        table.add_row("processes", summary.parallelism)
    table.add_row("peak memory", f"{summary.peak_memory_bytes / 2**30:.2f} GiB")
    table.add_row("adapter", str(summary.adapter_dir))
    return table


def targeting_table(report: InjectionReport) -> Table:
    """Module kinds wrapped, how many, and the parameters they add (shared with `train` later)."""
    table = Table(title="LoRA targets", title_justify="left")
    for column in ("module", "count", "r", "alpha", "trainable params"):
        table.add_column(column, justify="left" if column == "module" else "right")
    for kind, count in report.kinds.items():
        settings = report.kind_settings.get(kind, set())
        ranks = _values({r for r, _ in settings})
        if report.kind_experts[kind]:  # MoE: a rank-r update for each expert
            ranks = f"{ranks} x {report.kind_experts[kind]} experts"
        alphas = _values({a for _, a in settings})
        table.add_row(kind, str(count), ranks, alphas, f"{report.kind_params[kind]:,}")
    table.add_section()
    table.add_row(
        "[bold]total[/]",
        str(sum(report.kinds.values())),
        "",
        "",
        f"[bold]{report.trainable:,}[/] of {report.total:,} ({report.trainable_percent:.3f}%)",
    )
    return table


def _values(values: set[float | None]) -> str:
    """A few values listed, many (per-layer ranks) as their range; none (VeRA's alpha) as a dash."""
    ordered = sorted(value for value in values if value is not None)
    if not ordered:
        return "—"
    if len(ordered) > 3:
        return f"{ordered[0]:g}–{ordered[-1]:g}"
    return ", ".join(f"{value:g}" for value in ordered)


def allocation_table(allocation: RankAllocation, settings: RankAllocationConfig) -> Table:
    """The allocated rank of every targeted module, with how the allocation went in the title."""
    spent = sum(allocation.ranks.values())
    unadapted = sum(rank == 0 for rank in allocation.ranks.values())
    converged = ("all converged" if not allocation.unconverged
                 else f"{len(allocation.unconverged)} modules not converged at max_batches")
    return rank_table(allocation.ranks, f"rank allocation ({settings.method}, rho={settings.rho:g}): {spent} of "
                                        f"budget {allocation.budget} over {len(allocation.ranks)} modules, "
                                        f"{unadapted} left unadapted; {allocation.batches} batches, {converged}")


def rank_grid(ranks: dict[str, int]) -> tuple[list[str], list[str], list[list[int | None]]]:
    """(layer labels, module kinds, rank per layer x kind; None where a layer has no such module)."""
    from lorafit.targets import layer_index

    kinds = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in ranks))
    rows: dict[str, dict[str, int]] = {}
    for name, rank in ranks.items():
        index = layer_index(name)
        rows.setdefault(name.rsplit(".", 1)[0] if index is None else str(index), {})[name.rsplit(".", 1)[-1]] = rank
    return list(rows), kinds, [[row.get(kind) for kind in kinds] for row in rows.values()]


def rank_table(ranks: dict[str, int], title: str) -> Table:
    """Rank per targeted module: one row per decoder layer, one column per module kind."""
    layers, kinds, grid = rank_grid(ranks)
    table = Table(title=title, title_justify="left")
    table.add_column("layer")
    for kind in kinds:
        table.add_column(kind, justify="right")
    for layer, row in zip(layers, grid, strict=True):
        table.add_row(layer, *("" if rank is None else str(rank) for rank in row))
    return table


def plot_ranks(ranks: dict[str, int], png_path: Path, title: str) -> None:
    """A heat map of rank per layer (rows) x module kind (columns), each cell labelled with its rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers, kinds, grid = rank_grid(ranks)
    values = np.array([[np.nan if rank is None else rank for rank in row] for row in grid], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(kinds), 1.2 + 0.28 * len(layers)))
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), layers)
    ax.set_ylabel("layer")
    for (row, col), value in np.ndenumerate(values):
        if not np.isnan(value):
            ax.text(col, row, f"{value:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if value < np.nanmax(values) / 2 else "black")
    fig.colorbar(image, ax=ax, label="rank")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def eval_table(results: list[EvalResult]) -> Table:
    """Base first, then each adapter, with its change against the base."""
    base = results[0]
    pairs = base.preference_accuracy is not None  # preference data: accuracy and margin columns too
    table = Table(title="evaluation", title_justify="left")
    columns = ("model", "loss", "Δ loss", "perplexity", "exact match", "Δ exact",
               *(("pref. accuracy", "Δ pref.", "margin") if pairs else ()), "n")
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right", overflow="fold")
    for result in results:
        is_base = result is base
        preference = (f"{result.preference_accuracy:.1%}",
                      "" if is_base else _delta(result.preference_accuracy, base.preference_accuracy, percent=True),
                      f"{result.preference_margin:+.3f}") if pairs else ()
        table.add_row(
            result.name,
            _num(result.loss),
            "" if is_base else _delta(result.loss, base.loss),
            _num(result.perplexity, "{:.3f}"),
            "-" if result.exact_match is None else f"{result.exact_match:.1%}",
            "" if is_base else _delta(result.exact_match, base.exact_match, percent=True),
            *preference,
            str(result.n),
        )
    return table


def _num(value: float | None, pattern: str = "{:.4f}") -> str:
    return "-" if value is None else pattern.format(value)


def _delta(value: float | None, reference: float | None, percent: bool = False) -> str:
    if value is None or reference is None:
        return "-"
    change = value - reference
    return f"{change * 100:+.1f} pts" if percent else f"{change:+.4f}"


# Bytes of optimizer state per trainable parameter: two fp32 moments, or two 8-bit moments.
_OPTIMIZER_BYTES = {"adamw": 8, "paged_adamw_32bit": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2}


def memory_estimate(model, trainable: int, optimizer: str, quantize: str | None) -> Table:
    """Weights of the base as loaded vs in 16 bit, and the trainable state (fp32 weights + grads +
    optimizer moments). Activations come on top and depend on batch size and sequence length."""
    from lorafit.quant import base_memory

    actual, sixteen_bit = base_memory(model)
    state = trainable * (4 + 4 + _OPTIMIZER_BYTES[optimizer])
    table = Table(title="memory estimate (before activations)", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column()
    label = f"base weights ({quantize or 'as loaded'})"
    table.add_row(label, _gib(actual), f"{actual / sixteen_bit:.2f}x of 16-bit" if sixteen_bit else "")
    table.add_row("base weights (16-bit)", _gib(sixteen_bit), "")
    table.add_row(f"trainable state ({optimizer})", _gib(state), "fp32 weights + grads + optimizer moments")
    return table


def _gib(size: int) -> str:
    return f"{size / 2**30:.3f} GiB"


def make_progress(console: Console, total: int, completed: int, world_size: int = 1):
    """The step bar; with several processes it says how many (tokens/s is then theirs together)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    label = "[bold]train" + (f" x{world_size} processes" if world_size > 1 else "")
    progress = Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}{task.fields[extra]}  lr {task.fields[lr]:.2e}  "
                   "{task.fields[tps]:.0f} tok/s"),
        TimeRemainingColumn(), console=console, transient=False,
    )
    progress.add_task("train", total=total, completed=completed, loss=float("nan"), lr=0.0, tps=0.0, extra="")
    return progress


def report_data(console: Console, train_data: TokenizedData | None, eval_data: TokenizedData | None,
                source: str = "") -> None:
    """How many examples and trained tokens each set has, and what truncating and skipping did (``train_data``
    None: streamed, counted as it is read)."""
    if train_data is None:
        console.print(f"train: streamed from {source}, tokenized as training reads it", highlight=False)
    for name, data in (("train", train_data), ("eval", eval_data)):
        if data is None:
            continue
        counts = ((data.truncated, "truncated"), (data.skipped, "skipped"))
        notes = [f"{count} {what}" for count, what in counts if count]
        extra = f" ({', '.join(notes)} at data.max_seq_len)" if notes else ""
        console.print(f"{name}: {len(data.examples):,} examples of {data.rows:,} rows read, {data.trained_tokens:,} "
                      f"trained tokens, from {data.source}{extra}", highlight=False)


# What the loss plotted in loss.png is, per train.objective (the y axis).
LOSS_LABELS = {"sft": "loss per trained token", "dpo": "DPO loss per pair (log 2 = 0.693 at the start)",
               "orpo": "ORPO loss: chosen NLL per token - λ·log σ(log odds)"}


def start_label(objective: str, init_from: str | None) -> str:
    """What a run's step-0 eval scores: the model training starts from (with DPO also its reference, so DPO's
    loss there is log 2 whatever the data)."""
    start = "starting adapter" if init_from else "base model"
    return f"{start} = DPO's reference" if objective == "dpo" else start


def plot_losses(metrics_path: Path, png_path: Path, objective: str = "sft") -> None:
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
    ax.set_ylabel(LOSS_LABELS[objective])
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def peak_memory(device: torch.device) -> int:
    """Peak GPU memory allocated by torch on CUDA; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
