"""What llama.cpp's loader requires of a GGUF file, checked on the written file before it replaces OUT.

Each rule names the llama.cpp source it mirrors (llama.cpp as vendored by llama-cpp-python 0.3.36):
``src/llama-model.cpp`` (load_hparams; a missing required key or a bad n_rot throws), ``src/llama-vocab.cpp``
(tokenizer model and pre-tokenizer names, token types, special ids) and ``src/llama-adapter.cpp`` (LoRA
adapters: general.type, adapter.type, A/B pairs of matching rank). transformers' GGUF reader, which lorafit's
logit check uses, is more lenient than this loader on every one of these points.
"""

from __future__ import annotations

from pathlib import Path

from lorafit.errors import LorafitError
from lorafit.gguf_tokenizer import LLAMA_CPP_PRE_TOKENIZERS

# llama.cpp's load_hparams: get_key(...) without "false" throws when the key is missing.
REQUIRED_LLAMA_KEYS = ("context_length", "embedding_length", "block_count", "attention.layer_norm_rms_epsilon")
LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down")
TOKEN_TYPES = range(1, 7)  # llama_token_type: NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE


def llama_cpp_problems(path: Path) -> list[str]:
    """Every reason llama.cpp would refuse ``path`` (a full model or a LoRA adapter GGUF); empty when none."""
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {tensor.name: tuple(int(n) for n in tensor.shape) for tensor in reader.tensors}  # ggml order
    if fields.get("general.architecture") != "llama":
        return [f"general.architecture is {fields.get('general.architecture')!r}, not 'llama'"]
    if fields.get("general.type") == "adapter":
        return adapter_problems(fields, tensors)
    return hparam_problems(fields) + vocab_problems(fields, tensors) + tensor_problems(fields, reader.tensors)


def hparam_problems(fields: dict) -> list[str]:
    problems = [f"llama.{key} is missing" for key in REQUIRED_LLAMA_KEYS if f"llama.{key}" not in fields]
    embedding, heads = fields.get("llama.embedding_length"), fields.get("llama.attention.head_count")
    if not heads or not embedding or embedding % heads:
        return [*problems, f"llama.attention.head_count {heads} does not divide embedding_length {embedding}"]
    kv_heads = fields.get("llama.attention.head_count_kv", heads)
    if heads % kv_heads:
        problems.append(f"head_count_kv {kv_heads} does not divide head_count {heads}")
    rot = fields.get("llama.rope.dimension_count", embedding // heads)
    if rot != embedding // heads:  # load_hparams: "invalid n_rot" for LLM_ARCH_LLAMA
        problems.append(f"llama.rope.dimension_count {rot} is not the head size {embedding // heads}")
    if not fields.get("llama.rope.freq_base", 10000.0) > 0 or not fields.get(
            "llama.attention.layer_norm_rms_epsilon", 1e-6) > 0:
        problems.append("rope.freq_base and layer_norm_rms_epsilon must be positive")
    return problems


def vocab_problems(fields: dict, tensors: dict[str, tuple[int, ...]]) -> list[str]:
    if fields.get("tokenizer.ggml.model") != "gpt2":
        return [f"tokenizer.ggml.model is {fields.get('tokenizer.ggml.model')!r}; lorafit writes 'gpt2' (BPE)"]
    problems = []
    if fields.get("tokenizer.ggml.pre") not in LLAMA_CPP_PRE_TOKENIZERS:  # else "unknown pre-tokenizer type"
        problems.append(f"tokenizer.ggml.pre {fields.get('tokenizer.ggml.pre')!r} is not one of llama.cpp's "
                        f"names lorafit checks ({', '.join(LLAMA_CPP_PRE_TOKENIZERS)})")
    tokens, types = fields.get("tokenizer.ggml.tokens") or [], fields.get("tokenizer.ggml.token_type") or []
    rows = tensors.get("token_embd.weight", (0, 0))[-1]
    if len(tokens) != rows:
        problems.append(f"{len(tokens)} tokens but token_embd.weight has {rows} rows")
    if len(types) != len(tokens) or any(t not in TOKEN_TYPES for t in types):
        problems.append("tokenizer.ggml.token_type must give one type in 1..6 per token")
    merges = fields.get("tokenizer.ggml.merges") or []
    if not merges or any(merge.count(" ", 1) != 1 for merge in merges):
        problems.append("tokenizer.ggml.merges must be 'left right' pairs")
    for special in ("bos", "eos", "unk", "pad"):
        token_id = fields.get(f"tokenizer.ggml.{special}_token_id")
        if token_id is not None and not 0 <= token_id < len(tokens):
            problems.append(f"tokenizer.ggml.{special}_token_id {token_id} is outside the {len(tokens)} tokens")
    return problems


def tensor_problems(fields: dict, tensors) -> list[str]:
    import gguf

    names = {tensor.name for tensor in tensors}
    wanted = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{layer}.{name}.weight" for layer in range(fields.get("llama.block_count", 0)) for name in LAYER_TENSORS]
    problems = [f"tensor {name} is missing" for name in wanted if name not in names]
    quantized = any(tensor.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                                               gguf.GGMLQuantizationType.BF16) for tensor in tensors)
    if quantized and "general.quantization_version" not in fields:
        problems.append("a quantized file needs general.quantization_version")
    return problems


def adapter_problems(fields: dict, tensors: dict[str, tuple[int, ...]]) -> list[str]:
    """llama-adapter.cpp: general.type 'adapter', adapter.type 'lora', and every weight's lora_a [r, in] (ggml
    order [in, r]) with a lora_b [out, r] (ggml [r, out]) of the same rank."""
    problems = [] if fields.get("adapter.type") == "lora" else ["adapter.type must be 'lora'"]
    if "adapter.lora.alpha" not in fields:
        problems.append("adapter.lora.alpha is missing")
    for name, shape in tensors.items():
        if name.endswith(".lora_a"):
            other = tensors.get(name.removesuffix(".lora_a") + ".lora_b")
            if other is None or len(shape) != 2 or len(other) != 2 or shape[1] != other[0]:
                problems.append(f"{name} has no lora_b of the same rank")
        elif not name.endswith(".lora_b"):
            problems.append(f"{name} is not a lora_a/lora_b tensor")
    return problems


def check_llama_cpp_loadable(path: Path) -> None:
    problems = llama_cpp_problems(path)
    if problems:
        raise LorafitError(f"self-check failed: llama.cpp would not load the written GGUF ({'; '.join(problems)})"
                           "; nothing was written (a bug in lorafit's export: please report it)")
