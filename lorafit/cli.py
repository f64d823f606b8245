"""The ``lorafit`` command line. Thin by design: parse arguments, call a module, show the result."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from lorafit import __version__
from lorafit.errors import LorafitError
from lorafit.report import summary_table, targeting_table

app = typer.Typer(
    help="Fine-tune Hugging Face causal language models with LoRA from one YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
error_console = Console(stderr=True)
F = TypeVar("F", bound=Callable)

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file (see configs/).", show_default=False)]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe value, e.g. --set lora.r=8 (repeatable).", show_default=False),
]


def user_errors(command: F) -> F:
    """Show a LorafitError as one red message and exit 2; anything else is a bug and keeps its traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except LorafitError as err:
            error_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            error_console.print("[bold red]interrupted[/]")
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        console.print(f"lorafit {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Fine-tune Hugging Face causal language models with LoRA from one YAML recipe."""
    # lorafit draws its own progress; the libraries' per-file bars would only interleave with it.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@app.command()
@user_errors
def plan(recipe: RecipeArg, overrides: SetOption = None) -> None:
    """Load the base model, inject LoRA as the recipe says, and show what would train. Writes nothing."""
    from lorafit.config import load_recipe
    from lorafit.inject import inject_lora
    from lorafit.model import load_base_model

    loaded = load_recipe(recipe, overrides)
    start = time.perf_counter()
    with console.status(f"loading {loaded.model.base} ..."):
        model = load_base_model(loaded.model)
    load_seconds = time.perf_counter() - start
    report = inject_lora(model, loaded.lora)
    lora = loaded.lora
    console.print(
        f"base [bold]{loaded.model.base}[/] ({type(model).__name__}, {loaded.model.dtype}, "
        f"loaded in {load_seconds:.1f}s)\n"
        f"LoRA r={lora.r} alpha={lora.alpha:g} scaling={lora.alpha / lora.r:g} dropout={lora.dropout:g}",
        highlight=False,
    )
    console.print(targeting_table(report))


@app.command()
@user_errors
def merge(
    base: Annotated[str, typer.Argument(help="Base model: HF folder, hub id, .gguf file or pkg:PACKAGE/FILE.")],
    adapter: Annotated[Path, typer.Argument(help="Adapter folder (lorafit's or PEFT's).")],
    out: Annotated[Path, typer.Argument(help="Folder to write the merged model to.")],
    dtype: Annotated[str, typer.Option(help="Weights dtype: bfloat16, float16 or float32.")] = "bfloat16",
    max_shard_size: Annotated[str, typer.Option(help="Largest safetensors file, e.g. 2GB or 500MB.")] = "2GB",
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty OUT.")] = False,
    verify: Annotated[bool, typer.Option(help="Compare merged logits with base + adapter.")] = True,
) -> None:
    """Merge an adapter into full base weights that plain transformers loads (no lorafit needed)."""
    from lorafit.merge import merge_adapter

    with console.status("merging ..."):
        result = merge_adapter(base, adapter, out, dtype, max_shard_size, overwrite, verify)
    console.print(f"merged {result.merged_modules} modules into {result.out} ({result.shards} shard"
                  f"{'s' if result.shards > 1 else ''}, {dtype})", highlight=False)
    if result.max_logit_diff is not None:
        console.print(f"verified: max |logit difference| vs base + adapter (fp32) = {result.max_logit_diff:.2e}",
                      highlight=False)


@app.command()
@user_errors
def train(
    recipe: RecipeArg,
    overrides: SetOption = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the latest checkpoint in output.dir.")
    ] = False,
    resume_from: Annotated[
        Path | None, typer.Option("--resume-from", help="Continue from this checkpoint folder.", show_default=False)
    ] = None,
) -> None:
    """Fine-tune the recipe's base model with LoRA; writes the adapter, checkpoints, metrics and a loss plot."""
    from lorafit.config import load_recipe
    from lorafit.train import train as run_training

    loaded = load_recipe(recipe, overrides)
    summary = run_training(loaded, str(resume_from) if resume_from else ("latest" if resume else None), console)
    console.print(summary_table(summary))
