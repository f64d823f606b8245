"""Rich tables shared by `plan` and `train`: what gets trained, and how a run went."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

if TYPE_CHECKING:
    from lorafit.inject import InjectionReport
    from lorafit.train import RunSummary


def summary_table(summary: RunSummary) -> Table:
    table = Table(title="run summary", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    fmt = lambda value: "-" if value is None else f"{value:.4f}"  # noqa: E731
    table.add_row("steps", str(summary.steps))
    table.add_row("final train loss", fmt(summary.train_loss))
    if summary.eval_data is not None:
        table.add_row("eval loss", f"{fmt(summary.base_eval_loss)} (base) -> {fmt(summary.eval_loss)} (adapter)")
    table.add_row("wall time", f"{summary.wall_seconds:.1f} s")
    table.add_row("throughput", f"{summary.tokens_per_second:,.0f} tokens/s (training steps only)")
    table.add_row("peak memory", f"{summary.peak_memory_bytes / 2**30:.2f} GiB")
    table.add_row("adapter", str(summary.adapter_dir))
    return table


def targeting_table(report: InjectionReport) -> Table:
    """Module kinds wrapped, how many, and the parameters they add (shared with `train` later)."""
    table = Table(title="LoRA targets", title_justify="left")
    table.add_column("module")
    table.add_column("count", justify="right")
    table.add_column("trainable params", justify="right")
    for kind, count in report.kinds.items():
        table.add_row(kind, str(count), f"{report.kind_params[kind]:,}")
    table.add_section()
    table.add_row(
        "[bold]total[/]",
        str(sum(report.kinds.values())),
        f"[bold]{report.trainable:,}[/] of {report.total:,} ({report.trainable_percent:.3f}%)",
    )
    return table
