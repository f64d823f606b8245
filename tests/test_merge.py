"""`lorafit merge`: merged weights load in plain transformers and equal base + adapter."""

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafit.adapter_io import save_adapter
from lorafit.adapters.base import merged_weight
from lorafit.adapters.lora import lora_delta
from lorafit.config import LoRAConfig
from lorafit.errors import LorafitError
from lorafit.inject import inject_lora
from lorafit.merge import merge_adapter, parse_size

from .conftest import tiny_model
from .tolerance import assert_close_by_rule, reduction_through, tolerance


def test_merge_is_W_plus_scaling_B_A_by_hand():
    W = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    A = torch.tensor([[1.0, 0.0]])  # r=1, in=2
    B = torch.tensor([[2.0], [-1.0]])  # out=2
    expected = torch.tensor([[1.0 + 3 * 2, 2.0], [3.0 - 3 * 1, 4.0]])
    assert torch.equal(merged_weight(W, lora_delta(A, B, scaling=3.0)), expected)  # small integers: exact in any order
    with pytest.raises(ValueError, match="non-finite"):
        merged_weight(W, lora_delta(A, B * float("inf"), 1.0))


@pytest.mark.numerics
def test_merged_model_loads_in_transformers_with_base_plus_adapter_logits(tmp_path, tiny_model_dir, adapter, input_ids):
    adapter_dir, expected = adapter
    result = merge_adapter(str(tiny_model_dir), adapter_dir, tmp_path / "merged", dtype="float32")
    assert result.shards == 1 and result.merged_modules == 14
    reduction = reduction_through(tiny_model(), tokens=input_ids.numel())
    rtol, atol = tolerance(expected, reduction=reduction, dtype=torch.float32)
    assert result.max_logit_diff is not None and result.rounding_floor == 0
    assert result.max_logit_diff <= atol + rtol * expected.abs().max().item()  # merge's own check, by the rule
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert_close_by_rule(merged(input_ids).logits, expected, reduction=reduction)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer.chat_template
    assert (tmp_path / "merged" / "generation_config.json").is_file()
    assert (tmp_path / "merged").stat().st_mode & 0o755 == 0o755  # not the 0700 of a temp folder
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "float32"


def test_small_shards_write_an_index_and_still_load(tmp_path, tiny_model_dir, adapter, input_ids):
    adapter_dir, expected = adapter
    result = merge_adapter(str(tiny_model_dir), adapter_dir, tmp_path / "merged", dtype="float32",
                           max_shard_size="20KB")
    files = sorted(p.name for p in (tmp_path / "merged").glob("model*.safetensors"))
    assert result.shards == len(files) > 3
    assert files[0] == f"model-00001-of-{result.shards:05d}.safetensors"
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert_close_by_rule(merged(input_ids).logits, expected,
                             reduction=reduction_through(merged, tokens=input_ids.numel()))


def test_bf16_merge(tmp_path, tiny_model_dir, adapter):
    adapter_dir, _ = adapter
    result = merge_adapter(str(tiny_model_dir), adapter_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.bfloat16
    assert 0 < result.rounding_floor < 0.1
    assert result.max_logit_diff < 3 * result.rounding_floor  # bf16 rounding, not a wrong merge


@pytest.mark.numerics
def test_merge_of_peft_adapter_equals_peft_merge_and_unload(tmp_path, tiny_model_dir, input_ids):
    peft_model = get_peft_model(tiny_model(), PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                             init_lora_weights=False, use_rslora=True))
    peft_model.save_pretrained(tmp_path / "peft")
    reference = peft_model.merge_and_unload().eval()
    merge_adapter(str(tiny_model_dir), tmp_path / "peft", tmp_path / "merged", dtype="float32", verify=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    for name, weight in reference.state_dict().items():  # W + s·B·A: a sum over r
        assert_close_by_rule(merged.state_dict()[name], weight, reduction=4, msg=name)
    with torch.no_grad():
        assert_close_by_rule(merged(input_ids).logits, reference(input_ids).logits,
                             reduction=reduction_through(merged, tokens=input_ids.numel()))


def test_adapter_that_does_not_fit_names_module_and_shapes(tmp_path, tiny_model_dir):
    other = tiny_model(intermediate_size=96)
    inject_lora(other, LoRAConfig(r=2, alpha=2, target_modules=["up_proj"]))
    save_adapter(other, tmp_path / "adapter")
    message = r"model\.layers\.0\.mlp\.up_proj: adapter has .*lora_B \[96, 2\], but the base layer is \[64, 32\]"
    with pytest.raises(LorafitError, match=message):
        merge_adapter(str(tiny_model_dir), tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_existing_out_needs_overwrite(tmp_path, tiny_model_dir, adapter):
    adapter_dir, _ = adapter
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("mine")
    with pytest.raises(LorafitError, match="--overwrite"):
        merge_adapter(str(tiny_model_dir), adapter_dir, tmp_path / "merged")
    assert (tmp_path / "merged" / "keep.txt").read_text() == "mine"
    merge_adapter(str(tiny_model_dir), adapter_dir, tmp_path / "merged", dtype="float32", overwrite=True)
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_failed_merge_leaves_no_out(tmp_path, tiny_model_dir, adapter, monkeypatch):
    adapter_dir, _ = adapter
    from lorafit import merge as merge_module

    def broken(*args, **kwargs):
        raise LorafitError("verification failed")

    monkeypatch.setattr(merge_module, "verify_merge", broken)
    with pytest.raises(LorafitError):
        merge_adapter(str(tiny_model_dir), adapter_dir, tmp_path / "merged")
    assert list(tmp_path.glob("*merged*")) == []


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size("10kb") == 10**4
    with pytest.raises(LorafitError, match="expected a size"):
        parse_size("big")
