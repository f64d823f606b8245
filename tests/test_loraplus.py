"""LoRA+ (train.loraplus_lr_ratio, lorafit/loraplus.py) against PEFT's create_loraplus_optimizer: the same parameter
groups (lr, weight_decay, tensors), and one step of lorafit's optimizer equal to PEFT's on PEFT's model."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from pydantic import ValidationError

from lorafit import loraplus
from lorafit.adapter_io import save_adapter
from lorafit.config import Recipe
from lorafit.inject import inject_lora, lora_modules
from lorafit.train import make_accelerator, optimization

from .conftest import tiny_model
from .tolerance import assert_close_by_rule, reduction_through

TARGETS = ["q_proj", "v_proj", "down_proj"]
LR, RATIO, DECAY = 1e-2, 16.0, 0.1


def peft_name(name: str) -> str:
    """A PEFT parameter under lorafit's name (see conftest.peft_grads); DoRA's magnitude has no ``.weight``."""
    name = name.removeprefix("base_model.model.").replace(".default", "")
    return name.removesuffix(".weight") if name.endswith("lora_magnitude_vector.weight") else name


def named_groups(groups, model: torch.nn.Module, rename=lambda name: name) -> list[tuple[float, float, set[str]]]:
    """(lr, weight_decay, tensor names) of each non-empty group."""
    names = {id(param): rename(name) for name, param in model.named_parameters()}
    return [(group["lr"], group["weight_decay"], {names[id(p)] for p in group["params"]})
            for group in groups if group["params"]]


def recipe(variant: str = "lora", **train) -> Recipe:
    return Recipe.model_validate({
        "lora": {"r": 4, "alpha": 8, "target_modules": TARGETS, "variant": variant},
        "data": {"train": "rows.jsonl"},
        "train": {"lr": LR, "weight_decay": DECAY, "loraplus_lr_ratio": RATIO, "scheduler": "constant", **train}})


def ours(variant: str):
    """The tiny model with lorafit's adapter (B moved off zero), and its optimizer as train builds it."""
    model = tiny_model()
    inject_lora(model, recipe(variant).lora, for_training=True)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    _, optimizer, _, _ = optimization(model, recipe(variant), make_accelerator("no"), total_steps=10)
    return model, optimizer


def test_the_grouping_rule_is_peft_s_on_peft_s_own_model():
    """Biases, LayerNorms, a saved full module and DoRA's magnitude: every case PEFT's rule separates, on
    GPT-2 (Conv1D, biases, LayerNorm), with lorafit's rule applied to PEFT's model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32,
                                           bos_token_id=0, eos_token_id=0,
                                           tie_word_embeddings=False))
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn", "c_fc"], use_dora=True, bias="all",
                                                 modules_to_save=["ln_f", "lm_head"], fan_in_fan_out=True))
    expected = create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                         loraplus_weight_decay=DECAY)
    mine = loraplus.param_groups(peft_model, LR, RATIO, DECAY)
    assert named_groups(mine, peft_model) == named_groups(expected.param_groups, peft_model)
    lrs = [lr for lr, _, _ in named_groups(mine, peft_model)]
    assert lrs == [LR, LR * RATIO, LR * RATIO]  # A; B; B without decay (biases, ln_f)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_train_s_optimizer_has_peft_s_loraplus_groups(variant):
    model, optimizer = ours(variant)
    peft_model = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                         use_dora=variant == "dora"))
    expected = create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                         loraplus_weight_decay=DECAY)
    got = named_groups(optimizer.param_groups, model)
    assert got == named_groups(expected.param_groups, peft_model, peft_name)
    assert [len(names) for _, _, names in got] == [6, 6 * (2 if variant == "dora" else 1)]  # 2 layers x 3 targets


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.numerics
def test_one_step_equals_peft_s_loraplus_optimizer_on_peft_s_model(variant, tmp_path, input_ids):
    model, optimizer = ours(variant)
    start = {name: module.lora_B.weight.detach().clone() for name, module in lora_modules(model).items()}
    save_adapter(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter", is_trainable=True)
    peft_optimizer = create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                               loraplus_weight_decay=DECAY)
    for net, opt in ((model, optimizer), (peft_model, peft_optimizer)):
        net.train()
        net(input_ids, labels=input_ids).loss.backward()
        opt.step()
    reduction = reduction_through(model, tokens=input_ids.numel())
    theirs = {peft_name(name): param.detach() for name, param in peft_model.named_parameters() if param.requires_grad}
    moved = 0.0
    for name, module in lora_modules(model).items():
        for part, param in module.adapter_params().items():
            assert_close_by_rule(param, theirs[f"{name}.{part}"], reduction=reduction, msg=f"{name}.{part}")
            moved = max(moved, float((param - theirs[f"{name}.{part}"]).detach().abs().max()))
        # Adam's first step moves each entry by about its lr: B's is ratio x train.lr.
        assert float((module.lora_B.weight.detach() - start[name]).abs().max()) > LR * RATIO / 2
    print(f"max |lorafit - PEFT| after one LoRA+ step ({variant}): {moved:.3g}")


@pytest.mark.parametrize("variant", ["vera", "adalora"])
def test_refused_where_b_is_not_lora_s_b(variant):
    with pytest.raises(ValidationError, match="train.loraplus_lr_ratio does not apply to lora.variant"):
        Recipe.model_validate({"lora": {"variant": variant}, "data": {"train": "rows.jsonl"},
                               "train": {"loraplus_lr_ratio": 16}})


def test_plan_shows_the_groups_and_refuses_vera_with_the_fix(tmp_path, tiny_model_dir):
    from .test_cli import run, tiny_recipe

    recipe = tiny_recipe(tmp_path, tiny_model_dir, "lora: {r: 4, target_modules: [q_proj, v_proj]}\n"
                                                   "train: {lr: 2.0e-4, loraplus_lr_ratio: 16}\n")
    result = run("plan", str(recipe))
    assert result.returncode == 0, result.stderr
    line = "LoRA+ (train.loraplus_lr_ratio=16): A 4 tensors at lr 0.0002; B 4 tensors at lr 0.0032"
    assert line in " ".join(result.stdout.split())
    result = run("plan", str(recipe), "--set", "lora.variant=vera")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train.loraplus_lr_ratio does not apply to lora.variant: vera" in result.stderr
    assert "raise train.lr instead" in result.stderr
