"""DoRA: the formula by hand, the fast row norm, merge, where the magnitude starts and dropout against PEFT, a
4-bit base, a run. PEFT both ways and merge: test_adapters_conformance.py."""

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn

from lorafit.adapter_io import save_adapter
from lorafit.adapters.dora import DoRALinear, dora_row_norm
from lorafit.config import LoRAConfig
from lorafit.errors import LorafitError
from lorafit.inject import inject_lora, lora_modules
from lorafit.train import train as run_training

from .conftest import ctrl_c_after_step, day_run, four_bit_tiny, randomize_lora_B, tiny_model, train_losses
from .tolerance import assert_close_by_rule, reduction_through

# One output of the 16 -> 24 test layer sums over in (x·Wᵀ, x·Aᵀ, the row norm: 16 each) and r (·Bᵀ, B·A: 4 each).
LAYER_REDUCTION = 3 * 16 + 2 * 4


def perturb_magnitudes(model: nn.Module, seed: int = 5) -> None:
    """m starts at ‖W‖_row (W' = W); move it so the magnitude part of the update matters too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            m = module.lora_magnitude_vector
            m.mul_(1 + 0.2 * torch.rand(m.shape, generator=generator))


def make_layer(bias=True) -> DoRALinear:
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(16, 24, bias=bias), r=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 24))
    layer.base_layer.requires_grad_(False)
    return layer


def formula(layer: DoRALinear, x, A, B, m):
    """y = x·Wᵀ + b + (g − 1)·(x·Wᵀ) + g·s·(x·Aᵀ·Bᵀ), g = m / ‖W + s·B·A‖_row with the norm detached."""
    W, b, s = layer.base_layer.weight, layer.base_layer.bias, layer.scaling
    norm = (W + s * (B @ A)).norm(dim=1).detach()
    g = m / norm
    base = x @ W.T
    return base + b + (g - 1) * base + g * s * (x @ A.T @ B.T)


@pytest.mark.numerics
def test_forward_and_gradients_equal_the_formula():
    layer = make_layer()
    x = torch.randn(3, 5, 16, requires_grad=True)
    out = layer(x)
    upstream = torch.randn(3, 5, 24)
    out.backward(upstream)
    x2 = x.detach().clone().requires_grad_(True)
    A, B, m = (p.detach().clone().requires_grad_(True)
               for p in (layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector))
    expected = formula(layer, x2, A, B, m)
    expected.backward(upstream)
    assert_close_by_rule(out, expected, reduction=LAYER_REDUCTION)
    ours = (x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad, layer.lora_magnitude_vector.grad)
    for got, want in zip(ours, (x2.grad, A.grad, B.grad, m.grad)):  # backward adds sums over out (24), tokens (15)
        assert_close_by_rule(got, want, reduction=LAYER_REDUCTION + 24 + 15)


def test_in_bf16_the_gain_stays_fp32_and_the_output_rounds_once():
    """bf16 spaces numbers near 1 by 2^-7, so a gain g = m/‖·‖ rounded to bf16 moves in steps of 0.8%: AdamW's
    steps on m (~lr, a relative 1e-3 or less) would be lost before they reach the output. g stays fp32 and
    y = result + (g − 1)·base + g·s·lora rounds to bf16 once, as PEFT computes it."""
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(64, 48, bias=False).to(torch.bfloat16), r=4, alpha=8.0)
    for param in layer.adapter_params().values():
        param.data = param.data.float()  # fp32 masters, as training holds them
    x = torch.randn(256, 64).bfloat16()
    with torch.no_grad():
        base = layer.base_layer(x).float()
        layer.lora_magnitude_vector.copy_(layer.row_norm() * (1 + 1e-2))  # B = 0: y = g·W·x, g = 1.01
        out = layer(x)
        once = ((layer.lora_magnitude_vector / layer.row_norm()) * base).bfloat16()  # fp32 g, one rounding
        bf16_gain = ((layer.lora_magnitude_vector / layer.row_norm()).bfloat16() * base).bfloat16()
    assert out.dtype == torch.bfloat16
    assert (out == once).float().mean() > 0.99
    assert (bf16_gain == once).float().mean() < 0.8  # what a bf16 g gives is measurably another output


@pytest.mark.numerics
def test_fast_row_norm_equals_the_full_matrix_norm():
    generator = torch.Generator().manual_seed(0)
    W, A, B = (torch.randn(shape, generator=generator, dtype=torch.float64) for shape in ((96, 64), (8, 64), (96, 8)))
    full = (W + 2.5 * (B @ A)).norm(dim=1)
    fast = dora_row_norm(W.pow(2).sum(dim=1), W @ A.T, A, B, 2.5)
    # A and B are taken to fp32 inside, so the rule in fp32 (the result is fp64 only by promotion)
    assert_close_by_rule(fast, full, reduction=64 + 8, dtype=torch.float32)


@pytest.mark.numerics
def test_fresh_layer_is_the_base_and_merge_equals_the_unmerged_output():
    torch.manual_seed(0)
    base = nn.Linear(16, 24)
    fresh = DoRALinear(base, r=4, alpha=8.0)
    x = torch.randn(7, 16)
    assert_close_by_rule(fresh(x), base(x), reduction=LAYER_REDUCTION)  # m = ‖W‖_row and B = 0: g = 1 to rounding
    layer = make_layer()
    with torch.no_grad():
        unmerged = layer(x)
        original = layer.base_layer.weight.clone()
        layer.merge()
        layer.merge()  # idempotent
        assert_close_by_rule(layer(x), unmerged, reduction=LAYER_REDUCTION)
        layer.unmerge()
    assert_close_by_rule(layer.base_layer.weight, original, reduction=16 + 4)  # through the norm and B·A


def peft_dora(model, **extra):
    return get_peft_model(model, PeftLoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear", **extra))


@pytest.mark.numerics
def test_magnitude_starts_where_peft_starts():
    ours = tiny_model()
    inject_lora(ours, LoRAConfig(r=4, alpha=8, variant="dora"))
    theirs = peft_dora(tiny_model())
    for name, module in lora_modules(ours).items():
        peft_m = theirs.get_submodule(f"base_model.model.{name}").lora_magnitude_vector["default"].weight
        assert_close_by_rule(module.lora_magnitude_vector, peft_m, reduction=module.base_layer.in_features, msg=name)


def test_dora_over_a_4bit_base(tmp_path, input_ids):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit

    model = four_bit_tiny(tmp_path, LoRAConfig(r=4, alpha=8, variant="dora"))
    layer = lora_modules(model)["model.layers.0.self_attn.q_proj"]
    weight = dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state).float()
    assert_close_by_rule(layer.lora_magnitude_vector, weight.norm(dim=1), reduction=32)  # sums over in
    randomize_lora_B(model)
    # the fast norm (‖W‖² + 2s·rowsum(W·Aᵀ ⊙ B) + s²·‖B·A‖², its terms as large as the norm²) against the full
    assert_close_by_rule(layer.row_norm(), (weight + layer.delta_weight()).norm(dim=1), reduction=32 + 4)
    model.train()
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert torch.isfinite(loss) and grads and all(("lora_" in n) for n in grads)
    assert any("lora_magnitude_vector" in n for n in grads)


def test_train_with_variant_dora_learns_and_resumes_exactly(tmp_path, tiny_model_dir, monkeypatch):
    recipe = day_run(tmp_path, tiny_model_dir, "r: 4, alpha: 8, variant: dora", max_steps=6, lr=1.0e-2)

    def losses(out):
        return train_losses(tmp_path / out)

    run_training(recipe("straight"))
    assert losses("straight")[-1] < losses("straight")[0]
    config = json.loads((tmp_path / "straight" / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    with ctrl_c_after_step(monkeypatch, 4), pytest.raises(LorafitError, match="interrupted after step 4"):
        run_training(recipe("resumed"))
    run_training(recipe("resumed"), resume="latest")
    assert losses("resumed") == losses("straight")  # same code, same inputs, same device: bit-exact


@pytest.mark.numerics
def test_with_dropout_the_training_forward_matches_peft(tmp_path, input_ids):
    """Dropout on, training mode: same seed, same masks (one dropout call per layer in both)."""
    ours = tiny_model()
    inject_lora(ours, LoRAConfig(r=4, alpha=8, variant="dora", dropout=0.3))
    randomize_lora_B(ours)
    perturb_magnitudes(ours)
    save_adapter(ours, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter", is_trainable=True).train()
    ours.train()
    torch.manual_seed(7)
    expected = theirs(input_ids).logits
    torch.manual_seed(7)
    assert_close_by_rule(ours(input_ids).logits, expected, reduction=reduction_through(ours, tokens=input_ids.numel()))
    torch.manual_seed(8)
    assert not torch.allclose(ours(input_ids).logits, expected, atol=1e-3)  # the masks matter
