"""Attention for a bf16 (or fp16) model on a CPU: transformers' SDPA attention with its kernel run in fp32.

Measured on a 2-core Intel Xeon with AMX (family 6 model 207, torch 2.13, 2026-12-06), SmolLM2 in bf16, LoRA
r=16 all-linear, 4 x 256 tokens: attention was 27% of a bf16 training step against 11% of an fp32 one
(``scripts/profile_step.py``): CPU flash attention's backward is slower on bf16 inputs than on fp32 ones.
Casting q, k and v to fp32 for the kernel and its output back (four [batch, heads, tokens, 64] casts per layer)
made the whole training step 8% faster (median of 8 alternating steps in one process, packed batches:
1.33 s against 1.45 s). It is also more exact: no rounding of the attention's inputs' gradients to bf16
inside the kernel.

``use_fp32_attention(model)`` switches a loaded model to it: only models on transformers' ``sdpa`` attention on
the CPU (a GPU's bf16 flash kernels are fast as they are); fp32 inputs pass through unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "lorafit_sdpa_fp32"


def sdpa_in_fp32(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa_attention_forward`` over fp32 copies of q, k, v (and of a float mask); the output
    [batch, tokens, heads, head_dim] comes back in the inputs' dtype."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                          *args, **kwargs)
    return out.to(dtype), weights


def use_fp32_attention(model: torch.nn.Module) -> bool:
    """Switch ``model`` (on the CPU, in bf16/fp16, on sdpa attention) to ``sdpa_in_fp32``; whether it did."""
    from transformers import AttentionInterface

    config = getattr(model, "config", None)
    weight = next(model.parameters(), None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or weight is None or weight.device.type != "cpu":
        return False  # fp32 inputs pass through sdpa_in_fp32 untouched, so the dtype is decided per call
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, sdpa_in_fp32)
    # The masks sdpa gets (padding, packed sequences): transformers builds none for an attention it does not know.
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError, NotImplementedError):  # a model that pins its attention: leave it as is
        return False
    return True
