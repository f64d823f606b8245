"""QLoRA: our LoRA layers over a bitsandbytes 4-bit (and 8-bit) base, on CPU, on tiny random Llamas.

Most tests use a model whose linear layers are 64 wide: multiples of the 4-bit block (64) and of the
32-row tile of bitsandbytes' packed CPU kernel, so on CPUs with avx512_bf16 the inference tests run the
packed path bitsandbytes takes there. ``force_bf16_cpu_4bit_path`` forces that path on every CPU.
"""

import json

import pytest
import torch

from lorafit.adapter_io import load_adapter, save_adapter
from lorafit.config import LoRAConfig, ModelConfig, load_recipe
from lorafit.errors import LorafitError
from lorafit.inject import inject_lora, lora_modules
from lorafit.merge import merge_adapter
from lorafit.model import load_base_model
from lorafit.quant import base_memory, cpu_4bit_layout
from lorafit.train import train as run_training

from .conftest import ctrl_c_after_step, model_folder, randomize_lora_B, tiny_model, write_recipe
from .tolerance import assert_close_by_rule, reduction_through

bnb = pytest.importorskip("bitsandbytes")
PACKABLE = {"hidden_size": 64, "intermediate_size": 128}  # q/o 64x64, k/v 32x64, MLP 128x64 and 64x128


def quantized(model_dir, bits: str = "4bit", training: bool = False, **overrides):
    config = ModelConfig(base=str(model_dir), dtype="float32", quantize=bits, **overrides)
    return load_base_model(config, training=training)


@pytest.fixture
def tiny_model_dir(tmp_path):
    """This file's default model: a tiny Llama whose layers the packed 4-bit CPU kernel can take."""
    folder = tmp_path / "tiny-llama-64"
    model_folder(tiny_model(**PACKABLE), folder)
    return folder


@pytest.fixture
def narrow_model_dir(tmp_path):
    """32 wide: most layers are smaller than a 4-bit block, which the packed kernel cannot take."""
    folder = tmp_path / "tiny-llama-32"
    model_folder(tiny_model(), folder)
    return folder


@pytest.fixture
def input_ids():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (2, 12), generator=generator)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_base_forward_backward_gives_lora_grads_only(tiny_model_dir, input_ids, bits):
    model = quantized(tiny_model_dir, bits)
    layer_type = bnb.nn.Linear4bit if bits == "4bit" else bnb.nn.Linear8bitLt
    assert isinstance(model.model.layers[0].self_attn.q_proj, layer_type)
    assert not isinstance(model.lm_head, layer_type)  # the output head stays full precision
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    module = lora_modules(model)["model.layers.0.self_attn.q_proj"]
    assert isinstance(module.base_layer, layer_type) and module.lora_A.weight.dtype == torch.float32
    model.train()
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_4bit_memory_is_a_fraction_of_16bit(tiny_model_dir):
    model = quantized(tiny_model_dir, quant_type="nf4", double_quant=True)
    actual, sixteen = base_memory(model)
    full = load_base_model(ModelConfig(base=str(tiny_model_dir), dtype="bfloat16"))
    assert base_memory(full) == (sixteen, sixteen)
    # tiny model: embeddings and head (kept in fp32) dominate, so only a loose bound here;
    # the linear layers themselves must be ~4x smaller than bf16
    linear_4bit = sum(p.numel() for n, p in model.named_parameters() if "layers" in n and p.dtype == torch.uint8)
    linear_bf16 = sum(p.numel() * 2 for n, p in full.named_parameters() if "layers" in n and p.ndim == 2)
    assert linear_4bit / linear_bf16 == pytest.approx(0.25, rel=0.01)
    assert actual < sixteen * 2


def test_saved_adapter_reloads_over_a_fresh_4bit_base(tmp_path, tiny_model_dir, input_ids):
    model = quantized(tiny_model_dir)
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    randomize_lora_B(model)
    with torch.no_grad():
        expected = model(input_ids).logits
    save_adapter(model, tmp_path / "adapter")
    fresh = quantized(tiny_model_dir)
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        # the same code on the same weights and inputs: bit-exact
        torch.testing.assert_close(fresh(input_ids).logits, expected, atol=0, rtol=0)


@pytest.mark.numerics
def test_merge_of_qlora_adapter_into_full_precision_base(tmp_path, tiny_model_dir, input_ids):
    """Never into 4-bit weights: the adapter trained on the 4-bit base merges into the fp32 checkpoint."""
    model = quantized(tiny_model_dir)
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    randomize_lora_B(model)
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(TypeError, match="quantized"):
        lora_modules(model)["model.layers.0.mlp.up_proj"].merge()
    merge_adapter(str(tiny_model_dir), tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    reference = load_base_model(ModelConfig(base=str(tiny_model_dir), dtype="float32"))
    load_adapter(reference, tmp_path / "adapter")
    with torch.no_grad():
        assert_close_by_rule(merged(input_ids).logits, reference(input_ids).logits,
                             reduction=reduction_through(reference, tokens=input_ids.numel()))


@pytest.fixture
def qlora_run(tmp_path):
    # Larger init than the default 0.02, so the tiny model can actually fit the data (see test_evaluate).
    for name, shape in (("model", PACKABLE), ("narrow", {})):
        model_folder(tiny_model(initializer_range=0.5, **shape), tmp_path / name)
    rows = [{"prompt": f"day {d}", "completion": f"2020-01-{d:02d}"} for d in range(1, 17)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def recipe(out: str, *overrides: str, model: str = "model"):
        text = f"""\
model: {{base: {tmp_path / model}, dtype: float32, quantize: 4bit}}
lora: {{r: 8, alpha: 16}}
data: {{train: {tmp_path / 'train.jsonl'}}}
train: {{max_steps: 6, micro_batch_size: 8, lr: 1.0e-2, precision: "no", optimizer: adamw_8bit, save_every: 3,
         scheduler: constant}}
output: {{dir: {tmp_path / out}}}
"""
        return load_recipe(write_recipe(tmp_path / f"{out}.yaml", text), list(overrides))

    return tmp_path, recipe


def losses(out):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]


def test_qlora_training_reduces_loss(qlora_run):
    folder, recipe = qlora_run
    run_training(recipe("a", "train.max_steps=12"))
    curve = losses(folder / "a")
    assert curve[-1] < 0.5 * curve[0]


def test_8bit_optimizer_state_resumes_exactly(qlora_run, monkeypatch):
    folder, recipe = qlora_run
    run_training(recipe("straight"))
    # interrupted after step 4 (checkpoint at 3 from save_every, and one written on the interrupt)
    with ctrl_c_after_step(monkeypatch, 4), pytest.raises(LorafitError, match="interrupted after step 4"):
        run_training(recipe("resumed"))
    run_training(recipe("resumed"), resume="latest")
    assert losses(folder / "resumed") == losses(folder / "straight")


@pytest.mark.parametrize("optimizer", ["paged_adamw_8bit", "paged_adamw_32bit"])
def test_paged_optimizers_run_on_cpu(qlora_run, optimizer):
    folder, recipe = qlora_run
    summary = run_training(recipe(optimizer, f"train.optimizer={optimizer}", "train.max_steps=2"))
    assert summary.steps == 2


# ---- the 4-bit path bitsandbytes takes on CPUs with avx512_bf16, on every CPU ----

def reference_packed_gemv(A, B, out=None, transposed_A=False, transposed_B=False, state=None):
    """What bitsandbytes' packed CPU kernel computes, in torch: y = A · dequant(W)ᵀ in bf16.

    Packed layout (bitsandbytes.functional._convert_weight_packed_for_cpu): B is [N, K/2] bytes holding
    the 4-bit codes in groups of 32 rows x 2 columns (32 low nibbles, then 32 high); absmax is [K/block, N].
    """
    N, K = state.shape
    packed = B.view(torch.uint8).reshape(-1, 32)
    codes = torch.cat([packed & 0xF, packed >> 4], dim=-1)  # [.., 64]: 32 low nibbles, then 32 high
    codes = codes.reshape(N // 32, K // 2, 32, 2).transpose(1, 2).reshape(N, K)
    scales = state.absmax.float().T  # [N, K/block]
    weight = (state.code.float()[codes.long()].reshape(N, K // state.blocksize, state.blocksize)
              * scales[:, :, None]).reshape(N, K)
    result = (A.bfloat16().float() @ weight.bfloat16().float().T).bfloat16().to(A.dtype)
    return out.copy_(result) if out is not None else result


def force_bf16_cpu_4bit_path(monkeypatch) -> bool:
    """Make bitsandbytes take the 4-bit path of a CPU with avx512_bf16 (repack on first eval-mode call, then
    the packed kernel). Where this CPU has avx512_bf16, bitsandbytes' own kernel runs; elsewhere that kernel
    would stop the process (illegal instruction), so ``reference_packed_gemv`` stands in for it.
    Returns True when the real kernel runs."""
    import bitsandbytes.functional as bnb_functional
    import bitsandbytes.nn.modules as bnb_modules

    real = bool(bnb_functional.has_avx512bf16())
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    if not real:
        monkeypatch.setattr(bnb_functional, "gemv_4bit", reference_packed_gemv)
    return real


def packed(model) -> dict[str, bool]:
    return {name: bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
            for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


@pytest.mark.numerics
def test_inference_uses_the_packed_layout_and_agrees_with_the_generic_kernel(tiny_model_dir, input_ids, monkeypatch):
    generic = quantized(tiny_model_dir, training=True)  # never repacks, on any CPU: the generic kernel
    with torch.no_grad():
        expected = generic(input_ids).logits
    assert not any(packed(generic).values())
    force_bf16_cpu_4bit_path(monkeypatch)  # from here on, the CPU "has" avx512_bf16
    model = quantized(tiny_model_dir)
    assert cpu_4bit_layout(model).kernel_available and not cpu_4bit_layout(model).unpackable
    with torch.no_grad():
        logits = model(input_ids).logits
    assert all(packed(model).values()) and len(packed(model)) == 14
    # bf16 kernel and bf16 scales against the fp32 generic kernel: each of the 14 quantized layers rounds its
    # scales and its output to bf16 (sums in fp32), so the rule in bf16 with one rounding per layer
    assert_close_by_rule(logits, expected, reduction=len(packed(model)), dtype=torch.bfloat16)


def test_layers_the_packed_kernel_cannot_take_keep_the_generic_kernel(narrow_model_dir, input_ids, monkeypatch):
    """On a CPU with avx512_bf16, bitsandbytes alone fails on these with "shape '[32, 0]' is invalid"."""
    force_bf16_cpu_4bit_path(monkeypatch)
    model = quantized(narrow_model_dir)
    layout = cpu_4bit_layout(model)
    with torch.no_grad():
        logits = model(input_ids).logits
    assert torch.isfinite(logits).all()
    fits = packed(model)
    assert fits["model.layers.0.mlp.down_proj"]  # [32, 64]: packable
    assert not fits["model.layers.0.self_attn.q_proj"]  # [32, 32]: in_features below one block
    assert {name for name, _ in layout.unpackable} == {n for n, ok in fits.items() if not ok}
    assert len(layout.unpackable) == 12 and "(e.g. model.layers.0.self_attn.q_proj: [32, 32])" in layout.describe()


def numbers(out) -> list[dict]:
    """Every logged loss, eval loss and gradient norm (not the timings)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def test_training_never_repacks_and_matches_the_generic_path_exactly(qlora_run, monkeypatch):
    """An eval pass inside training must not repack the base (one-way, and the packed kernel has no
    backward): the losses and eval losses equal those of a CPU without avx512_bf16, bit for bit."""
    import bitsandbytes.nn.modules as bnb_modules

    folder, recipe = qlora_run
    (folder / "eval.jsonl").write_text((folder / "train.jsonl").read_text())
    overrides = (f"data.eval={folder / 'eval.jsonl'}", "train.eval_every=2")
    for model in ("model", "narrow"):
        run_training(recipe(f"generic-{model}", *overrides, model=model))
    force_bf16_cpu_4bit_path(monkeypatch)
    repacks = []
    original = bnb_modules._convert_weight_packed_for_cpu
    monkeypatch.setattr(bnb_modules, "_convert_weight_packed_for_cpu",
                        lambda *args, **kwargs: repacks.append(1) or original(*args, **kwargs))
    for model in ("model", "narrow"):
        run_training(recipe(f"forced-{model}", *overrides, model=model))
        assert numbers(folder / f"forced-{model}") == numbers(folder / f"generic-{model}")
    assert repacks == []


@pytest.mark.numerics
def test_bitsandbytes_packed_kernel_agrees_with_the_reference():
    """The stand-in above is only worth something if it computes what the real kernel computes."""
    import bitsandbytes.functional as bnb_functional

    if not bnb_functional.has_avx512bf16():
        pytest.skip("this CPU has no avx512_bf16, so bitsandbytes' packed 4-bit kernel cannot run here "
                    "(the packed-path tests above used reference_packed_gemv instead)")
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 96, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(96, 128), requires_grad=False, quant_type="nf4").to("cpu")
    layer.eval()
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        real = layer(x)
    state = layer.weight.quant_state
    assert state.packing_format_for_cpu
    # both sum in fp32 and round the output to bf16 once: the rule in bf16, one rounding
    assert_close_by_rule(real, reference_packed_gemv(x, layer.weight.data, state=state), reduction=1,
                         dtype=torch.bfloat16)


@pytest.mark.numerics
def test_lora_over_a_4bit_base_is_the_formula_in_bf16_and_keeps_one_16bit_input(tiny_model_dir):
    """In bf16 compute, a 4-bit LoRA layer is W·x + s·B·A·x with x, A, B rounded to bf16 once, returns bf16, and
    what backward keeps is one bf16 copy of an fp32 input, shared by the projections that read it."""
    from bitsandbytes.functional import dequantize_4bit

    model = load_base_model(ModelConfig(base=str(tiny_model_dir), dtype="bfloat16", quantize="4bit"), training=True)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16  # no fp32 copy of bf16-loaded weights
    assert model.get_input_embeddings()(torch.tensor([[1, 2]])).dtype == torch.float32  # the residual stream
    inject_lora(model, LoRAConfig(r=4, alpha=8), for_training=True)
    randomize_lora_B(model)
    attention = model.model.layers[0].self_attn
    layers = [lora_modules(model)[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv"]
    x = torch.randn(2, 12, 64, requires_grad=True)
    saved = set()

    def pack(tensor):
        if tensor.dtype == torch.bfloat16 and tensor.shape[-1] == 64:
            saved.add(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = [layer(x) for layer in layers]
    assert all(out.dtype == torch.bfloat16 for out in outs) and len(saved) == 1
    assert attention.q_proj is layers[0]
    upstream = [torch.randn(out.shape) for out in outs]
    torch.autograd.backward(outs, upstream)
    for layer, out, up in zip(layers, outs, upstream):
        x_ref = x.detach().bfloat16().float().requires_grad_(True)
        A, B = (p.detach().bfloat16().float().requires_grad_(True) for p in (layer.lora_A.weight, layer.lora_B.weight))
        weight = dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state).float()
        expected = x_ref @ weight.T + layer.scaling * (x_ref @ A.T @ B.T)
        expected.backward(up)
        assert_close_by_rule(out, expected.detach(), reduction=64 + 4, dtype=torch.bfloat16)
        for got, want in ((layer.lora_A.weight.grad, A.grad), (layer.lora_B.weight.grad, B.grad)):
            assert_close_by_rule(got, want, reduction=64 + 4 + 24, dtype=torch.bfloat16)  # + the 24 tokens
        layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
    assert x.grad is not None and torch.isfinite(x.grad).all()


def mapped_ranges(name: str) -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of files called ``name`` (Linux /proc/self/maps)."""
    ranges = []
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith(name):
            start, end = line.split()[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def test_a_4bit_base_keeps_nothing_in_the_checkpoint_map(tmp_path):
    """Weights that stay unquantized are copied out of the safetensors memory map: a tensor left inside it keeps
    the whole map, and every page quantization read, resident (1.5 GB of a 1B model's RSS)."""
    folder = tmp_path / "tiny-64"
    tiny_model(hidden_size=64, intermediate_size=128).save_pretrained(folder)
    model = load_base_model(ModelConfig(base=str(folder), dtype="float32", quantize="4bit"), training=True)
    ranges = mapped_ranges("model.safetensors")
    inside = [name for name, t in [*model.named_parameters(), *model.named_buffers()]
              if any(start <= t.data_ptr() < end for start, end in ranges)]
    assert not inside, f"still in the checkpoint's map: {inside[:5]}"
