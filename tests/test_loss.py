"""The training loss against transformers' own loss and against autograd through full logits."""

import pytest
import torch
import torch.nn.functional as F

from lorafit import loss as loss_module
from lorafit.config import DataConfig, LoRAConfig
from lorafit.data import collate, tokenize_rows
from lorafit.inject import inject_lora, lora_modules
from lorafit.loss import linear_cross_entropy, token_loss_sum

from .conftest import randomize_lora_B, tiny_model, tiny_tokenizer
from .tolerance import assert_close_by_rule, reduction_through

ROWS = [{"prompt": f"Convert {m} {d}, {1990 + d}", "completion": f"{1990 + d}-{m:02d}-{d:02d}"}
        for m in range(1, 3) for d in range(1, 5)]


def lora_model(**overrides):
    model = tiny_model(**overrides)
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    randomize_lora_B(model)  # non-zero B so every adapter weight gets a gradient
    return model.train()


def batch():
    examples = tokenize_rows(ROWS, DataConfig(train="x.jsonl"), tiny_tokenizer(), "x.jsonl").examples
    return collate(examples, pad_id=0)


def loss_and_grads(model, compute):
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.detach(), {name: m.lora_A.weight.grad.clone() for name, m in lora_modules(model).items()}


@pytest.mark.numerics
def test_linear_cross_entropy_equals_autograd_through_full_logits(monkeypatch):
    monkeypatch.setattr(loss_module, "LOGITS_BUDGET", 3 * 50)  # 3 rows per chunk: 17 rows take 6 chunks
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(17, 8, generator=generator, requires_grad=True)
    weight = torch.randn(50, 8, generator=generator)
    labels = torch.randint(0, 50, (17,), generator=generator)
    ours = linear_cross_entropy(hidden, weight, labels)
    (ours * 0.37).backward()  # a non-unit upstream gradient, as dividing by the token count gives
    ours_grad = hidden.grad.clone()
    hidden.grad = None
    reference = F.cross_entropy(hidden @ weight.T, labels, reduction="sum")
    (reference * 0.37).backward()
    # chunked vs whole: logits sum over hidden (8), the loss over 17 rows of 50 classes, dh over 50 classes
    assert_close_by_rule(ours, reference, reduction=8 + 50 + 17)
    assert_close_by_rule(ours_grad, hidden.grad, reduction=8 + 50)


@pytest.mark.numerics
def test_token_loss_and_grads_match_transformers_own_loss():
    """Fused head (trained positions only) vs transformers' full-logits loss: value and LoRA gradients."""
    model, data = lora_model(), batch()
    trained = int((data["labels"][:, 1:] != -100).sum())
    assert loss_module._plain_head(model) is not None  # the fused path is the one under test
    ours, ours_grads = loss_and_grads(model, lambda: token_loss_sum(model, data) / trained)
    theirs, their_grads = loss_and_grads(model, lambda: model(**data).loss)
    reduction = reduction_through(model, tokens=data["input_ids"].numel())
    assert_close_by_rule(ours, theirs, reduction=reduction)
    for name, grad in their_grads.items():
        assert_close_by_rule(ours_grads[name], grad, reduction=reduction, msg=name)


@pytest.mark.numerics
def test_generic_path_for_other_heads_gives_the_same_loss(monkeypatch):
    model, data = lora_model(tie_word_embeddings=True), batch()
    fused, fused_grads = loss_and_grads(model, lambda: token_loss_sum(model, data))
    monkeypatch.setattr(loss_module, "PLAIN_HEAD_MODELS", frozenset())  # e.g. a soft-capped Gemma 2
    assert loss_module._plain_head(model) is None
    generic, generic_grads = loss_and_grads(model, lambda: token_loss_sum(model, data))
    reduction = reduction_through(model, tokens=data["input_ids"].numel())
    assert_close_by_rule(fused, generic, reduction=reduction)
    for name, grad in generic_grads.items():
        assert_close_by_rule(fused_grads[name], grad, reduction=reduction, msg=name)


def test_trainable_head_is_left_to_autograd():
    model = lora_model()
    model.lm_head.weight.requires_grad_(True)
    assert loss_module._plain_head(model) is None


@pytest.mark.parametrize("grad_enabled", [False, True])
def test_loss_is_fp32_and_differentiable_only_under_grad(grad_enabled):
    model, data = lora_model(), batch()
    with torch.set_grad_enabled(grad_enabled):
        value = token_loss_sum(model, data)
    assert value.requires_grad == grad_enabled and value.dtype == torch.float32


@pytest.mark.numerics
def test_under_bf16_autocast_matches_transformers_loss_under_the_same_autocast():
    """bf16 head matmul, fp32 reduction, as transformers does: equal to bf16 rounding (1e-2 relative)."""
    model, data = lora_model(), batch()
    trained = int((data["labels"][:, 1:] != -100).sum())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ours_grads = loss_and_grads(model, lambda: token_loss_sum(model, data) / trained)
        theirs, their_grads = loss_and_grads(model, lambda: model(**data).loss)
    assert ours.dtype == torch.float32
    # bf16 roundings along the path: a GEMM's inputs and output per linear layer the value passes (the sums
    # run in fp32), forward and backward: reduction_through's count of layers, not of summed terms
    roundings = 2 * sum(1 for p in model.parameters() if p.dim() == 2)
    assert_close_by_rule(ours, theirs, reduction=roundings, dtype=torch.bfloat16)
    for name, grad in their_grads.items():
        assert_close_by_rule(ours_grads[name], grad, reduction=roundings, dtype=torch.bfloat16, msg=name)


@pytest.mark.numerics
@pytest.mark.parametrize("router_loss", [True, False])
def test_moe_router_aux_loss_is_in_the_loss_when_the_config_asks_for_it(router_loss):
    """A tiny Mixtral: lorafit's loss per trained token equals transformers' own loss, which adds
    router_aux_loss_coef · aux_loss when output_router_logits is set (1e-6), and leaves it out otherwise."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           output_router_logits=router_loss, router_aux_loss_coef=0.05, max_position_embeddings=64)
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).eval()
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    randomize_lora_B(model)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt, not trained
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        theirs = model(**batch)
        ours = token_loss_sum(model, batch) / int((labels[:, 1:] != -100).sum())
    assert (theirs.aux_loss is not None) == router_loss
    assert_close_by_rule(ours, theirs.loss, reduction=reduction_through(model, tokens=ids.numel()))
