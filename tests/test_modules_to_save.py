"""lora.modules_to_save (lorafit/adapters/saved_modules.py) against PEFT's modules_to_save: the same saved keys,
files both ways with the same logits, and ``lorafit merge`` equal to PEFT's ``merge_and_unload``."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from lorafit.adapter_io import load_adapter, save_adapter
from lorafit.config import LoRAConfig
from lorafit.errors import LorafitError
from lorafit.inject import inject_lora, remove_lora
from lorafit.merge import merge_adapter

from .conftest import tiny_model
from .test_adapters_conformance import perturb
from .tolerance import assert_close_by_rule, reduction_through

TARGETS = ["q_proj", "v_proj"]
SAVED = ["lm_head", "norm"]  # "norm" also matches input_layernorm / post_attention_layernorm, as in PEFT


def ours() -> torch.nn.Module:
    model = tiny_model()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=TARGETS, modules_to_save=SAVED))
    perturb(model)
    return model


def theirs() -> torch.nn.Module:
    model = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=SAVED))
    perturb(model)
    return model


def test_same_trainable_tensors_and_saved_keys_as_peft(tmp_path):
    model, peft_model = ours(), theirs()
    copies = [n for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    assert len(copies) == 6 and copies == [n.removeprefix("base_model.model.") for n, p in
                                           peft_model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    save_adapter(model, tmp_path / "ours")
    peft_model.save_pretrained(tmp_path / "peft")
    assert load_file(tmp_path / "ours" / "adapter_model.safetensors").keys() == \
        load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["modules_to_save"] == [
        "lm_head", "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
        "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm", "model.norm"]


@pytest.mark.numerics
def test_lorafit_file_loads_in_peft_and_merges_like_merge_and_unload(tmp_path, input_ids, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = ours().eval()
    save_adapter(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter").eval()
    reduction = reduction_through(model, tokens=input_ids.numel())
    expected = model(input_ids).logits.detach()
    assert not torch.allclose(expected, tiny_model()(input_ids).logits, atol=1e-3)
    assert_close_by_rule(peft_model(input_ids).logits, expected, reduction=reduction)
    merge_adapter(str(tiny_model_dir), tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert_close_by_rule(merged(input_ids).logits, peft_model.merge_and_unload()(input_ids).logits,
                         reduction=reduction)
    remove_lora(model)  # the originals back: the base model again
    assert torch.equal(model(input_ids).logits, tiny_model()(input_ids).logits)


@pytest.mark.numerics
def test_peft_file_loads_in_lorafit_and_merges_like_merge_and_unload(tmp_path, input_ids, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    peft_model = theirs().eval()
    peft_model.save_pretrained(tmp_path / "peft")
    model = tiny_model()
    load_adapter(model, tmp_path / "peft")
    reduction = reduction_through(model, tokens=input_ids.numel())
    expected = peft_model(input_ids).logits
    assert_close_by_rule(model(input_ids).logits, expected, reduction=reduction)
    merge_adapter(str(tiny_model_dir), tmp_path / "peft", tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    peft_merged = peft_model.merge_and_unload()
    assert_close_by_rule(merged(input_ids).logits, peft_merged(input_ids).logits, reduction=reduction)
    assert torch.equal(merged.lm_head.weight, peft_merged.lm_head.weight)


@pytest.mark.parametrize(("base", "lora", "message"), [
    ({"tie_word_embeddings": True}, {"modules_to_save": ["lm_head"]}, "shares its weight with model.embed_tokens"),
    ({}, {"modules_to_save": ["heads"]}, "'heads' matches no module"),
    ({}, {"modules_to_save": ["q_proj"]}, "is (or holds) a module lora.target_modules adapts"),
])
def test_refused_with_the_fix(base, lora, message):
    with pytest.raises(LorafitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        inject_lora(tiny_model(**base), LoRAConfig(r=4, target_modules=TARGETS, **lora))


def test_plan_lists_the_matched_modules(tmp_path, tiny_model_dir):
    from .test_cli import run, tiny_recipe

    recipe = tiny_recipe(tmp_path, tiny_model_dir, "lora: {r: 4, target_modules: [q_proj], modules_to_save: "
                                                   "[lm_head]}\ntrain: {loraplus_lr_ratio: 16}\n")
    result = run("plan", str(recipe))
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "modules_to_save (full trainable copies): lm_head (4,096 parameters)" in text
    assert "A 3 tensors" in text  # LoRA+: lm_head's copy trains at A's lr, as in PEFT


def test_init_from_an_adapter_with_copies_starts_from_them_and_a_recipe_without_them_is_refused(tmp_path, input_ids):
    from lorafit.adapter_io import start_from_adapter

    trained = ours()
    save_adapter(trained, tmp_path / "sft")
    model = tiny_model()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=TARGETS, modules_to_save=SAVED))
    start_from_adapter(model, tmp_path / "sft")
    assert torch.equal(model(input_ids).logits, trained(input_ids).logits)  # the same code on the same weights
    plain = tiny_model()
    inject_lora(plain, LoRAConfig(r=4, alpha=8, target_modules=TARGETS))
    with pytest.raises(LorafitError, match="the adapter trained copies of .'lm_head'"):
        start_from_adapter(plain, tmp_path / "sft")
