"""lorafit/attention.py: on the CPU, a 16-bit model's SDPA attention runs its kernel in fp32."""

import pytest
import torch

from lorafit.attention import NAME, use_fp32_attention
from lorafit.config import ModelConfig
from lorafit.model import load_base_model

from .conftest import tiny_model
from .tolerance import assert_close_by_rule, reduction_through

INPUT = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))


# Padding (a left-padded row) and packing (two sequences in one row, positions restarting; transformers builds
# the block-diagonal mask without a cache, as in training): sdpa's masks.
MASK = torch.ones_like(INPUT).index_fill_(1, torch.arange(5), 0) * torch.tensor([[0], [1]]) + torch.tensor([[1], [0]])
POSITIONS = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, -1)


@pytest.mark.parametrize("inputs", [{}, {"attention_mask": MASK}, {"position_ids": POSITIONS, "use_cache": False}],
                         ids=["causal", "padded", "packed"])
def test_a_cpu_model_on_sdpa_is_switched_and_fp32_passes_through_bit_exactly(inputs):
    model = tiny_model()
    before = model(INPUT, **inputs).logits
    assert use_fp32_attention(model) and model.config._attn_implementation == NAME
    assert torch.equal(model(INPUT, **inputs).logits, before)  # fp32: the same sdpa call, with the same mask
    if inputs:
        assert not torch.equal(before, model(INPUT).logits)  # the mask matters here


def test_an_eager_model_is_left_alone():
    model = tiny_model(attn_implementation="eager")
    assert not use_fp32_attention(model) and model.config._attn_implementation == "eager"


def test_load_base_model_switches_it(tiny_model_dir):
    model = load_base_model(ModelConfig(base=str(tiny_model_dir), dtype="bfloat16"))
    assert model.config._attn_implementation == NAME


@pytest.mark.numerics
def test_a_bf16_model_with_fp32_attention_stays_within_bf16_of_the_fp32_model_forward_and_backward():
    reference = tiny_model()
    model = tiny_model().to(torch.bfloat16)
    use_fp32_attention(model)
    embedded = model.get_input_embeddings()(INPUT).detach().requires_grad_(True)
    logits = model(inputs_embeds=embedded, position_ids=POSITIONS, use_cache=False).logits  # packed: masked
    assert logits.dtype == torch.bfloat16
    ref_embedded = embedded.detach().float().requires_grad_(True)
    expected = reference(inputs_embeds=ref_embedded, position_ids=POSITIONS, use_cache=False).logits
    reduction = reduction_through(reference, tokens=INPUT.numel())
    assert_close_by_rule(logits, expected, reduction=reduction)
    upstream = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    logits.backward(upstream.bfloat16())
    expected.backward(upstream)
    assert embedded.grad.dtype == torch.bfloat16  # the input's gradient comes back in its own dtype
    assert_close_by_rule(embedded.grad, ref_embedded.grad, reduction=reduction)
