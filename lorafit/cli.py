"""The ``lorafit`` command line. Thin by design: parse arguments, call a module, show the result."""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from lorafit import __version__
from lorafit.config import DEFAULT_BASE, DataFormat, ModelDType, WeightsDType
from lorafit.errors import LorafitError
from lorafit.report import allocation_table, eval_table, memory_estimate, rank_table, summary_table, targeting_table

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
BaseArg = Annotated[str, typer.Argument(help="Base model: HF folder, hub id, .gguf file or pkg:PACKAGE/FILE.")]
AdapterArg = Annotated[Path, typer.Argument(help="Adapter folder (lorafit's or PEFT's).")]
DeviceOption = Annotated[
    str,
    typer.Option("--device", help="Where to compute: auto (a CUDA GPU when there is one, else the CPU; "
                 "LORAFIT_DEVICE overrides), cpu, cuda or cuda:N."),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe value, e.g. --set lora.r=8 (repeatable).", show_default=False),
]


def user_errors(command: F) -> F:
    """Show a LorafitError as one red message and exit 2; anything else is a bug and keeps its traceback.

    A write the machine refused (disk full, read-only folder, permission) that no writer named more
    precisely is also the user's to fix, so it gets the same treatment. LORAFIT_DEBUG=1 adds the traceback.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Exception as err:
            message = _user_message(err)
            if message is None:
                raise
            if os.environ.get("LORAFIT_DEBUG") == "1":
                error_console.print_exception()
            rank = os.environ.get("RANK", "0")  # set by torchrun / accelerate launch in each process
            where = "" if rank == "0" else f"(process {rank}) "
            error_console.print(f"[bold red]error:[/] {where}{escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            error_console.print("[bold red]interrupted[/]")
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def _user_message(err: Exception) -> str | None:
    """The message for an error the user can act on; None for a bug in lorafit."""
    from lorafit.files import machine_write_problem

    if isinstance(err, LorafitError):
        return str(err)
    problem = machine_write_problem(err)
    if problem is None:
        return None
    where = getattr(err, "filename", None)
    return f"could not write{f' {where}' if where else ''}: {problem}"


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
def plan(
    recipe: RecipeArg,
    overrides: SetOption = None,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Show the batch of a run over N processes.")] = 1,
) -> None:
    """Load the base model, inject LoRA as the recipe says, and show what would train. Writes nothing.

    Loads (and runs a rank allocation's statistics pass) where train would: a CUDA GPU when there is one."""
    from lorafit import loraplus, precision
    from lorafit.adapters import saved_modules, tokens
    from lorafit.config import load_recipe
    from lorafit.device import compute_device
    from lorafit.model import load_base_model
    from lorafit.quant import cpu_4bit_layout
    from lorafit.train import BatchShape, inject_adapters, recipe_tokenizer, resolve_precision, training_data

    # The parts of train's prepare that need no optimizer and write nothing (lorafit/train.py).
    loaded, chosen = resolve_precision(load_recipe(recipe, overrides))
    device = compute_device()
    start = time.perf_counter()
    with console.status(f"loading {loaded.model.base} ..."):
        # A rank allocation runs forward passes: in the layout training uses, so it gives train's ranks.
        model = load_base_model(loaded.model, training=loaded.lora.rank_allocation is not None, device=device)
    load_seconds = time.perf_counter() - start
    # A rank allocation's statistics come from train's first batches, on the device train uses.
    tokenizer, token_ids = recipe_tokenizer(loaded)
    batches = training_data(loaded, tokenizer)[2] if loaded.lora.rank_allocation else None
    report, allocation = inject_adapters(model, loaded, device, batches, console, show_allocation=False,
                                         tokens=token_ids)
    memory = memory_estimate(model, report.trainable, loaded.train.optimizer, loaded.model.quantize)
    console.print(
        f"base [bold]{loaded.model.base}[/] ({type(model).__name__}, {loaded.model.dtype}, "
        f"loaded in {load_seconds:.1f}s)\n{_variant_line(loaded.lora)}\n{chosen.describe()}",
        highlight=False,
    )
    warning = precision.emulated_bf16_warning(chosen)
    if warning:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if loaded.model.quantize == "4bit":
        console.print(cpu_4bit_layout(model).describe(), highlight=False)
    if allocation is not None:
        console.print(allocation_table(allocation, loaded.lora.rank_allocation))
    console.print(targeting_table(report))
    console.print(memory)
    console.print(BatchShape.of(loaded.train, nproc).plan_line(), highlight=False)
    for line in (saved_modules.describe(model), tokens.describe(model), loraplus.describe(model, loaded.train)):
        if line:
            console.print(line, highlight=False)


def _check_output_file(path: Path, option: str) -> None:
    """A file the command will write: not a folder, and inside a folder (or a place one can be made)."""
    if path.is_dir():
        raise LorafitError(f"{option} {path} is a folder; give a file path, e.g. {path / 'results.json'}")
    blocker = next((parent for parent in path.parents if parent.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise LorafitError(f"{option} {path}: {blocker} is a file, so no folder can hold this path")


def _variant_line(lora) -> str:
    """The method and its settings, as ``plan`` prints them (each method's own line: lorafit/adapters)."""
    from lorafit.adapters import REGISTRY

    return REGISTRY[lora.variant].describe(lora)


@app.command()
@user_errors
def merge(
    base: BaseArg,
    adapter: AdapterArg,
    out: Annotated[Path, typer.Argument(help="Folder to write the merged model to.")],
    dtype: Annotated[WeightsDType, typer.Option(help="Weights dtype of the merged model.")] = "bfloat16",
    max_shard_size: Annotated[str, typer.Option(help="Largest safetensors file, e.g. 2GB or 500MB.")] = "2GB",
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty OUT.")] = False,
    verify: Annotated[bool, typer.Option(help="Compare merged logits with base + adapter.")] = True,
    trust_remote_code: Annotated[
        bool, typer.Option(help="Allow a base whose architecture is code shipped with it (read that code first).")
    ] = False,
) -> None:
    """Merge an adapter into full base weights that plain transformers loads (no lorafit needed).

    Runs on the CPU by design, whatever GPU there is: weights stream shard by shard from file to file, and the
    check compares with base + adapter in fp32, which a consumer GPU often cannot hold."""
    from lorafit.merge import merge_adapter

    with console.status("merging ..."):
        result = merge_adapter(base, adapter, out, dtype, max_shard_size, overwrite, verify, trust_remote_code)
    console.print(f"merged {result.merged_modules} modules into {result.out} ({result.shards} shard"
                  f"{'s' if result.shards > 1 else ''}, {dtype})", highlight=False)
    if result.max_logit_diff is not None:
        floor = "" if dtype == "float32" else (f"; {dtype} rounding alone moves the base model's logits by up to "
                                                f"{result.rounding_floor:.2e}")
        console.print(f"verified: max |logit difference| vs base + adapter in fp32 = {result.max_logit_diff:.2e}"
                      f"{floor}", highlight=False)


@app.command()
@user_errors
def export(
    base: BaseArg,
    adapter: AdapterArg,
    out: Annotated[Path, typer.Argument(help="The .gguf file to write.")],
    dtype: Annotated[
        Literal["f32", "f16", "bf16", "q8_0"], typer.Option(help="Tensor type of the matrices (norms stay f32).")
    ] = "f16",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT.")] = False,
    verify: Annotated[bool, typer.Option(help="Read the file back and compare logits and tokens.")] = True,
    adapter_only: Annotated[
        bool, typer.Option("--adapter-only", help="Write only the adapter, for llama.cpp's --lora (Ollama: ADAPTER).")
    ] = False,
) -> None:
    """Write base + adapter as one GGUF file for llama.cpp and Ollama (Llama-family models), checked by reading it
    back.

    Runs on the CPU by design, whatever GPU there is: the check compares with base + adapter in fp32."""
    from lorafit.export import export_gguf

    with console.status("exporting ..."):
        result = export_gguf(base, adapter, out, dtype, overwrite, verify, adapter_only)
    size = result.out.stat().st_size / 2**20
    if adapter_only:
        console.print(f"wrote {result.out} ({size:.2f} MiB: lora_a/lora_b for {result.tensors // 2} of "
                      f"{result.merged_modules} modules, {dtype})", highlight=False)
        console.print(f"self-check: ΔW rebuilt from the file as llama.cpp does (alpha / r · B @ A) vs the adapter's: "
                      f"max |difference| {result.max_delta_error:.2e} ({dtype} rounding alone: "
                      f"{result.rounding_floor:.2e})", highlight=False)
        console.print(f"use: llama-cli -m BASE.gguf --lora {result.out}; Ollama: {result.modelfile} (FROM the base, "
                      f"ADAPTER {result.out.name}; {result.modelfile_note}): ollama create NAME -f {result.modelfile}",
                      highlight=False)
        return
    console.print(f"wrote {result.out} ({size:.1f} MiB, {result.tensors} tensors, {result.merged_modules} adapted "
                  f"modules merged, {dtype}, pre-tokenizer {result.pre_tokenizer})", highlight=False)
    console.print(f"Ollama: {result.modelfile} ({result.modelfile_note}); ollama create NAME -f {result.modelfile}",
                  highlight=False)
    if result.max_logit_diff is not None:
        console.print(f"self-check: max |logit difference| vs base + adapter in fp32 = {result.max_logit_diff:.2e} "
                      f"({dtype} rounding alone: {result.rounding_floor:.2e}); llama.cpp's loader rules hold; the "
                      f"vocabulary read back, split as llama.cpp splits for {result.pre_tokenizer!r}, encodes the "
                      "sample texts and a chat prompt to the same ids as the base", highlight=False)


@app.command(name="eval")
@user_errors
def eval_command(
    recipe: Annotated[
        Path | None, typer.Argument(help="Recipe: its base, its OUT/adapter and its eval data.", show_default=False)
    ] = None,
    base: Annotated[str | None, typer.Option(help="Base model (any form model.base accepts).")] = None,
    adapters: Annotated[
        list[Path] | None, typer.Option("--adapter", help="Adapter folder; repeat to compare several.")
    ] = None,
    data: Annotated[str | None, typer.Option(help="Eval data file (or hub dataset).")] = None,
    data_format: Annotated[DataFormat, typer.Option("--format", help="Format of the data rows.")] = (
        "prompt_completion"
    ),
    metrics: Annotated[list[str] | None, typer.Option(
        "--metric", help="loss and/or exact_match (repeat). On preference data loss also gives preference "
        "accuracy and margin.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Generation length for exact_match.", min=1)] = 32,
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N examples.", min=1)] = None,
    dtype: Annotated[ModelDType, typer.Option(help="Base model dtype.")] = "float32",
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON.")] = None,
    device: DeviceOption = "auto",
) -> None:
    """Compare the base model with one or more adapters: loss/perplexity and exact-match generation."""
    from lorafit.evaluate import eval_plan, run_eval
    from lorafit.files import refuse_overlap, write_text_atomic

    if json_path is not None:  # before minutes of evaluation, not after
        _check_output_file(json_path, "--json")
    plan = eval_plan(recipe, base, adapters or [], data, data_format, dtype, metrics or ["loss", "exact_match"],
                     device)
    if json_path is not None:
        refuse_overlap(json_path, "--json", plan.inputs())
    with console.status("evaluating ..."):
        results = run_eval(plan, limit, max_new_tokens)
    console.print(eval_table(results))
    if json_path is not None:
        write_text_atomic(json_path, json.dumps({"results": [r.to_json() for r in results]}, indent=2) + "\n")


@app.command()
@user_errors
def generate(
    base: Annotated[str, typer.Option(help="Base model (any form model.base accepts).")] = DEFAULT_BASE,
    adapter: Annotated[Path | None, typer.Option(help="Adapter folder to apply.")] = None,
    prompt: Annotated[str | None, typer.Argument(help="One prompt; omit with --chat.", show_default=False)] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Interactive chat that keeps the history.")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer in tokens.", min=1)] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy; > 0 samples.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass when temperature > 0.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    dtype: Annotated[ModelDType, typer.Option(help="Base model dtype.")] = "float32",
    device: DeviceOption = "auto",
) -> None:
    """Generate with the base model (and an adapter), streaming tokens; --chat for a conversation."""
    from lorafit.config import ModelConfig
    from lorafit.generate import Generator

    if prompt is None and not chat:
        raise LorafitError("give a PROMPT, or --chat for an interactive conversation")
    if temperature < 0 or not 0 < top_p <= 1:
        raise LorafitError("--temperature must be >= 0 and --top-p in (0, 1]")
    generator = Generator(ModelConfig(base=base, dtype=dtype), adapter, device)
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    stream = functools.partial(print, end="", flush=True)
    history: list[dict[str, str]] = []
    if prompt is not None:
        history.append({"role": "user", "content": prompt})
        history.append({"role": "assistant", "content": generator.reply(history, stream, **settings)})
        print()
    while chat:
        try:
            text = input("you> ")
        except EOFError:
            break
        if text.strip() in ("/exit", "/quit"):
            break
        history.append({"role": "user", "content": text})
        history.append({"role": "assistant", "content": generator.reply(history, stream, **settings)})
        print()


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
    nproc: Annotated[
        int | None,
        typer.Option("--nproc", min=1, show_default=False,
                     help="Train as N data-parallel processes on this machine (accelerate's launcher; one per GPU)."),
    ] = None,
) -> None:
    """Fine-tune the recipe's base model with LoRA; writes the adapter, checkpoints, metrics and a loss plot."""
    from lorafit.config import load_recipe
    from lorafit.train import train as run_training

    loaded = load_recipe(recipe, overrides)  # checked here once, before any process starts
    if nproc is not None and nproc > 1:
        from lorafit.distributed import launch

        args = [str(recipe), *(f"--set={item}" for item in overrides or []),
                *(["--resume"] if resume else []), *([f"--resume-from={resume_from}"] if resume_from else [])]
        code = launch(nproc, args)
        if code:
            raise typer.Exit(code=code)  # each process printed its own message
        return
    summary = run_training(loaded, str(resume_from) if resume_from else ("latest" if resume else None), console)
    if not summary.main_process:
        return
    console.print(summary_table(summary))
    if summary.ranks is not None:
        console.print(rank_table(summary.ranks, f"rank per module at the end ({sum(summary.ranks.values())} in all; "
                                                "heat map: OUT/ranks.png)"))
