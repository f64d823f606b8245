"""Targeting, wrapping and freezing on a tiny random Llama."""

import pytest
import torch

from lorafit.adapters.lora import LoRALinear
from lorafit.config import LoRAConfig
from lorafit.errors import LorafitError
from lorafit.inject import inject_lora, lora_modules
from lorafit.targets import find_targets

from .conftest import tiny_model

ALL_KINDS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_fresh_injection_gives_base_logits_exactly(model, input_ids):
    expected = model(input_ids).logits
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    assert torch.equal(model(input_ids).logits, expected)  # B = 0: the same base kernels plus an exact zero


def test_only_lora_params_train_and_counts_match_r_times_in_plus_out(model):
    shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    report = inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A.weight", "lora_B.weight")) for n in trainable)
    expected = sum(4 * (i + o) for n, (i, o) in shapes.items() if n.endswith(("q_proj", "v_proj")))
    # hidden 32, kv heads 2 of 4 -> v_proj 32->16: per layer 4*(32+32) + 4*(32+16) = 448, 2 layers
    assert expected == 896
    assert report.trainable == expected == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.kinds == {"q_proj": 2, "v_proj": 2}
    assert report.total == sum(p.numel() for p in model.parameters())


def test_all_linear_skips_output_head(model):
    targets = find_targets(model, "all-linear")
    assert "lm_head" not in targets
    assert {t.rsplit(".", 1)[-1] for t in targets} == ALL_KINDS
    assert len(targets) == 14


def test_regex_matches_full_path(model):
    targets = find_targets(model, LoRAConfig(target_modules={"regex": r".*\.1\.self_attn\.(q|k)_proj"}).target_modules)
    assert targets == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    # fullmatch: a partial pattern matches nothing rather than everything
    with pytest.raises(LorafitError):
        find_targets(model, LoRAConfig(target_modules={"regex": "q_proj"}).target_modules)


def test_layer_subset(model):
    targets = find_targets(model, ["q_proj", "down_proj"], layers=[1])
    assert targets == ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


def test_dotted_suffix_match():
    model = tiny_model()
    assert find_targets(model, ["mlp.up_proj"]) == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    # "proj" alone is not a dotted suffix of "q_proj"
    with pytest.raises(LorafitError):
        find_targets(model, ["proj"])


def test_no_match_lists_existing_linear_names(model):
    with pytest.raises(LorafitError) as err:
        find_targets(model, ["query", "value"])
    message = str(err.value)
    assert "matches no linear layer" in message
    for kind in ALL_KINDS:
        assert kind in message
    assert "model.layers.0.self_attn.q_proj" in message


def test_wrapped_modules_keep_base_layer_and_names(model):
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["o_proj"]))
    wrapped = lora_modules(model)
    assert list(wrapped) == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    names = {n for n, _ in model.named_parameters()}
    assert "model.layers.0.self_attn.o_proj.base_layer.weight" in names
    assert "model.layers.0.self_attn.o_proj.lora_A.weight" in names
    assert all(isinstance(m, LoRALinear) for m in wrapped.values())


def test_lora_gradients_flow_through_model(model, input_ids):
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    model.train()
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    # B = 0 at start, so only B gets a non-zero gradient on the first step (A's grad is B^T-weighted)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_wrapped_layers_take_the_mode_of_the_layer_they_wrap():
    """A layer wrapped inside an eval-mode model is in eval mode too: its dropout must not run."""
    model = tiny_model().eval()
    inject_lora(model, LoRAConfig(r=4, dropout=0.5))
    assert not any(module.training for module in lora_modules(model).values())
    training = tiny_model().train()
    inject_lora(training, LoRAConfig(r=4, dropout=0.5))
    assert all(module.training for module in lora_modules(training).values())


def test_layer_indices_that_do_not_exist_are_an_error_naming_those_that_do():
    with pytest.raises(LorafitError, match=r"lora.layers \[1, 9\]: this model has layers 0..1, so \[9\]"):
        inject_lora(tiny_model(), LoRAConfig(r=4, layers=[1, 9]))
