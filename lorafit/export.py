"""``lorafit export``: base + adapter -> one GGUF file for llama.cpp / Ollama, checked by reading it back.

Written with the ``gguf`` package (the same package transformers reads GGUF with), never by shelling out to a
llama.cpp checkout. The adapter is folded into the base weights in fp32 by the same code ``merge`` uses (every
variant), then each tensor is renamed to llama.cpp's names, Q and K rows are permuted into llama.cpp's rotary
layout, and the tensor is stored as F32, F16, BF16 or Q8_0. The file is written beside OUT and moved in only
after the self-check: transformers loads it (reversing the permutation, de-quantizing), its logits are
compared with base + adapter in fp32 next to the rounding floor of the chosen type, and its tokenizer must
encode a chat prompt to the same ids as the base's.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from lorafit.errors import LorafitError
from lorafit.files import local_paths, refuse_overlap, write_failure, write_text_atomic
from lorafit.merge import adapter_and_base, base_folder, merged_or_refused

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
    for path in (out, modelfile) if not adapter_only else (out,):
        if path.exists() and not overwrite:
            raise LorafitError(f"{path} exists; pass --overwrite to replace it, or choose another OUT")
    config = _config(base_folder(base))  # the architecture first: Llama family only (no Conv1D, no MoE)
    updates, folder, weight_files, _ = adapter_and_base(base, adapter_dir, out)
    if adapter_only:
        return _export_adapter(updates, weight_files, config, adapter_dir, out, kind)
    tokenizer = _tokenizer(folder)
    pre = pre_tokenizer_name(tokenizer)

    with gguf_beside(out) as tmp:
        writer = gguf.GGUFWriter(tmp, "llama")
        write_model_metadata(writer, config, Path(base).stem if Path(base).exists() else base, kind)
        write_tokenizer(writer, tokenizer, pre, config["vocab_size"])
        count = write_tensors(writer, weight_files, updates, config, adapter_dir, kind)
        finish(writer)
        diff, floor = verify_export(tmp, base, adapter_dir, tokenizer, updates, kind) if verify else (None, None)
    text, note = ollama_modelfile(tokenizer, out.name)
    write_text_atomic(modelfile, text)
    return ExportResult(out, count, len(updates), diff, floor, pre, modelfile=modelfile, modelfile_note=note)


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
def verify_export(path: Path, base: str, adapter_dir: Path, tokenizer, updates, kind: str) -> tuple[float, float]:
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
    check_tokenizer_round_trip(tokenizer, read_back)
    return diff, floor


def check_tokenizer_round_trip(original, read_back) -> None:
    """The tokenizer read back from the file must encode a chat prompt to the same ids as the base's."""
    text = CHECK_TEXT + " Convert 7-Apr-1957 to ISO 8601, it's 12:30 — naïve café! 123456"
    if original.chat_template:
        text = original.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                            add_generation_prompt=True)
    want = original(text, add_special_tokens=False).input_ids
    got = read_back(text, add_special_tokens=False).input_ids
    if got != want:
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise LorafitError(f"self-check failed: the tokenizer read back from the GGUF encodes a chat prompt "
                           f"differently from the base's (first difference at token {first}: "
                           f"{got[first:first + 3]} vs {want[first:first + 3]}); nothing was written")


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not getattr(tokenizer, "is_fast", False):
        raise LorafitError(f"BASE {folder}: no fast tokenizer (tokenizer.json); lorafit exports byte-level BPE "
                           "tokenizers from their tokenizer.json")
    return tokenizer


def _known_splits() -> dict[str, str]:
    """Split regex -> llama.cpp pre-tokenizer name, for the names transformers' GGUF reader also understands
    (so that both readers split text as the base's tokenizer does)."""
    try:
        from transformers.integrations.gguf import gguf_tokenizer_mapping as known
    except ImportError:  # an older transformers: only GPT-2's own split is nameable
        return {}
    wanted = {"llama-bpe": "_LLAMA3_SPLIT", "qwen2": "_QWEN2_SPLIT", "tekken": "_TEKKEN_SPLIT",
              "gpt-4o": "_GPT4O_SPLIT"}
    return {getattr(known, constant): name for name, constant in wanted.items() if hasattr(known, constant)}


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for how this tokenizer splits text before BPE.

    Named from the tokenizer's own pre-tokenizer spec, not from a hash of its ids (llama.cpp's converter
    hashes ids, which only works for vocabularies it has seen): GPT-2's byte-level split is "gpt2", a regex
    split that llama.cpp and transformers both know gets that name. Anything else is refused rather than
    written as a file whose tokenizer silently splits differently.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre = spec.get("model", {}), spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or not (spec.get("decoder") or {}).get("type") == "ByteLevel":
        raise LorafitError(f"the base's tokenizer is {model.get('type')} without a byte-level decoder; lorafit "
                           "exports byte-level BPE (GPT-2 style) tokenizers only")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True)):
        name = _known_splits().get((steps[0].get("pattern") or {}).get("Regex"))
        if name:
            return name
    raise LorafitError(f"the base's pre-tokenizer ({json.dumps(pre)[:200]}) is not one lorafit can name for "
                       "llama.cpp (gpt2, llama-bpe, qwen2, tekken, gpt-4o); a GGUF with the wrong name would "
                       "tokenize differently from training, so nothing was written")


def write_tokenizer(writer, tokenizer, pre: str, vocab_size: int) -> None:
    """Tokens (byte-level spelling), their types, merges, special ids, add_bos and the chat template. The
    token list is padded to the model's ``vocab_size`` rows with unused tokens, as llama.cpp expects."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = {token_id: token for token, token_id in spec["model"]["vocab"].items()}
    added = {entry["id"]: entry for entry in spec.get("added_tokens", [])}
    vocab.update({token_id: entry["content"] for token_id, entry in added.items()})
    size = max(vocab_size, len(tokenizer), max(vocab) + 1)
    tokens, types = [], []
    for token_id in range(size):
        if token_id not in vocab:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        elif token_id in added:
            tokens.append(vocab[token_id])
            types.append(gguf.TokenType.CONTROL if added[token_id]["special"] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(vocab[token_id])
            types.append(gguf.TokenType.NORMAL)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    for attribute, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                           ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        if getattr(tokenizer, attribute, None) is not None:
            add(int(getattr(tokenizer, attribute)))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


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


CHATML_TEMPLATE = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
                   '{{ end }}<|im_start|>assistant\n')


def ollama_modelfile(tokenizer, gguf_name: str) -> tuple[str, str]:
    """An Ollama Modelfile for the exported file, and a one-line note on its template.

    A chat template is translated only when it is ChatML (``<|im_start|>role\\ncontent<|im_end|>\\n``, possibly
    with a default system prompt) and the translation is proven on sample conversations: rendering them with
    the model's own template gives exactly what the Ollama template gives. Otherwise the Modelfile has no
    TEMPLATE, and the note says so.
    """
    lines = [f"FROM ./{gguf_name}"]
    template = tokenizer.chat_template or ""
    if "<|im_start|>" not in template or "<|im_end|>" not in template:
        return "\n".join(lines) + "\n", ("no TEMPLATE: the chat template is not ChatML, the one family lorafit "
                                         "translates; add a TEMPLATE by hand (Ollama's template syntax)")
    system = _default_system(tokenizer)
    if not _chatml_matches(tokenizer, system):
        return "\n".join(lines) + "\n", ("no TEMPLATE: the chat template looks like ChatML but renders sample "
                                         "conversations differently; add a TEMPLATE by hand")
    lines.append(f'TEMPLATE """{CHATML_TEMPLATE}"""')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines.append('PARAMETER stop "<|im_end|>"')
    return "\n".join(lines) + "\n", "ChatML TEMPLATE" + (" with the template's default system prompt" if system
                                                         else "") + ", stop at <|im_end|>"


def _default_system(tokenizer) -> str | None:
    """The system prompt the template adds when a conversation has none (SmolLM2's does), else None."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    head = "<|im_start|>system\n"
    return text[len(head):text.index("<|im_end|>")] if text.startswith(head) else None


def _chatml_matches(tokenizer, system: str | None) -> bool:
    conversations = [[{"role": "user", "content": "What is 2 + 2?"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]]
    for messages in conversations:
        if system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]  # what SYSTEM makes Ollama send
        chatml = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if rendered != chatml + "<|im_start|>assistant\n":
            return False
    return True
