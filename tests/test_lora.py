"""LoRALinear against the formula written out by hand."""

import math

import pytest
import torch
from torch import nn

from lorafit.adapters.lora import LoRALinear, lora_scaling

from .tolerance import assert_close_by_rule


def took_fused_path(out: torch.Tensor, rounded_once: bool = False) -> bool:
    """The fused path ends in an in-place addmm_ on the 2-D base output (or, over a 16-bit base weight, in the
    one-rounding GEMM), then a view back to x's shape."""
    node = out.grad_fn
    while node is not None and type(node).__name__.startswith("View"):
        node = node.next_functions[0][0]
    return node is not None and type(node).__name__ == ("_OneRoundingBackward" if rounded_once else "AddmmBackward0")


def make_layer(r=4, alpha=8.0, bias=True, seed=0, **kwargs) -> tuple[nn.Linear, LoRALinear]:
    torch.manual_seed(seed)
    base = nn.Linear(16, 24, bias=bias)
    layer = LoRALinear(base, r=r, alpha=alpha, **kwargs)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    return base, layer


@pytest.mark.numerics
def test_forward_equals_hand_written_formula():
    base, layer = make_layer()
    x = torch.randn(3, 5, 16)
    W0, b = base.weight, base.bias
    A, B = layer.lora_A.weight, layer.lora_B.weight
    expected = x @ W0.T + b + (8.0 / 4) * (x @ A.T @ B.T)  # one fused addmm vs three plain GEMMs
    assert_close_by_rule(layer(x), expected, reduction=16 + 16 + 4)  # in, in, r


@pytest.mark.numerics
def test_gradients_equal_hand_written_formula():
    """The fused in-place GEMM path (plain nn.Linear, one dtype) against autograd on the formula."""
    base, layer = make_layer()
    base.requires_grad_(False)  # as inject_lora leaves it
    x = torch.randn(3, 5, 16, requires_grad=True)
    out = layer(x)
    assert took_fused_path(out)
    upstream = torch.randn(3, 5, 24)
    out.backward(upstream)
    ours = [t.grad.clone() for t in (x, layer.lora_A.weight, layer.lora_B.weight)]
    x2 = x.detach().clone().requires_grad_(True)
    A = layer.lora_A.weight.detach().clone().requires_grad_(True)
    B = layer.lora_B.weight.detach().clone().requires_grad_(True)
    (x2 @ base.weight.T + base.bias + 2.0 * (x2 @ A.T @ B.T)).backward(upstream)
    for got, want in zip(ours, (x2.grad, A.grad, B.grad)):  # sums over out (24) and r, or over 15 tokens
        assert_close_by_rule(got, want, reduction=24 + 4 + 15)
    assert base.weight.grad is None  # W0 stays frozen


@pytest.mark.numerics
def test_plain_path_for_other_bases_gives_the_same_output():
    class LinearLike(nn.Linear):  # stands in for a bitsandbytes layer: not exactly nn.Linear
        pass

    _, layer = make_layer()
    x = torch.randn(6, 16)
    fused = layer(x)
    other = LinearLike(16, 24)
    other.load_state_dict(layer.base_layer.state_dict())
    layer.base_layer = other
    out = layer(x)
    assert not took_fused_path(out)
    assert_close_by_rule(out, fused, reduction=16 + 16 + 4)  # plain F.linear + update vs the fused addmm


# bf16 has 8 significant bits: each rounding is off by up to 2^-9 relative. The GEMMs sum in fp32 (oneDNN,
# cuBLAS); what is bf16 is the rounding of the inputs, of x@Aᵀ and of the output: 4 bf16 roundings along the
# path, the `reduction` of the rule in bf16 (tests/README.md). The fp32 sums add nothing visible at that scale.
BF16_ROUNDINGS = 4


def formula_and_grads(layer: LoRALinear, x: torch.Tensor, upstream: torch.Tensor):
    """The fp32 formula with fp32 copies of every weight: the reference a bf16 run approximates."""
    x = x.detach().float().requires_grad_(True)
    A = layer.lora_A.weight.detach().float().requires_grad_(True)
    B = layer.lora_B.weight.detach().float().requires_grad_(True)
    W0, b = layer.base_layer.weight.float(), layer.base_layer.bias.float()
    out = x @ W0.T + b + layer.scaling * (x @ A.T @ B.T)
    out.backward(upstream)
    return out.detach(), [x.grad, A.grad, B.grad]


@pytest.mark.numerics
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16 base, no autocast", "fp32 base, bf16 autocast"])
def test_bf16_compute_takes_the_fused_path_with_fp32_lora_weights(autocast):
    """precision bf16 over a bf16 base (no autocast) or over an fp32 base (autocast): A and B stay fp32 (the
    optimizer's masters), the update is computed in bf16 by the fused GEMM, and gradients come back to A
    and B in fp32."""
    base, layer = make_layer()
    base.requires_grad_(False)
    if not autocast:
        base.to(torch.bfloat16)
    x = torch.randn(3, 5, 16, dtype=torch.float32 if autocast else torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
    assert out.dtype == torch.bfloat16 and took_fused_path(out, rounded_once=not autocast)
    upstream = torch.randn(3, 5, 24)
    out.backward(upstream.bfloat16())
    expected, grads = formula_and_grads(layer, x, upstream)
    assert_close_by_rule(out, expected, reduction=BF16_ROUNDINGS)
    assert x.grad.dtype == x.dtype
    assert layer.lora_A.weight.grad.dtype == layer.lora_B.weight.grad.dtype == torch.float32
    for got, want in zip((x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad), grads):
        assert_close_by_rule(got, want, reduction=BF16_ROUNDINGS, dtype=torch.bfloat16)  # bf16 GEMMs, fp32 grads


def test_rslora_scaling_is_alpha_over_sqrt_r():
    assert lora_scaling(16, 32) == 2.0
    assert lora_scaling(16, 32, use_rslora=True) == 8.0
    _, layer = make_layer(r=9, alpha=6.0, use_rslora=True)
    assert layer.scaling == pytest.approx(2.0)


def test_fresh_layer_equals_base_exactly():
    torch.manual_seed(0)
    base = nn.Linear(16, 24)
    layer = LoRALinear(base, r=4, alpha=8.0)
    x = torch.randn(7, 16)
    assert torch.equal(layer(x), base(x))  # B = 0: bit-identical, not just close
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert torch.count_nonzero(layer.lora_A.weight) > 0


def test_init_options():
    torch.manual_seed(0)
    kaiming = LoRALinear(nn.Linear(512, 8), r=64, alpha=1.0, init="kaiming").lora_A.weight
    bound = 1 / math.sqrt(512)  # kaiming_uniform(a=sqrt(5)) on fan_in 512
    assert kaiming.abs().max() <= bound and kaiming.abs().max() > 0.9 * bound
    gaussian = LoRALinear(nn.Linear(512, 8), r=64, alpha=1.0, init="gaussian").lora_A.weight
    assert gaussian.std().item() == pytest.approx(1 / 64, rel=0.05)


@pytest.mark.numerics
def test_merge_matches_unmerged_and_unmerge_restores():
    base, layer = make_layer()
    original = base.weight.detach().clone()
    x = torch.randn(4, 16)
    unmerged_out = layer(x)
    layer.merge()
    assert layer.merged
    reduction = 16 + 16 + 4  # x@(W + s·B@A)ᵀ against x@Wᵀ + s·(x@Aᵀ)@Bᵀ: sums over in, in, r
    assert_close_by_rule(layer(x), unmerged_out, reduction=reduction)
    layer.merge()  # a second merge must not add the update twice
    assert_close_by_rule(layer(x), unmerged_out, reduction=reduction)
    layer.unmerge()
    assert_close_by_rule(base.weight, original, reduction=4)  # W + ΔW - ΔW rounds at the scale of W + ΔW
    assert_close_by_rule(layer(x), unmerged_out, reduction=reduction)


def test_delta_weight_is_scaling_B_at_A():
    _, layer = make_layer(r=2, alpha=3.0)
    expected = 1.5 * layer.lora_B.weight @ layer.lora_A.weight
    assert_close_by_rule(layer.delta_weight(), expected, reduction=2)  # a sum over r = 2
    assert layer.delta_weight().shape == (24, 16)


def test_bf16_merge_is_computed_in_fp32():
    base, layer = make_layer()
    layer.to(torch.bfloat16)
    expected = (base.weight.float() + layer.delta_weight()).to(torch.bfloat16)
    layer.merge()
    assert torch.equal(base.weight, expected)  # the same fp32 sum and rounding on both sides: bit-exact


def test_eval_mode_never_merges_and_dropout_only_in_training():
    _, layer = make_layer(dropout=0.5)
    x = torch.randn(64, 16)
    layer.eval()
    assert not layer.merged
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))  # dropout is live while training


def test_no_dropout_module_when_p_is_zero():
    _, layer = make_layer(dropout=0.0)
    assert isinstance(layer.lora_dropout, nn.Identity)


def test_merge_refuses_non_float_base():
    layer = LoRALinear(nn.Linear(4, 4), r=2, alpha=2.0)
    layer.base_layer.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="quantized"):
        layer.merge()
    assert not layer.merged


def test_gradients_reach_only_adapter():
    base, layer = make_layer()
    base.requires_grad_(False)
    layer(torch.randn(2, 16)).sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None
    assert base.weight.grad is None


@pytest.mark.numerics
@pytest.mark.parametrize("rounded_once", [True, False])
def test_over_a_bf16_base_an_update_below_half_a_rounding_step_still_moves_the_output(rounded_once, monkeypatch):
    """The reason for the one-rounding GEMM (one_rounding_linear): rounding the base output to bf16 and then
    adding a tiny update rounds it away, nearly every element, every time; rounded once with the base output,
    the update carries each element across a rounding boundary with a probability proportional to its size,
    so on average the output moves by the update. The update here is 2^-12 of the output's size on average,
    far below half of bf16's spacing (2^-9 relative) for most elements. The least-squares slope of the
    output's change on the update is 1 for an unbiased rounding (262k elements: sampling error ~1%)."""
    from lorafit.adapters import lora

    if not rounded_once:
        monkeypatch.setattr(lora, "ROUNDED_ONCE", ())  # the two-rounding form, for contrast
    torch.manual_seed(0)
    base = nn.Linear(256, 256, bias=False).to(torch.bfloat16).requires_grad_(False)
    layer = LoRALinear(base, r=1, alpha=1.0)
    x = torch.randn(1024, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        for param in (layer.lora_A.weight, layer.lora_B.weight):
            param.data = param.data.float()  # fp32 masters, as training keeps them
        plain = base(x).float()
        layer.lora_A.weight.fill_(1.0 / 256)  # A·x: each row's mean
        layer.lora_B.weight.normal_()
        update = layer.scaling * (x.float() @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
        layer.lora_B.weight.mul_(plain.abs().mean() / update.abs().mean() / 2**12)
        update = update * (plain.abs().mean() / update.abs().mean() / 2**12)
        moved = layer(x).float() - plain
    slope = float((moved * update).sum() / (update * update).sum())
    if rounded_once:
        assert slope == pytest.approx(1.0, abs=0.05)
    else:
        assert abs(slope) < 0.3  # mostly lost
