"""A bitsandbytes 4-bit or 8-bit base (QLoRA): its settings, training preparation, memory, CPU kernel layout.

bitsandbytes is imported only by transformers when a quantized base is loaded; nothing here imports it,
so plain runs never pay for it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from lorafit.adapters.base import ROUNDED_ONCE, rounded_once
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


def compute_residual_in_fp32(model: torch.nn.Module) -> None:
    """k-bit training preparation: the residual stream, and so every norm, computes in fp32, so the small
    corrections LoRA learns are not drowned by 16-bit rounding there (what PEFT's
    prepare_model_for_kbit_training gets by casting norms, embeddings and head to fp32).

    The weights that stay unquantized keep the dtype they were loaded in: an fp32 copy of a bf16-loaded
    weight holds the same values at twice the memory (a 1B Llama's embeddings and head: 0.8 GB instead of
    0.4). The input embedding's output is cast to fp32 instead, which makes the residual stream fp32 from
    the first layer on, and a norm's 16-bit weight times an fp32 hidden state computes in fp32 by type
    promotion: the same numbers as fp32 weights give. The output head takes its input in its own dtype where
    autocast does not already cast it (under autocast it computes in the compute dtype either way).
    """
    model.get_input_embeddings().register_forward_hook(_output_to_fp32)
    head = model.get_output_embeddings()
    if head is not None and head.weight.dtype != torch.float32:
        head.register_forward_pre_hook(_input_to_weight_dtype)


def _output_to_fp32(module: torch.nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return output.float()


def _input_to_weight_dtype(module: torch.nn.Module, args):
    hidden = args[0]
    if torch.is_autocast_enabled(hidden.device.type) or hidden.dtype == module.weight.dtype:
        return None
    return (hidden.to(module.weight.dtype), *args[1:])


@torch.no_grad()
def own_unquantized_weights(model: torch.nn.Module) -> None:
    """Copy the weights that stay unquantized (embeddings, head, norms) and the buffers out of the checkpoint's
    memory map, on the CPU. Loading maps the whole safetensors file and quantizes from it; while any tensor
    still points into that map, every page read during quantization stays resident (as file-backed memory),
    so the full-precision checkpoint kept counting against the process. Measured on the bench's ~1B Llama
    (2026-12-06, Intel AMX VM): RSS after loading 2.19 GB (1.48 GB of it the map), 1.20 GB after this."""
    for tensor in [*model.parameters(), *model.buffers()]:  # each tied weight once: Parameters are shared
        if tensor.device.type == "cpu" and tensor.dtype not in (torch.uint8, torch.int8):
            tensor.data = tensor.data.clone()


def trains_fused(layer: torch.nn.Module) -> bool:
    """Whether LoRA over this base layer runs as ``lora_over_4bit``: a bitsandbytes 4-bit layer in the layout it
    trains with (not repacked for the CPU inference kernel, which training turns off: ``set_cpu_4bit_layout``)."""
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    return (state is not None and hasattr(layer, "compute_dtype")
            and not getattr(layer, "support_avx512bf16_for_cpu", False)
            and not getattr(state, "packing_format_for_cpu", False))


def lora_over_4bit(layer: torch.nn.Module, x: torch.Tensor, dropout: torch.nn.Module, lora_A: torch.Tensor,
                   lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W·x + scaling·B·A·dropout(x) over a 4-bit ``layer``, in its compute dtype; x: (..., in) -> (..., out).

    What backward keeps is what a bf16 LoRA layer keeps: the LoRA input in the compute dtype (one copy shared
    by the projections that read the same input: ``cast_once``) and A·x (N, r). The 4-bit weight is
    de-quantized again in backward, as bitsandbytes does, never kept. The output is in the compute dtype,
    like a bf16 layer's, not upcast to an fp32 input's dtype: downstream activations (attention, the MLP's
    elementwise ops) stay 16-bit; the residual stream, which adds this output, stays fp32.
    """
    dtype = layer.compute_dtype or x.dtype
    flat = cast_once(x, dtype).reshape(-1, layer.in_features)  # (N, in)
    lora_in = dropout(flat)
    out = _FourBitLoRA.apply(flat, lora_in, lora_A, lora_B, layer, scaling)  # (N, out)
    return out.view(*x.shape[:-1], layer.out_features)


_last_cast: tuple[weakref.ref, int, torch.Tensor] | None = None


def cast_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``, reusing the previous call's copy when ``x`` is the same, unchanged tensor: q, k and v
    (gate and up) read one input, and each would otherwise keep its own 16-bit copy for backward."""
    global _last_cast
    if x.dtype == dtype:
        return x
    if _last_cast is not None:
        source, version, cast = _last_cast
        if source() is x and x._version == version and cast.dtype == dtype:
            return cast
    cast = x.to(dtype)
    _last_cast = (weakref.ref(x), x._version, cast)
    return cast


class _FourBitLoRA(torch.autograd.Function):
    """out = W·x (+ bias) + s·(lora_in·Aᵀ)·Bᵀ in the compute dtype; saves lora_in and lora_in·Aᵀ only."""

    @staticmethod
    def forward(ctx, x, lora_in, lora_A, lora_B, layer, scaling):
        import bitsandbytes as bnb  # loaded already: the model has 4-bit layers
        from bitsandbytes.functional import dequantize_4bit

        dtype = x.dtype
        bias = None if layer.bias is None else layer.bias.to(dtype)
        down = lora_in @ lora_A.to(dtype).T  # (N, r)
        if dtype in ROUNDED_ONCE:
            # Added to a rounded 16-bit output, updates below half its spacing would be lost (QLoRA learned like
            # bf16 LoRA, far slower than PEFT's); rounded once, they are not.
            weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)  # what matmul_4bit does
            out = rounded_once(x, down, weight, (lora_B * scaling).to(dtype), bias)
        else:
            out = bnb.matmul_4bit(x, layer.weight, quant_state=layer.weight.quant_state)  # (N, out), no grad here
            if bias is not None:
                out += bias
            # Under autocast (precision: bf16 over an fp32 base) the 4-bit matmul returns bf16: add in its dtype.
            out.addmm_(down.to(out.dtype), lora_B.to(out.dtype).T, alpha=scaling)
        ctx.save_for_backward(lora_in, down, lora_A, lora_B)
        ctx.layer, ctx.scaling = layer, scaling
        return out

    @staticmethod
    def backward(ctx, grad):
        from bitsandbytes.functional import dequantize_4bit

        lora_in, down, lora_A, lora_B = ctx.saved_tensors
        needs_x, needs_in, needs_A, needs_B = ctx.needs_input_grad[:4]
        grad = grad.to(down.dtype)
        grad_down = (grad @ lora_B.to(grad.dtype)).mul_(ctx.scaling)  # (N, r)
        grad_x = grad_in = grad_A = grad_B = None
        if needs_x:
            weight = ctx.layer.weight
            grad_x = grad @ dequantize_4bit(weight.data, weight.quant_state).to(grad.dtype)  # (N, in)
        if needs_in:
            grad_in = grad_down @ lora_A.to(grad.dtype)
        if needs_A:
            # lora_in may be fp32 where autocast ran down = lora_in·Aᵀ in bf16 (precision: bf16, fp32 base)
            grad_A = (grad_down.T @ lora_in.to(grad_down.dtype)).to(lora_A.dtype)  # [r, in]
        if needs_B:
            grad_B = (grad.T @ down).mul_(ctx.scaling).to(lora_B.dtype)  # [out, r]
        return grad_x, grad_in, grad_A, grad_B, None, None


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
