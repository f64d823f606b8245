"""QLoRA: our LoRA layers over a bitsandbytes 4-bit (and 8-bit) base, on CPU, on a tiny random Llama."""

import json

import pytest
import torch

from lorafit.adapter_io import load_adapter, save_adapter
from lorafit.config import LoRAConfig, ModelConfig, load_recipe
from lorafit.errors import LorafitError
from lorafit.inject import inject_lora, lora_modules
from lorafit.merge import merge_adapter
from lorafit.model import load_base_model
from lorafit.quant import base_memory
from lorafit.train import train as run_training

from .conftest import ctrl_c_after_step, randomize_lora_B, tiny_model, tiny_tokenizer, write_recipe

bnb = pytest.importorskip("bitsandbytes")


def quantized(model_dir, bits: str = "4bit", **overrides):
    return load_base_model(ModelConfig(base=str(model_dir), dtype="float32", quantize=bits, **overrides))


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
        torch.testing.assert_close(fresh(input_ids).logits, expected, atol=0, rtol=0)


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
        torch.testing.assert_close(merged(input_ids).logits, reference(input_ids).logits, atol=1e-5, rtol=0)


@pytest.fixture
def qlora_run(tmp_path):
    # Larger init than the default 0.02, so the tiny model can actually fit the data (see test_evaluate).
    model_dir = tmp_path / "model"
    tiny_model(initializer_range=0.5).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    rows = [{"prompt": f"day {d}", "completion": f"2020-01-{d:02d}"} for d in range(1, 17)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def recipe(out: str, *overrides: str):
        text = f"""\
model: {{base: {model_dir}, dtype: float32, quantize: 4bit}}
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
