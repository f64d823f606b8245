"""Base model and tokenizer loading from every place ``model.base`` may point to.

Forms: a local Hugging Face folder, a hub id (needs network), a ``.gguf`` file, or ``pkg:PACKAGE/FILE``
(a file shipped inside an installed Python package, which is how the offline default model arrives).
GGUF files are converted once into a cached Hugging Face folder (see ``converted_gguf``).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit import precision
from lorafit.attention import use_fp32_attention
from lorafit.config import ModelConfig, locate_package_file
from lorafit.errors import LorafitError
from lorafit.files import atomic_dir
from lorafit.quant import compute_residual_in_fp32, own_unquantized_weights, quantization_config, set_cpu_4bit_layout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BaseSource:
    """Where transformers should look: a folder or hub id, plus the GGUF file name inside it if any."""

    location: str
    gguf_file: str | None = None


def resolve_base(base: str) -> BaseSource:
    """Turn a ``model.base`` string into something ``from_pretrained`` understands."""
    if base.startswith("pkg:"):
        file = locate_package_file(base)
        return BaseSource(str(file.parent), file.name)
    path = Path(base).expanduser()
    if base.endswith(".gguf"):
        if not path.is_file():
            raise LorafitError(f"model.base: GGUF file {base} does not exist")
        return BaseSource(str(path.resolve().parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LorafitError(f"model.base: folder {base} has no config.json, so it is not a Hugging Face model")
        return BaseSource(str(path.resolve()))
    return BaseSource(base)  # a hub id; from_pretrained reports if it cannot be reached


def cache_dir() -> Path:
    """Where converted models are kept: $LORAFIT_CACHE, else $XDG_CACHE_HOME/lorafit, else ~/.cache/lorafit."""
    if os.environ.get("LORAFIT_CACHE"):
        return Path(os.environ["LORAFIT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "lorafit"


def local_source(model_cfg: ModelConfig) -> BaseSource:
    """The folder to load from: GGUF files are converted once to a plain Hugging Face folder and reused."""
    source = resolve_base(model_cfg.base)
    return BaseSource(str(converted_gguf(source, model_cfg))) if source.gguf_file else source


def converted_gguf(source: BaseSource, model_cfg: ModelConfig) -> Path:
    """De-quantize a GGUF file into fp32 safetensors + tokenizer files, once, in the cache.

    Reading GGUF costs ~35 s for SmolLM2-135M on a 2-core CPU (de-quantizing every tensor and converting
    the tokenizer); the converted folder loads in ~1 s. fp32 holds the de-quantized values exactly. The
    cache key is the file's name, size and modification time, so a changed file is converted again.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(source.location) / str(source.gguf_file)
    stat = gguf.stat()
    folder = cache_dir() / "gguf" / f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if (folder / "config.json").is_file():
        return folder
    extra = {"gguf_file": source.gguf_file, "trust_remote_code": model_cfg.trust_remote_code}
    try:
        # Packed GGUF layers (kept packed by transformers >= 5 when a kernel exists) cannot be wrapped or
        # trained, so ask for plain dense weights explicitly.
        from transformers import GgufConfig

        model_extra = {**extra, "quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # transformers 4.x always de-quantizes GGUF
        model_extra = extra
    model = _from_pretrained(AutoModelForCausalLM, source.location, model_cfg.base, dtype=torch.float32, **model_extra)
    tokenizer = _from_pretrained(AutoTokenizer, source.location, model_cfg.base, **extra)
    # The weights are dense now; drop the GGUF marker so the folder saves and loads like any model.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    with atomic_dir(folder, "the converted GGUF model") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def load_tokenizer(model_cfg: ModelConfig, own: Path | None = None):
    """The base model's tokenizer — or the one saved in the adapter folder ``own`` (a run that added tokens saves
    its tokenizer with the adapter; ``adapter_tokenizer`` picks it) — with a pad token that is safe for training.

    Labels are always built from sequence lengths, never by comparing ids with ``pad_token_id``, so a
    pad token equal to EOS (SmolLM2 ships that way) can never hide the EOS we want the model to learn.
    When the tokenizer has no pad token at all we prefer ``unk`` over EOS for the same reason.
    """
    from transformers import AutoTokenizer

    if own is not None:
        tokenizer = AutoTokenizer.from_pretrained(own, trust_remote_code=model_cfg.trust_remote_code)
    else:
        source = local_source(model_cfg)
        tokenizer = _from_pretrained(
            AutoTokenizer, source.location, model_cfg.base, trust_remote_code=model_cfg.trust_remote_code
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


TOKENIZER_FILE = "tokenizer_config.json"


def adapter_tokenizer(adapters: list[Path] | tuple[Path, ...]) -> Path | None:
    """The adapter folder whose tokenizer to use (None: the base's). Adapters that carry tokenizers must carry
    the same vocabulary: one tokenizer reads the data for all of them."""
    owners = [Path(a) for a in adapters if (Path(a) / TOKENIZER_FILE).is_file()]
    if len(owners) < 2:
        return owners[0] if owners else None
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(owners[0]).get_vocab()
    other = next((a for a in owners[1:] if AutoTokenizer.from_pretrained(a).get_vocab() != vocab), None)
    if other is not None:
        raise LorafitError(f"adapters {owners[0]} and {other} carry tokenizers with different vocabularies "
                           "(data.add_special_tokens differed); evaluate them in separate runs")
    return owners[0]


def load_base_model(model_cfg: ModelConfig, training: bool = False,
                    device: torch.device | str = "cpu") -> torch.nn.Module:
    """The frozen base causal LM in the recipe's dtype (``auto``: see lorafit.precision), on ``device``
    (commands pass ``lorafit.device.compute_device()``; the default keeps library calls on the CPU).

    A 4/8-bit base is quantized on ``device`` itself (``device_map``: bitsandbytes packs the weights where they
    run, and without a map transformers would put them on a GPU whatever the caller computes on); other bases
    load on the CPU and move. ``training`` keeps a 4-bit base in the layout it trains with on every CPU (see
    ``set_cpu_4bit_layout``).
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    source = local_source(model_cfg)
    dtype = resolve_model_dtype(model_cfg)
    extra = {}
    if model_cfg.quantize:
        extra["quantization_config"] = quantization_config(
            model_cfg.quantize, model_cfg.quant_type, model_cfg.double_quant, DTYPES[dtype])
        extra["device_map"] = {"": device}
    model = _from_pretrained(
        AutoModelForCausalLM,
        source.location,
        model_cfg.base,
        dtype=DTYPES[dtype],
        trust_remote_code=model_cfg.trust_remote_code,
        **extra,
    )
    model.requires_grad_(False)
    if model_cfg.quantize:
        compute_residual_in_fp32(model)
        own_unquantized_weights(model)  # lets go of the checkpoint's memory map
        release_freed_memory()
        set_cpu_4bit_layout(model, training)
    else:
        model.to(device)
    use_fp32_attention(model)  # CPU: 16-bit attention runs its kernel in fp32 (faster there: lorafit/attention.py)
    return model


def resolve_model_dtype(model_cfg: ModelConfig) -> str:
    """``model.dtype``, with ``auto`` turned into this machine's choice (bf16 where native, else fp32)."""
    if model_cfg.dtype != "auto":
        return model_cfg.dtype
    return precision.resolve("auto", "auto", model_cfg.quantize).model_dtype


def compile_layers(model: torch.nn.Module, device: torch.device) -> int:
    """torch.compile each decoder layer, in place (state_dict keys unchanged). Returns how many.

    Compiling layer by layer rather than the whole model: identical layers share one compiled graph,
    so compile time does not grow with depth, and the loss outside stays eager. ``dynamic=True``
    because batch lengths vary: one compile instead of one per new length. The win is memory more
    than speed: inductor fuses elementwise chains (norms, SwiGLU, rotary) and recomputes them in
    backward instead of saving their outputs.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise LorafitError("train.compile: this model has no decoder .layers list to compile; "
                           "set train.compile: false")
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")):
        raise LorafitError("train.compile on CPU needs a C++ compiler (g++ or clang++) for torch.compile; "
                           "install one (e.g. apt install g++) or set train.compile: false")
    # Inductor's compiled kernels and graphs are cached on disk and reused by the next run with the same
    # shapes and code; kept beside lorafit's other caches rather than in /tmp, which a reboot empties.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
    # The first layer's input (the frozen embedding's output) needs no gradient while every later layer's does
    # (LoRA outputs): two graphs to compile, the second at the second layer. With the embedding's output asking
    # for a gradient every layer's input is alike and one compiled forward + backward serves them all (the cost:
    # layer 0 also computes its input's gradient). First step, 10 SmolLM2 layers in bf16, cold inductor cache,
    # 2-core Intel Xeon with AMX, 2026-12-06: 32.0 s -> 24.3 s.
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps them by default). Quantizing on CPU reads the
    full-precision weights first; without this the process keeps their footprint after they are freed."""
    import ctypes
    import ctypes.util

    libc_name = ctypes.util.find_library("c")
    if libc_name:
        try:
            ctypes.CDLL(libc_name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: nothing to do
            pass


def _from_pretrained(factory, location: str, shown: str, **kwargs):
    """Call ``factory.from_pretrained`` and turn "could not find/fetch" into one actionable message."""
    try:
        return factory.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LorafitError(
            f"model.base {shown!r} could not be loaded: {first_line}\n"
            "  Give a local Hugging Face folder, a .gguf file, pkg:PACKAGE/FILE, or a hub id (hub ids need network)."
        ) from None
