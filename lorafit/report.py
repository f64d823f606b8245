"""Rich tables shared by `plan` and `train`: what gets trained, and how a run went."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

if TYPE_CHECKING:
    from lorafit.evaluate import EvalResult
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
    for column in ("module", "count", "r", "alpha", "trainable params"):
        table.add_column(column, justify="left" if column == "module" else "right")
    for kind, count in report.kinds.items():
        settings = sorted(report.kind_settings.get(kind, ()))
        ranks = ", ".join(str(r) for r in sorted({r for r, _ in settings}))
        alphas = ", ".join(f"{a:g}" for a in sorted({a for _, a in settings}))
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


def eval_table(results: list[EvalResult]) -> Table:
    """Base first, then each adapter, with its change against the base."""
    base = results[0]
    table = Table(title="evaluation", title_justify="left")
    for column in ("model", "loss", "Δ loss", "perplexity", "exact match", "Δ exact", "n"):
        table.add_column(column, justify="left" if column == "model" else "right", overflow="fold")
    for result in results:
        is_base = result is base
        table.add_row(
            result.name,
            _num(result.loss),
            "" if is_base else _delta(result.loss, base.loss),
            _num(result.perplexity, "{:.3f}"),
            "-" if result.exact_match is None else f"{result.exact_match:.1%}",
            "" if is_base else _delta(result.exact_match, base.exact_match, percent=True),
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
