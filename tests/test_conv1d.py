"""GPT-2-style models, whose projections are transformers' Conv1D (weight [in, out]): PEFT's fan_in_fan_out.
Counts, files, logits and merges are checked against PEFT on a tiny random GPT-2."""

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from lorafit.adapter_io import load_adapter, save_adapter
from lorafit.config import LoRAConfig, load_recipe
from lorafit.inject import inject_lora, lora_modules, training_hooks
from lorafit.merge import merge_adapter
from lorafit.targets import find_targets
from lorafit.train import train as run_training

from .conftest import model_folder, randomize_lora_B, three_step_recipe, train_losses
from .tolerance import assert_close_by_rule, reduction_through


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                        eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def gpt2_dir(tmp_path):
    folder = tmp_path / "tiny-gpt2"
    model_folder(tiny_gpt2(), folder)
    return folder


def test_all_linear_finds_the_conv1d_layers_peft_adapts():
    model = tiny_gpt2()
    targets = find_targets(model, "all-linear")
    assert [t.rsplit(".", 1)[-1] for t in targets[:4]] == ["c_attn", "c_proj", "c_fc", "c_proj"]
    report = inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    peft = get_peft_model(tiny_gpt2(), PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                      fan_in_fan_out=True))
    peft_trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert len(report.modules) == 8 and report.trainable == peft_trainable


@pytest.mark.numerics
@pytest.mark.parametrize("variant", ["lora", "dora", "vera", "adalora"])
def test_peft_loads_the_adapter_with_the_same_logits_and_merges_the_same(tmp_path, gpt2_dir, input_ids, variant):
    model = GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    settings = {"r": 8} if variant == "vera" else {"r": 4, "alpha": 8}
    inject_lora(model, LoRAConfig(target_modules="all-linear", variant=variant, **settings))
    training_hooks(model, total_steps=10)  # AdaLoRA's schedule needs the run's length (PEFT's total_step)
    randomize_lora_B(model)
    save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with torch.no_grad():
        ours = model(input_ids).logits
        peft = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(gpt2_dir), tmp_path / "adapter").eval()
        reduction = reduction_through(model, tokens=input_ids.numel())
        assert_close_by_rule(peft(input_ids).logits, ours, reduction=reduction)
        # merged in place (the Conv1D weight transposed) == the adapted forward
        for module in lora_modules(model).values():
            module.merge()
        assert_close_by_rule(model(input_ids).logits, ours, reduction=reduction)
    # merged from the checkpoint files == PEFT's merge_and_unload
    merge_adapter(str(gpt2_dir), tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").state_dict()
    reference = peft.merge_and_unload().state_dict()
    for key in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"):
        # a merged weight sums over r (and, for DoRA, its row norm over in): at most in + out terms
        assert_close_by_rule(merged[key], reference[key], reduction=sum(reference[key].shape), msg=key)


@pytest.mark.numerics
def test_lorafit_loads_peft_s_gpt2_adapter(tmp_path, gpt2_dir, input_ids):
    peft = get_peft_model(GPT2LMHeadModel.from_pretrained(gpt2_dir),
                          PeftLoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    peft.save_pretrained(tmp_path / "peft")
    model = GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    load_adapter(model, tmp_path / "peft")
    with torch.no_grad():
        assert_close_by_rule(model(input_ids).logits, peft.eval()(input_ids).logits,
                             reduction=reduction_through(model, tokens=input_ids.numel()))


def test_three_training_steps_on_gpt2(tmp_path, gpt2_dir):
    run_training(load_recipe(three_step_recipe(tmp_path, gpt2_dir)))
    losses = train_losses(tmp_path / "out")
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and len(config["target_modules"]) == 8
