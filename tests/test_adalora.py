"""AdaLoRA against the formula and PEFT's own AdaLoRA: forward, penalty, budget schedule, masks after the
same gradients, files both ways (a layer with no kept triplet included), merge, and an exact resume."""

import json

import pytest
import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model

from lorafit.adapter_io import load_adapter, save_adapter
from lorafit.adapters.adalora import AdaLoRALinear
from lorafit.config import LoRAConfig
from lorafit.errors import LorafitError
from lorafit.inject import inject_lora, lora_modules, training_hooks
from lorafit.merge import merge_adapter
from lorafit.train import train as run_training

from .conftest import ctrl_c_after_step, day_run, four_bit_tiny, peft_grads, tiny_model, train_losses
from .tolerance import assert_close_by_rule, reduction_through

TARGETS = ["q_proj", "v_proj", "down_proj"]
SCHEDULE = {"tinit": 2, "tfinal": 2, "deltaT": 1}


def ours_adalora(total_steps: int = 10, **schedule):
    model = tiny_model()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=TARGETS, variant="adalora",
                                  adalora={"init_r": 6, **SCHEDULE, **schedule}))
    return model, training_hooks(model, total_steps)


def peft_like(ours, total_steps: int = 10, **schedule):
    """PEFT's AdaLoRA on the same base, with lorafit's A, E, B copied in."""
    settings = {**SCHEDULE, **schedule}
    theirs = get_peft_model(tiny_model(), AdaLoraConfig(init_r=6, target_r=4, lora_alpha=8, target_modules=TARGETS,
                                                        total_step=total_steps, **settings))
    copy_weights(ours, theirs)
    return theirs


def copy_weights(ours, theirs) -> None:
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, module in lora_modules(ours).items():
            for part, param in module.adapter_params().items():
                params[f"base_model.model.{name}.{part}.default"].copy_(param)


def perturb(model, seed: int = 4) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_E.copy_(torch.randn(module.lora_E.shape, generator=generator))


@pytest.mark.numerics
def test_forward_is_the_formula_and_starts_as_the_base(input_ids):
    model, _ = ours_adalora()
    # E = 0: the same base kernels on the same inputs plus an exact zero, so bit-exact.
    torch.testing.assert_close(model(input_ids).logits, tiny_model()(input_ids).logits, atol=0, rtol=0)
    perturb(model)
    layer = lora_modules(model)["model.layers.0.mlp.down_proj"]
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0)).double()
    A, E, B = (p.double() for p in (layer.lora_A, layer.lora_E, layer.lora_B))
    by_hand = x @ layer.base_layer.weight.double().T + (x @ (A * E).T @ B.T) * 8 / (6 + 1e-5)
    reduction = 64 + 64 + 6  # fp32 sums over in (base, x·(A⊙E)ᵀ) and init_r (·Bᵀ)
    assert_close_by_rule(layer(x.float()), by_hand, reduction=reduction)
    expected = layer(x.float())
    layer.merge()
    assert_close_by_rule(layer(x.float()), expected, reduction=reduction)


@pytest.mark.numerics
def test_logits_and_penalty_gradients_match_peft(input_ids):
    """PEFT's AdaLoraModel.forward adds its orthogonality penalty to the model's loss; lorafit's hooks add
    the same term. (Called through PeftModel, PEFT 0.21.2 returns the loss without it: measured.)"""
    ours, hooks = ours_adalora()
    perturb(ours)
    theirs = peft_like(ours)
    ours.train(), theirs.train()
    ours_loss = ours(input_ids, labels=input_ids).loss + hooks.regularization()
    theirs_loss = theirs.base_model(input_ids=input_ids, labels=input_ids).loss
    reduction = reduction_through(ours, tokens=input_ids.numel())
    assert_close_by_rule(ours_loss, theirs_loss, reduction=reduction)
    ours_loss.backward()
    theirs_loss.backward()
    grads = peft_grads(theirs)
    for name, module in lora_modules(ours).items():
        for part, param in module.adapter_params().items():
            assert_close_by_rule(param.grad, grads[f"{name}.{part}"], reduction=reduction, msg=f"{name}.{part}")


def test_budget_schedule_equals_peft():
    _, hooks = ours_adalora(total_steps=30, tinit=5, tfinal=6, deltaT=3)
    theirs = peft_like(ours_adalora()[0], total_steps=30, tinit=5, tfinal=6, deltaT=3)
    allocator = theirs.base_model.rankallocator
    for step in (0, 1, 5, 6, 7, 9, 12, 17, 23, 24, 25, 30):
        assert hooks.budget_schedule(step) == allocator.budget_schedule(step), step
    assert hooks.init_budget == 6 * 6 and hooks.target_budget == 4 * 6


@pytest.mark.numerics
def test_masks_follow_peft_fed_the_same_gradients(input_ids):
    """Both models take the same SGD steps on the same batch; after each one lorafit's hooks and PEFT's
    update_and_allocate run. The kept-triplet masks and every E agree at every step."""
    total = 8
    ours, hooks = ours_adalora(total_steps=total)
    theirs = peft_like(ours, total_steps=total)
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (ours, theirs)]
    compared = 0
    # Each step's rounding differences carry into the next: the steps' reductions add (in quadrature).
    # The masks are discrete; they agree because no two importance scores tie to rounding here.
    reduction = total * reduction_through(ours, tokens=input_ids.numel())
    for step in range(1, total + 1):
        for model, optimizer in zip((ours, theirs), optimizers, strict=True):
            optimizer.zero_grad()
            if model is ours:
                loss = model(input_ids, labels=input_ids).loss + hooks.regularization()
            else:
                loss = model.base_model(input_ids=input_ids, labels=input_ids).loss  # with PEFT's penalty
            loss.backward()
            optimizer.step()
        hooks.on_step_end(step)
        theirs.base_model.update_and_allocate(step)
        pattern = theirs.peft_config["default"].rank_pattern or {}
        params = dict(theirs.named_parameters())
        for name, module in lora_modules(ours).items():
            key = f"model.{name.removeprefix('model.')}.lora_E.default"
            if key in pattern:
                assert module.rank_mask.tolist() == pattern[key], (step, name)
                compared += 1
            assert_close_by_rule(module.lora_E, params[f"base_model.model.{name}.lora_E.default"],
                                 reduction=reduction, msg=f"step {step}: {name}")
    assert compared == 6 * (total - SCHEDULE["tinit"])  # masks compared after every masking step
    kept = sum(int(m.rank_mask.sum()) for m in lora_modules(ours).values())
    assert kept <= hooks.target_budget < hooks.init_budget


@pytest.mark.numerics
def test_files_both_ways_with_a_layer_that_keeps_nothing(tmp_path, input_ids, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    ours, _ = ours_adalora()
    perturb(ours)
    layers = list(lora_modules(ours).values())
    layers[0].set_mask(torch.zeros(6, dtype=torch.bool))  # no triplet kept
    layers[1].set_mask(torch.tensor([True, False, True, False, False, True]))
    save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["init_r"] == 6 and config["target_r"] == 4
    expected = ours.eval()(input_ids).logits
    theirs = PeftModel.from_pretrained(tiny_model(), tmp_path / "ours").eval()
    reduction = reduction_through(ours, tokens=input_ids.numel())
    assert_close_by_rule(theirs(input_ids).logits, expected, reduction=reduction)

    theirs.save_pretrained(tmp_path / "peft")
    again = tiny_model()
    load_adapter(again, tmp_path / "peft")
    assert all(isinstance(m, AdaLoRALinear) for m in lora_modules(again).values())
    assert_close_by_rule(again(input_ids).logits, expected, reduction=reduction)

    merge_adapter(str(tiny_model_dir), tmp_path / "peft", tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert_close_by_rule(merged(input_ids).logits, theirs.merge_and_unload()(input_ids).logits, reduction=reduction)


def test_adalora_over_a_4bit_base(tmp_path, input_ids):
    pytest.importorskip("bitsandbytes")
    model = four_bit_tiny(tmp_path, LoRAConfig(r=4, alpha=8, variant="adalora"))
    hooks = training_hooks(model, 10)
    perturb(model)
    model.train()
    (model(input_ids, labels=input_ids).loss + hooks.regularization()).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert {n.rsplit(".", 1)[-1] for n in grads} == {"lora_A", "lora_E", "lora_B"}  # adapter only, all three
    hooks.on_step_end(2)  # scores from the 4-bit model's gradients, and a masking step
    assert sum(m.trained_rank for m in lora_modules(model).values()) < hooks.init_budget


def test_settings_are_checked():
    with pytest.raises(ValueError, match="init_r must be at least lora.r"):
        LoRAConfig(r=8, variant="adalora", adalora={"init_r": 4})
    with pytest.raises(ValueError, match="lora.use_rslora does not apply to variant: adalora"):
        LoRAConfig(variant="adalora", use_rslora=True)
    with pytest.raises(LorafitError, match="leave no budgeting phase"):
        ours_adalora(total_steps=3, tinit=2, tfinal=2)  # 2 >= 3 - 2: no step where the budget falls


def test_train_with_variant_adalora_prunes_and_resumes_exactly(tmp_path, tiny_model_dir, monkeypatch):
    recipe = day_run(tmp_path, tiny_model_dir, "r: 2, alpha: 8, variant: adalora", max_steps=10, lr=1.0e-2)

    def losses(out):
        return train_losses(tmp_path / out)

    summary = run_training(recipe("straight"))
    config = json.loads((tmp_path / "straight" / "adapter" / "adapter_config.json").read_text())
    assert config["total_step"] == 10 and config["init_r"] == 3 and (config["tinit"], config["tfinal"]) == (1, 2)
    kept = sum(sum(mask) for mask in config["rank_pattern"].values())
    assert kept <= 2 * 14 < 3 * 14  # pruned to the target budget: r=2 over 14 layers
    # where the budget went: the summary's table and OUT/ranks.png, from the same masks
    assert summary.ranks == {k.removesuffix(".lora_E"): sum(v) for k, v in config["rank_pattern"].items()}
    assert (tmp_path / "straight" / "ranks.png").stat().st_size > 1000
    with ctrl_c_after_step(monkeypatch, 5), pytest.raises(LorafitError, match="interrupted after step 5"):
        run_training(recipe("resumed"))
    run_training(recipe("resumed"), resume="latest")
    # same code, same inputs, same device: the resumed run is bit-exact, files included
    assert losses("resumed") == losses("straight")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "resumed" / "adapter" / name).read_bytes() == \
            (tmp_path / "straight" / "adapter" / name).read_bytes()
