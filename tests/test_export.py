"""`lorafit export`: base + adapter -> GGUF, read back by transformers (logits, tokens) and by gguf's reader."""

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, GgufConfig, PreTrainedTokenizerFast

from lorafit.adapter_io import save_adapter
from lorafit.config import LoRAConfig
from lorafit.errors import LorafitError
from lorafit.export import export_gguf, finish, permute_rows, unpermute_rows
from lorafit.inject import inject_lora

from .conftest import CHAT_TEMPLATE, randomize_lora_B, tiny_model
from .test_cli import run
from .tolerance import assert_close_by_rule, reduction_through, tolerance


def bpe_tokenizer(digits: bool = False) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer trained in-process (GPT-2 style; ``digits``: SmolLM-style digit split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                             if digits else byte_level)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["The quick brown fox jumps over the lazy dog on 3 March 2021.", "Convert 7-Apr-1957 to ISO 8601",
              "naïve café, it's 12:30!"] * 20
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>",
                                        unk_token="<s>", pad_token="<|im_end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def base_and_adapter(tmp_path, **lora):
    """A tiny Llama (64 wide: Q8_0 blocks fit; 4 heads, 2 KV heads) with a BPE tokenizer, saved, and an adapter
    (``lora``: LoRAConfig fields) with non-zero B. Returns (base folder, adapter folder)."""
    tokenizer = bpe_tokenizer()
    base = tmp_path / "base"
    tiny_model(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4,
               num_key_value_heads=2).save_pretrained(base)
    tokenizer.save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    inject_lora(model, LoRAConfig(target_modules="all-linear", **lora))
    randomize_lora_B(model)
    save_adapter(model, tmp_path / "adapter")
    return base, tmp_path / "adapter"


@pytest.fixture
def exportable(tmp_path):
    return base_and_adapter(tmp_path, r=4, alpha=8)


def read_back(path):
    """The written file alone in a folder (as llama.cpp users have it), loaded by transformers."""
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                quantization_config=GgufConfig(dequantize=True)).eval()


def test_permutation_round_trip_is_the_identity():
    weight = torch.randn(6 * 8, 5)
    assert torch.equal(unpermute_rows(permute_rows(weight, 6), 6), weight)  # a permutation: no arithmetic
    assert not torch.equal(permute_rows(weight, 6), weight)
    # within a head, rows of the two rotary halves end up interleaved: (0, d/2, 1, d/2+1, ...)
    rows = torch.arange(8.0)[:, None]
    assert permute_rows(rows, 1).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


@pytest.mark.numerics
def test_f32_export_reads_back_with_base_plus_adapter_logits(exportable, tmp_path, input_ids):
    base, adapter = exportable
    out = tmp_path / "gguf" / "model.gguf"
    result = export_gguf(str(base), adapter, out, "f32")
    assert result.pre_tokenizer == "gpt-2"
    ids = input_ids % 100
    reference = AutoModelForCausalLM.from_pretrained(base).eval()
    from lorafit.adapter_io import load_adapter

    load_adapter(reference, adapter)
    with torch.no_grad():
        expected = reference(ids).logits
        reduction = reduction_through(reference, tokens=ids.numel())
        rtol, atol = tolerance(expected, reduction=reduction, dtype=torch.float32)
        limit = atol + rtol * expected.abs().max().item()  # export's own checks, by the rule
        assert result.max_logit_diff <= limit and result.rounding_floor <= limit
        assert_close_by_rule(read_back(out)(ids).logits, expected, reduction=reduction)


def test_q8_0_export_is_within_its_rounding_floor(exportable, tmp_path):
    base, adapter = exportable
    result = export_gguf(str(base), adapter, tmp_path / "q8.gguf", "q8_0")
    # Q8_0 (8-bit blocks of 32) moves this model's logits by ~1e-2; a correct file reproduces that rounding
    assert 0 < result.rounding_floor < 0.05
    assert result.max_logit_diff <= result.rounding_floor * 1.05 + 1e-3


def test_metadata_and_tokens_read_back_with_gguf_reader(exportable, tmp_path):
    import gguf

    base, adapter = exportable
    out = tmp_path / "model.gguf"
    export_gguf(str(base), adapter, out, "f16")
    reader = gguf.GGUFReader(out)

    def value(key):
        field = reader.fields[key]
        return field.contents()

    config = json.loads((base / "config.json").read_text())
    assert value("general.architecture") == "llama"
    assert value("llama.block_count") == config["num_hidden_layers"]
    assert value("llama.embedding_length") == 64 and value("llama.feed_forward_length") == 128
    assert value("llama.attention.head_count") == 4 and value("llama.attention.head_count_kv") == 2
    assert value("llama.rope.dimension_count") == 16
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    assert value("general.name") == "base" and value("general.quantization_version") == 2
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    assert value("tokenizer.ggml.tokens") == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert value("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert value("tokenizer.chat_template") == CHAT_TEMPLATE
    names = {tensor.name: tensor for tensor in reader.tensors}
    assert "output.weight" in names and "blk.1.attn_q.weight" in names
    assert names["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # norms stay f32
    assert names["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16


@pytest.mark.numerics
def test_exported_weights_are_peft_merge_and_unload_permuted(exportable, tmp_path):
    """The file's Q weight is PEFT's merged Q weight with llama.cpp's row permutation applied."""
    import gguf

    base, adapter = exportable
    out = tmp_path / "model.gguf"
    export_gguf(str(base), adapter, out, "f32")
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    merged = merged.state_dict()
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    q = torch.from_numpy(np.array(tensors["blk.1.attn_q.weight"].data))
    k = torch.from_numpy(np.array(tensors["blk.1.attn_k.weight"].data))
    # lorafit's merge against PEFT's: W + s·B·A, a sum over r = 4
    assert_close_by_rule(q, permute_rows(merged["model.layers.1.self_attn.q_proj.weight"], 4), reduction=4)
    assert_close_by_rule(k, permute_rows(merged["model.layers.1.self_attn.k_proj.weight"], 2), reduction=4)


def save_base_and_adapter(tmp_path, tokenizer):
    base = tmp_path / "base"
    tiny_model(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128).save_pretrained(base)
    tokenizer.save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    save_adapter(model, tmp_path / "adapter")
    return base, tmp_path / "adapter"


def digit_splitting_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2-split merges (multi-digit tokens like "20" exist) used with a digit-by-digit split, as SmolLM's
    tokenizer.json does: llama.cpp's "gpt-2" would merge the digits, only its "smollm" reproduces the ids."""
    from tokenizers import pre_tokenizers

    tokenizer = bpe_tokenizer()
    assert any(token.isdigit() and len(token) > 1 for token in tokenizer.get_vocab())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
    return tokenizer


@pytest.mark.parametrize(("make", "name"), [(bpe_tokenizer, "gpt-2"), (digit_splitting_tokenizer, "smollm")],
                         ids=["gpt-2", "smollm"])
def test_the_pre_tokenizer_is_named_by_what_it_does(make, name, tmp_path):
    """Named by behaviour: the first llama.cpp split that, on this vocabulary, gives the tokenizer's ids."""
    from lorafit.gguf_tokenizer import LLAMA_CPP_PRE_TOKENIZERS, as_llama_cpp, byte_level_spec, pre_tokenizer_name

    tokenizer = make()
    assert pre_tokenizer_name(tokenizer) == name
    text = "Convert 7-Apr-1957 to ISO 8601 on 3 March 2021"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert as_llama_cpp(byte_level_spec(tokenizer), name).encode(text).ids == ids
    if name == "smollm":  # and the name it replaced would have merged digits
        assert as_llama_cpp(byte_level_spec(tokenizer), "gpt-2").encode(text).ids != ids
    base, adapter = save_base_and_adapter(tmp_path, tokenizer)
    export_gguf(str(base), adapter, tmp_path / "model.gguf", "f32")
    import gguf

    assert gguf.GGUFReader(tmp_path / "model.gguf").fields["tokenizer.ggml.pre"].contents() == name
    assert set(LLAMA_CPP_PRE_TOKENIZERS) >= {"gpt-2", "smollm", "llama-bpe", "qwen2"}


def test_the_regexes_are_llama_cpps():
    """The split lorafit names "gpt-2" is GPT-2's own (tokenizers' ByteLevel regex) on llama.cpp's test text, and
    "llama-bpe"/"qwen2" are transformers' Llama 3 / Qwen2 splits: the copies of llama.cpp's regexes are right."""
    from tokenizers import Regex, pre_tokenizers

    from lorafit.gguf_tokenizer import CHK_TXT, LLAMA_CPP_PRE_TOKENIZERS

    def pieces(pre_tokenizer):
        return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(CHK_TXT)]

    def split(name):
        (regex,), _ = LLAMA_CPP_PRE_TOKENIZERS[name]
        return pieces(pre_tokenizers.Split(Regex(regex), behavior="isolated"))

    gpt2 = pieces(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    assert [piece.encode() for piece in split("gpt-2")] == [bytes(BYTES[c] for c in piece) for piece in gpt2]
    from transformers.integrations.gguf import gguf_tokenizer_mapping as known

    for name, constant in (("llama-bpe", "_LLAMA3_SPLIT"), ("qwen2", "_QWEN2_SPLIT")):
        theirs = pieces(pre_tokenizers.Split(Regex(getattr(known, constant)), behavior="isolated"))
        assert split(name) == theirs, name


def byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


BYTES = byte_decoder()


@pytest.mark.parametrize("change", ["prefix space", "lowercase", "strip around specials"])
def test_a_tokenizer_llama_cpp_would_read_differently_is_refused_and_nothing_is_written(change, tmp_path):
    from tokenizers import AddedToken, normalizers, pre_tokenizers

    tokenizer = bpe_tokenizer()
    if change == "prefix space":
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        match = "llama.cpp would tokenize differently .* under every pre-tokenizer"
    elif change == "lowercase":
        tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()
        match = "llama.cpp would tokenize differently .* under every pre-tokenizer"
    else:
        tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken("<tool>", lstrip=True)]})
        match = "strips spaces around the added tokens \\['<tool>'\\]"
    base, adapter = save_base_and_adapter(tmp_path, tokenizer)
    with pytest.raises(LorafitError, match=match):
        export_gguf(str(base), adapter, tmp_path / "model.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*")) and not list(tmp_path.glob("*.Model*"))


def test_llama_cpp_metadata_rules_catch_what_its_loader_refuses(exportable, tmp_path):
    """Each rule of gguf_check fires on a file that breaks it (rewritten with gguf's writer from a good one)."""
    import gguf

    from lorafit.gguf_check import llama_cpp_problems

    base, adapter = exportable
    good = tmp_path / "model.gguf"
    export_gguf(str(base), adapter, good, "q8_0")
    assert llama_cpp_problems(good) == []
    reader = gguf.GGUFReader(good)

    def rewritten(drop: str | None = None, **changed) -> list[str]:
        path = tmp_path / "bad.gguf"
        writer = gguf.GGUFWriter(path, "llama")
        for name, field in reader.fields.items():
            if name.startswith("GGUF.") or name in ("general.architecture", drop):
                continue
            value = changed.get(name.replace(".", "_"), field.contents())
            if field.types[0] == gguf.GGUFValueType.ARRAY:
                writer.add_array(name, value)
            else:
                writer.add_key_value(name, value, field.types[0])
        for tensor in reader.tensors:
            writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
        finish(writer)
        return llama_cpp_problems(path)

    assert rewritten() == []
    assert rewritten(tokenizer_ggml_pre="gpt2") == ["tokenizer.ggml.pre 'gpt2' is not one of llama.cpp's names "
                                                    "lorafit checks (gpt-2, smollm, llama-bpe, qwen2, tekken, gpt-4o)"]
    assert rewritten(drop="llama.attention.layer_norm_rms_epsilon") == [
        "llama.attention.layer_norm_rms_epsilon is missing"]
    assert rewritten(llama_rope_dimension_count=8) == ["llama.rope.dimension_count 8 is not the head size 16"]
    assert rewritten(drop="general.quantization_version") == ["a quantized file needs general.quantization_version"]
    assert "tokenizer.ggml.eos_token_id 999 is outside the" in rewritten(tokenizer_ggml_eos_token_id=999)[0]


def test_export_from_the_command_line_refuses_overwriting_and_inputs(exportable, tmp_path):
    base, adapter = exportable
    out = tmp_path / "model.gguf"
    result = run("export", str(base), str(adapter), str(out), "--dtype", "bf16")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "self-check: max |logit difference| vs base + adapter in fp32" in text and "same ids" in text
    assert (tmp_path / "model.Modelfile").read_text().startswith("FROM ./model.gguf\nTEMPLATE")
    before = out.read_bytes()
    again = run("export", str(base), str(adapter), str(out))
    assert again.returncode == 2 and "pass --overwrite" in again.stderr and out.read_bytes() == before
    inside = run("export", str(base), str(adapter), str(adapter / "model.gguf"))
    assert inside.returncode == 2 and "never writes over its inputs" in " ".join(inside.stderr.split())


@pytest.mark.numerics
@pytest.mark.parametrize("lora", [
    {"r": 4, "alpha": 8, "rank_pattern": {"q_proj": 8}, "alpha_pattern": {"v_proj": 32}},
    {"r": 4, "alpha": 8, "use_rslora": True},
    {"r": 8, "variant": "vera"},
], ids=["rank-and-alpha-patterns", "rslora", "vera"])
def test_adapter_only_gguf_rebuilds_peft_merge_and_unload(tmp_path, lora):
    """llama.cpp applies alpha/r per A/B pair; rebuilding W + alpha/r · B @ A from the file (B's rows un-permuted
    for Q/K) must give PEFT's merged weights, whatever per-module scaling the adapter had."""
    import gguf

    base, _ = base_and_adapter(tmp_path, **lora)
    out = tmp_path / "adapter.gguf"
    result = export_gguf(str(base), tmp_path / "adapter", out, "f32", adapter_only=True)
    assert result.max_delta_error <= 1e-6 and result.tensors == 2 * 14

    reader = gguf.GGUFReader(out)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    alpha = reader.fields["adapter.lora.alpha"].contents()
    tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter")
    merged = merged.merge_and_unload().state_dict()
    weights = AutoModelForCausalLM.from_pretrained(base).state_dict()
    for layer in range(2):
        for hf, ggml, heads in (("self_attn.q_proj", "attn_q", 4), ("self_attn.k_proj", "attn_k", 2),
                                ("mlp.down_proj", "ffn_down", None)):
            lora_a, lora_b = tensors[f"blk.{layer}.{ggml}.weight.lora_a"], tensors[f"blk.{layer}.{ggml}.weight.lora_b"]
            if heads:
                lora_b = unpermute_rows(lora_b, heads)
            scale = alpha / lora_a.shape[0] if alpha else 1.0
            key = f"model.layers.{layer}.{hf}.weight"
            assert_close_by_rule(weights[key] + scale * lora_b @ lora_a, merged[key], reduction=lora_a.shape[0],
                                 msg=key)


def test_adapter_only_refuses_dora_with_the_reason(tmp_path, exportable):
    base, _ = exportable
    model = AutoModelForCausalLM.from_pretrained(base)
    inject_lora(model, LoRAConfig(r=4, alpha=8, variant="dora"))
    save_adapter(model, tmp_path / "dora")
    with pytest.raises(LorafitError, match="DoRA .* not a low-rank update .* Export the full model"):
        export_gguf(str(base), tmp_path / "dora", tmp_path / "dora.gguf", adapter_only=True)
    assert not (tmp_path / "dora.gguf").exists()


def test_what_the_export_does_not_write_yet_is_refused_up_front(exportable, tmp_path):
    base, adapter = exportable
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "mlp_bias": True}))
    with pytest.raises(LorafitError, match="MLP biases are not written to GGUF by lorafit yet"):
        export_gguf(str(base), adapter, tmp_path / "model.gguf")
    (base / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(LorafitError, match="model_type 'gpt2' cannot be exported to GGUF yet"):
        export_gguf(str(base), adapter, tmp_path / "model.gguf")
    assert not list(tmp_path.glob("*.gguf"))
