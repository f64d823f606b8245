"""Base model and tokenizer loading from every place ``model.base`` may point to.

Forms: a local Hugging Face folder, a hub id (needs network), a ``.gguf`` file, or ``pkg:PACKAGE/FILE``
(a file shipped inside an installed Python package, which is how the offline default model arrives).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.config import ModelConfig, locate_package_file
from lorafit.errors import LorafitError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BaseSource:
    """Where transformers should look: a folder or hub id, plus the GGUF file name inside it if any."""

    location: str
    gguf_file: str | None = None

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def model_kwargs(self) -> dict:
        """GGUF weights are always unpacked into plain dense layers: packed GGUF layers cannot be
        trained, merged or wrapped, and transformers >= 5 keeps them packed whenever a kernel exists."""
        kwargs = self.kwargs()
        if self.gguf_file:
            try:
                from transformers import GgufConfig
            except ImportError:  # transformers 4.x always de-quantizes GGUF
                return kwargs
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        return kwargs


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


def torch_dtype(name: str) -> torch.dtype | str:
    return "auto" if name == "auto" else DTYPES[name]


def load_tokenizer(model_cfg: ModelConfig):
    """The base model's tokenizer, with a pad token that is safe for training.

    Labels are always built from sequence lengths, never by comparing ids with ``pad_token_id``, so a
    pad token equal to EOS (SmolLM2 ships that way) can never hide the EOS we want the model to learn.
    When the tokenizer has no pad token at all we prefer ``unk`` over EOS for the same reason.
    """
    from transformers import AutoTokenizer

    source = resolve_base(model_cfg.base)
    tokenizer = _from_pretrained(
        AutoTokenizer, source, model_cfg.base, trust_remote_code=model_cfg.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def load_base_model(model_cfg: ModelConfig) -> torch.nn.Module:
    """The frozen base causal LM in the recipe's dtype (GGUF weights are de-quantized on load)."""
    from transformers import AutoModelForCausalLM

    if model_cfg.quantize is not None:
        raise LorafitError(
            f"model.quantize: {model_cfg.quantize!r} (QLoRA) is not available in this version of lorafit; "
            "set model.quantize: null"
        )
    source = resolve_base(model_cfg.base)
    model = _from_pretrained(
        AutoModelForCausalLM,
        source,
        model_cfg.base,
        dtype=torch_dtype(model_cfg.dtype),
        trust_remote_code=model_cfg.trust_remote_code,
        **source.model_kwargs(),
    )
    if source.gguf_file:
        # The weights are plain dense tensors now; drop the GGUF marker so the model saves and
        # trains like any other (merge writes ordinary safetensors).
        model.hf_quantizer = None
        model.config.quantization_config = None
        del model.config.quantization_config
    model.requires_grad_(False)
    return model


def _from_pretrained(factory, source: BaseSource, shown: str, **kwargs):
    """Call ``factory.from_pretrained`` and turn "could not find/fetch" into one actionable message."""
    kwargs = {**source.kwargs(), **kwargs}
    try:
        return factory.from_pretrained(source.location, **kwargs)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LorafitError(
            f"model.base {shown!r} could not be loaded: {first_line}\n"
            "  Give a local Hugging Face folder, a .gguf file, pkg:PACKAGE/FILE, or a hub id (hub ids need network)."
        ) from None
