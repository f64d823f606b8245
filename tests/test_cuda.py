"""The CUDA paths: bf16 without autocast, QLoRA on a GPU, and a whole run. Skipped without a GPU."""

import json

import pytest
import torch

from lorafit import precision
from lorafit.config import LoRAConfig, ModelConfig, load_recipe
from lorafit.inject import adapters_to_float32, inject_lora
from lorafit.loss import token_loss_sum, trained_positions
from lorafit.model import load_base_model
from lorafit.train import train as run_training

from .conftest import model_folder, randomize_lora_B, tiny_model, write_recipe

pytestmark = pytest.mark.gpu


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "tiny-64"
    model_folder(tiny_model(hidden_size=64, intermediate_size=128, initializer_range=0.1), folder)
    return folder


def batch(device):
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1)).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def test_auto_is_bf16_without_autocast_on_a_bf16_gpu():
    plan = precision.resolve("auto", "auto")
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        assert (plan.precision, plan.model_dtype, plan.autocast) == ("fp16", "float16", True)
    else:
        assert (plan.precision, plan.model_dtype, plan.autocast) == ("bf16", "bfloat16", False)


def loss_and_grads(model, data):
    loss = token_loss_sum(model, data) / trained_positions(data)
    loss.backward()
    return loss.item(), {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}


def test_bf16_step_on_gpu_matches_fp32_on_cpu(model_dir):
    """lorafit's bf16 path on CUDA (bf16 base, fp32 LoRA weights, no autocast) against fp32 on CPU."""
    results = []
    for device, dtype in (("cpu", "float32"), ("cuda", "bfloat16")):
        torch.manual_seed(0)
        model = load_base_model(ModelConfig(base=str(model_dir), dtype=dtype), training=True)
        inject_lora(model, LoRAConfig(r=4, alpha=8))  # on the CPU: the same A for both
        adapters_to_float32(model)
        randomize_lora_B(model)
        model.to(device)
        results.append(loss_and_grads(model.train(), batch(device)))
    (cpu_loss, cpu_grads), (gpu_loss, gpu_grads) = results
    assert gpu_loss == pytest.approx(cpu_loss, rel=2e-2)  # bf16: 8 significant bits
    for name, grad in cpu_grads.items():
        assert gpu_grads[name].dtype == torch.float32
        torch.testing.assert_close(gpu_grads[name], grad, atol=5e-2 * grad.abs().max().item(), rtol=0)


def test_qlora_step_on_gpu(model_dir):
    model = load_base_model(ModelConfig(base=str(model_dir), dtype="bfloat16", quantize="4bit"), training=True)
    model.to("cuda")
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    adapters_to_float32(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(model.train(), batch("cuda"))
    assert torch.isfinite(torch.tensor(loss)) and grads and all("lora_" in n for n in grads)


def test_training_run_on_gpu_reports_cuda_memory(tmp_path, model_dir):
    rows = [{"prompt": f"day {d}", "completion": f"2020-01-{d:02d}"} for d in range(1, 17)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = f"""\
model: {{base: {model_dir}}}
data: {{train: {tmp_path / 'train.jsonl'}, eval: {tmp_path / 'train.jsonl'}}}
train: {{max_steps: 8, micro_batch_size: 8, lr: 1.0e-2, eval_every: 8}}
output: {{dir: {tmp_path / 'out'}}}
"""
    summary = run_training(load_recipe(write_recipe(tmp_path / "r.yaml", text)))
    assert summary.eval_loss < summary.base_eval_loss
    assert 0 < summary.peak_memory_bytes <= torch.cuda.max_memory_allocated()
