"""Every method of the registry (lorafit/adapters) against PEFT's own implementation of it, by one harness:
logits, loss and gradients of lorafit's adapter loaded in PEFT, PEFT's adapter loaded in lorafit, and
``lorafit merge`` against PEFT's ``merge_and_unload``. Method-specific behaviour is tested in each method's file
(test_lora, test_dora, test_vera, test_adalora, test_moe)."""

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, PeftModel, VeraConfig, get_peft_model

from lorafit.adapter_io import load_adapter, save_adapter
from lorafit.adapters import REGISTRY
from lorafit.config import LoRAConfig
from lorafit.inject import inject_lora, lora_modules, training_hooks
from lorafit.merge import merge_adapter

from .conftest import peft_grads, tiny_model
from .tolerance import assert_close_by_rule, reduction_through

# out/in differ (32x32, 16x32, 32x64): VeRA's projections are sliced, the others' shapes all differ.
TARGETS = ["q_proj", "v_proj", "down_proj"]
# Each method as a lorafit recipe section and as the PEFT config of the same adapter. AdaLoRA without its
# orthogonality penalty: PEFT adds it to the loss inside forward, lorafit in the loop (test_adalora checks it).
RECIPES = {
    "lora": {"alpha": 8},
    "dora": {"alpha": 8},
    "vera": {"vera": {"projection_prng_key": 7}},
    "adalora": {"alpha": 8, "adalora": {"init_r": 6, "tinit": 2, "tfinal": 2, "orth_reg_weight": 0.0}},
}
PEFT_CONFIGS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
    "dora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True),
    "vera": lambda: VeraConfig(r=4, target_modules=TARGETS, projection_prng_key=7),
    "adalora": lambda: AdaLoraConfig(init_r=6, target_r=4, lora_alpha=8, target_modules=TARGETS, tinit=2, tfinal=2,
                                     total_step=10, orth_reg_weight=0.0),
}
METHODS = pytest.mark.parametrize("method", list(REGISTRY))


def test_every_registered_method_is_covered():
    assert set(RECIPES) == set(PEFT_CONFIGS) == set(REGISTRY)


def perturb(model: torch.nn.Module, seed: int = 3) -> None:
    """Move every trainable adapter tensor off its start (B = 0, λ_b = 0, E = 0 make ΔW = 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


def ours(method: str) -> torch.nn.Module:
    model = tiny_model()
    inject_lora(model, LoRAConfig(r=4, target_modules=TARGETS, variant=method, **RECIPES[method]))
    training_hooks(model, total_steps=10)  # AdaLoRA's schedule records the run's length, which PEFT requires
    perturb(model)
    return model


def theirs(method: str) -> torch.nn.Module:
    model = get_peft_model(tiny_model(), PEFT_CONFIGS[method]())
    perturb(model)
    return model


def grad_key(name: str, part: str) -> str:
    """PEFT's name of a lorafit parameter's gradient: an nn.Parameter PEFT keeps in a module gets ``.weight``."""
    return f"{name}.{part}" + (".weight" if part == "lora_magnitude_vector" else "")


@METHODS
@pytest.mark.numerics
def test_lorafit_adapter_loads_in_peft_with_the_same_loss_logits_and_gradients(method, tmp_path, input_ids):
    model = ours(method)
    save_adapter(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter", is_trainable=True)
    reduction = reduction_through(model, tokens=input_ids.numel())
    ours_out, theirs_out = model(input_ids, labels=input_ids), peft_model(input_ids, labels=input_ids)
    assert_close_by_rule(ours_out.logits, theirs_out.logits, reduction=reduction)
    assert_close_by_rule(ours_out.loss, theirs_out.loss, reduction=reduction)
    ours_out.loss.backward()
    theirs_out.loss.backward()
    grads = peft_grads(peft_model)
    for name, module in lora_modules(model).items():
        for part, param in module.adapter_params().items():
            assert_close_by_rule(param.grad, grads[grad_key(name, part)], reduction=reduction, msg=f"{name}.{part}")


@METHODS
@pytest.mark.numerics
def test_peft_adapter_loads_in_lorafit_and_merges_like_merge_and_unload(method, tmp_path, input_ids, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    peft_model = theirs(method).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    expected = peft_model(input_ids).logits
    assert not torch.allclose(expected, tiny_model()(input_ids).logits, atol=1e-3)  # the update matters
    model = tiny_model()
    load_adapter(model, tmp_path / "peft")
    assert all(isinstance(m, REGISTRY[method].method().layer) for m in lora_modules(model).values())
    reduction = reduction_through(model, tokens=input_ids.numel())
    assert_close_by_rule(model(input_ids).logits, expected, reduction=reduction)

    merge_adapter(str(tiny_model_dir), tmp_path / "peft", tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    peft_merged = peft_model.merge_and_unload()
    assert_close_by_rule(merged(input_ids).logits, peft_merged(input_ids).logits, reduction=reduction)


@METHODS
@pytest.mark.numerics
def test_lorafit_merge_of_its_own_adapter_equals_peft_merge_and_unload(method, tmp_path, input_ids, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = ours(method)
    save_adapter(model, tmp_path / "adapter")
    merge_adapter(str(tiny_model_dir), tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    peft_merged = PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter").merge_and_unload().eval()
    reduction = reduction_through(merged, tokens=input_ids.numel())
    assert_close_by_rule(merged(input_ids).logits, peft_merged(input_ids).logits, reduction=reduction)
    model.eval()
    for module in lora_modules(model).values():
        module.merge()  # the loaded model's own merge gives the same weights as merging the files
    assert_close_by_rule(model(input_ids).logits, merged(input_ids).logits, reduction=reduction)
