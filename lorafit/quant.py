"""A bitsandbytes 4-bit or 8-bit base (QLoRA): its settings, training preparation, memory, CPU kernel layout.

bitsandbytes is imported only by transformers when a quantized base is loaded; nothing here imports it,
so plain runs never pay for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafit.errors import LorafitError

# bitsandbytes' CPU inference kernel for 4-bit weights (used on CPUs with avx512_bf16) takes output rows
# in tiles of 32 and needs whole quantization blocks along the input.
PACKED_ROW_TILE = 32


def quantization_config(quantize: str, quant_type: str, double_quant: bool, compute_dtype: torch.dtype):
    """bitsandbytes settings for a QLoRA base: every linear layer but the output head (transformers
    leaves the head alone) stored in 4 or 8 bits; 4-bit layers compute in ``compute_dtype``."""
    try:
        from transformers import BitsAndBytesConfig
    except ImportError as err:  # pragma: no cover - transformers always has it
        raise LorafitError(f"model.quantize needs transformers' bitsandbytes support ({err})") from None
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )


def keep_unquantized_in_fp32(model: torch.nn.Module) -> None:
    """k-bit training preparation: what stays unquantized (norms, embeddings, head) is held in fp32, so
    the small corrections LoRA learns are not drowned by 16-bit rounding of those layers (PEFT's
    prepare_model_for_kbit_training does the same)."""
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()


@dataclass(frozen=True)
class CpuLayout:
    """4-bit layers, whether this CPU has bitsandbytes' packed kernel, and the layers it cannot take."""

    layers: int
    kernel_available: bool
    unpackable: list[tuple[str, tuple[int, int]]]  # (module name, (out_features, in_features))

    def describe(self) -> str:
        text = f"{self.layers} linear layers in 4 bit"
        if not self.kernel_available:
            return text + " (bitsandbytes' generic CPU kernel)" if self.layers else text
        text += (f"; eval and generate use bitsandbytes' packed bf16 CPU kernel for "
                 f"{self.layers - len(self.unpackable)} of them (training never repacks)")
        if self.unpackable:
            name, (out_features, in_features) = self.unpackable[0]
            text += (f"; {len(self.unpackable)} keep the generic kernel because the packed one needs out_features "
                     f"in multiples of {PACKED_ROW_TILE} and whole quantization blocks of in_features "
                     f"(e.g. {name}: [{out_features}, {in_features}])")
        return text


def set_cpu_4bit_layout(model: torch.nn.Module, training: bool) -> None:
    """Decide, per 4-bit layer, whether bitsandbytes may repack its weight for its CPU inference kernel.

    On CPUs with avx512_bf16, bitsandbytes (0.50 here) repacks a 4-bit weight the first time the layer runs
    in eval mode without gradients (an eval pass, generation): absmax scales become bf16 and later calls
    use a fused bf16 kernel. Two reasons to control that here:
    - training: the repack is one-way (the scales are rounded to bf16) and the packed kernel has no
      backward, so a training run that evaluates would go on with changed base weights and no input
      gradient through them. Training keeps the layout it trains with, on every CPU.
    - inference: the kernel takes ``out_features`` in tiles of 32 and whole quantization blocks of
      ``in_features``; on other shapes bitsandbytes fails with a reshape error, so those layers keep the
      generic kernel (de-quantize, then matmul).
    Elsewhere (other CPUs, GPUs) bitsandbytes never repacks, and this changes nothing.
    """
    for _, module in _four_bit_layers(model):
        if module.support_avx512bf16_for_cpu and (training or not _fits_packed_kernel(module)):
            module.support_avx512bf16_for_cpu = False


def cpu_4bit_layout(model: torch.nn.Module) -> CpuLayout:
    layers = _four_bit_layers(model)
    unpackable = [(name, (m.out_features, m.in_features)) for name, m in layers if not _fits_packed_kernel(m)]
    return CpuLayout(len(layers), bool(layers) and _packed_kernel_available(), unpackable)


def _four_bit_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    # bitsandbytes' Linear4bit carries this flag where it has the packed CPU kernel (0.50 does).
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "support_avx512bf16_for_cpu")]


def _fits_packed_kernel(module: torch.nn.Module) -> bool:
    blocksize = getattr(module.weight, "blocksize", None) or 64
    return module.out_features % PACKED_ROW_TILE == 0 and module.in_features % blocksize == 0


def _packed_kernel_available() -> bool:
    from bitsandbytes.nn import modules  # loaded already: the model has 4-bit layers

    return bool(modules.has_avx512bf16())


def base_memory(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes the base weights take now, bytes they would take in 16 bit).

    A 4-bit weight is a packed uint8 tensor plus per-block scales (its ``quant_state``); its original
    shape is kept in that state, which gives the 16-bit size.
    """
    actual = sixteen_bit = 0
    for param in model.parameters():
        if param.requires_grad:
            continue
        actual += param.numel() * param.element_size()
        state = getattr(param, "quant_state", None)
        if state is not None:
            actual += _quant_state_bytes(state)
            sixteen_bit += 2 * int(torch.Size(state.shape).numel())
        else:
            sixteen_bit += 2 * param.numel()
    return actual, sixteen_bit


def _quant_state_bytes(state) -> int:
    total = 0
    for value in (getattr(state, "absmax", None), getattr(state, "code", None)):
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    nested = getattr(state, "state2", None)
    return total + (_quant_state_bytes(nested) if nested is not None else 0)
