"""lorafit/fused.py: RMSNorm and SwiGLU with hand-written backward passes. Forward: bit for bit transformers' (the
same ops on the same inputs). Backward: against an fp64 autograd run of the same formula, at the tolerance rule's
bound for the dtype (tests/tolerance.py). Less kept for backward in bf16, which is what the functions are for."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from lorafit.config import LoRAConfig
from lorafit.fused import RMSNormFunction, SiluMul, use_fused_layers
from lorafit.inject import inject_lora
from lorafit.loss import token_loss_sum, trained_positions

from .conftest import randomize_lora_B, tiny_model
from .tolerance import assert_close_by_rule

H = 64
DTYPES = [torch.float32, torch.bfloat16]


def rand(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def grads(fn, *inputs):
    """fn(*inputs) and the gradients of sum(out * fixed random weights) with respect to every input."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(rand(*out.shape, seed=9, dtype=out.dtype))
    return out.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_forward_is_transformers_bit_for_bit_and_backward_follows_the_formula(dtype):
    norm = LlamaRMSNorm(H, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * rand(H, seed=1))
    x = 3 * rand(4, 7, H, seed=2, dtype=dtype)
    with torch.no_grad():
        theirs = norm(x)
    ours, (our_x, our_w) = grads(lambda x, w: RMSNormFunction.apply(x, w, 1e-6), x, norm.weight)
    assert torch.equal(ours, theirs)
    # The formula in fp64 (no rounding anywhere; transformers' forward would cast an fp64 input to fp32).
    _, (exact_x, exact_w) = grads(lambda x, w: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)),
                                  x.double(), norm.weight.double())
    # grad x sums over H (the mean in d rstd); grad w over the 28 positions.
    assert_close_by_rule(our_x, exact_x, reduction=H, dtype=dtype, msg="grad x")
    assert_close_by_rule(our_w, exact_w, reduction=28, dtype=dtype, msg="grad weight")


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_forward_is_bit_for_bit_and_backward_follows_the_formula(dtype):
    gate, up = 4 * rand(5, 96, seed=3, dtype=dtype), rand(5, 96, seed=4, dtype=dtype)
    theirs = nn.functional.silu(gate) * up
    ours, our_grads = grads(SiluMul.apply, gate, up)
    assert torch.equal(ours, theirs)
    _, exact = grads(lambda g, u: nn.functional.silu(g) * u, gate.double(), up.double())
    for name, our, ref in zip(("gate", "up"), our_grads, exact, strict=True):
        assert_close_by_rule(our, ref, reduction=1, dtype=dtype, msg=name)  # elementwise: one rounding each
    _, eager_grads = grads(lambda g, u: nn.functional.silu(g) * u, gate, up)
    assert all(torch.equal(a, b) for a, b in zip(our_grads, eager_grads, strict=True))  # the same ops


def test_a_model_trains_the_same_with_fused_layers_and_keeps_less_in_bf16():
    model = tiny_model()
    inject_lora(model, LoRAConfig(r=4, dropout=0.1), for_training=True)  # dropout: the probe sees the same masks
    model.train()
    randomize_lora_B(model)
    fused = copy.deepcopy(model)
    layers = len(model.model.layers)
    assert use_fused_layers(fused) == (2 * layers + 1, layers)  # two norms per layer and the final one
    batch = {"input_ids": rand(2, 12, seed=5).abs().mul(30).long() % 100}
    batch["labels"] = batch["input_ids"].clone()
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    losses = {}
    for name, m in (("eager", model), ("fused", fused)):
        torch.manual_seed(1)  # the same dropout masks: the same ops draw them in the same order
        loss = token_loss_sum(m, batch) / trained_positions(batch)
        loss.backward()
        losses[name] = (loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert torch.equal(losses["fused"][0], losses["eager"][0])  # forward: the same ops on the same inputs
    reduction = sum(p.shape[-1] + p.shape[-2] for p in model.parameters() if p.dim() >= 2) + 24
    assert losses["fused"][1].keys() == losses["eager"][1].keys()
    for name, grad in losses["fused"][1].items():
        assert_close_by_rule(grad, losses["eager"][1][name], reduction=reduction, msg=name)
    assert saved_bytes(fused.to(torch.bfloat16), batch) < 0.9 * saved_bytes(model.to(torch.bfloat16), batch)


def saved_bytes(model: nn.Module, batch: dict) -> int:
    """Bytes autograd keeps for backward in one forward (each storage once, parameters left out)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_loss_sum(model, batch)
    return sum(seen.values())


class OnePlusRMSNorm(nn.Module):
    """Gemma's formula, (1 + weight) · x / rms(x): the fused norm is not it, so it must be left alone."""

    def __init__(self):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.zeros(H)), 1e-6

    def forward(self, x):
        h = x.float()
        return ((1 + self.weight) * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def test_modules_that_compute_something_else_keep_their_own_forward():
    class Config:
        hidden_size, intermediate_size, hidden_act, mlp_bias = H, 96, "gelu", False

    model = nn.ModuleList([OnePlusRMSNorm(), LlamaMLP(Config())])
    assert use_fused_layers(model) == (0, 0)
    assert "forward" not in vars(model[0]) and "forward" not in vars(model[1])
