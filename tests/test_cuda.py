"""The CUDA paths, skipped (with the reason) without a GPU: bf16 without autocast, QLoRA, whole runs with every
variant and a resume, eval and generate on the GPU (model and inputs), merge of a GPU-trained adapter, and DDP
over two GPUs where two exist.

Tolerances (tests/README.md's rule): CUDA kernels (cuBLAS split-K, SDPA backward) are not bit-reproducible
run to run, so comparisons on the GPU are never bit-exact: bf16 values are compared at bf16's eps-scaled
tolerance (rtol 1.6e-2, torch.testing's bf16 default), fp32 ones at a few times fp32 eps times the reduction.
"""

import json
import subprocess
import sys

import pytest
import torch

from lorafit import precision
from lorafit.config import LoRAConfig, ModelConfig, load_recipe
from lorafit.inject import inject_lora
from lorafit.loss import token_loss_sum, trained_positions
from lorafit.model import load_base_model
from lorafit.train import train as run_training

from .conftest import ctrl_c_after_step, model_folder, randomize_lora_B, tiny_model, train_losses, write_recipe
from .tolerance import assert_close_by_rule, reduction_through

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
        inject_lora(model, LoRAConfig(r=4, alpha=8), for_training=True)  # on the CPU: the same A for both
        randomize_lora_B(model)
        model.to(device)
        results.append(loss_and_grads(model.train(), batch(device)))
    (cpu_loss, cpu_grads), (gpu_loss, gpu_grads) = results
    # Not one value through two kernels but bf16 against fp32: every layer's inputs and weights rounded to 8
    # bits (relative 2^-8 each). The loss is a mean over 46 positions, so those roundings average down to bf16's
    # floor (rtol 1.6e-2, torch.testing's bf16 default); a gradient is one sum per element through the backward
    # of every layer, held to 3x that floor relative to the largest element (what 2 layers x 3 roundings give).
    assert gpu_loss == pytest.approx(cpu_loss, rel=1.6e-2)
    for name, grad in cpu_grads.items():
        assert gpu_grads[name].dtype == torch.float32
        torch.testing.assert_close(gpu_grads[name], grad, atol=3 * 1.6e-2 * grad.abs().max().item(), rtol=0)


def test_qlora_step_on_gpu(model_dir):
    model = load_base_model(ModelConfig(base=str(model_dir), dtype="bfloat16", quantize="4bit"), training=True)
    model.to("cuda")
    inject_lora(model, LoRAConfig(r=4, alpha=8), for_training=True)
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


def gpu_recipe(tmp_path, model_dir, out: str, lora: str = "r: 4, alpha: 8", model: str = "", steps: int = 8,
               **train):
    """A short run on 16 date rows with precision auto (bf16 on a bf16 GPU), eval at the end, checkpoints
    every 2 steps; ``train`` overrides train settings (YAML values)."""
    rows = [{"prompt": f"day {d}", "completion": f"2020-01-{d:02d}"} for d in range(1, 17)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = {"max_steps": steps, "micro_batch_size": 8, "lr": "1.0e-2", "eval_every": steps, "save_every": 2,
                **train}
    text = f"""\
model: {{base: {model_dir}{', ' + model if model else ''}}}
lora: {{{lora}}}
data: {{train: {tmp_path / 'train.jsonl'}, eval: {tmp_path / 'train.jsonl'}}}
train: {{{', '.join(f'{key}: {value}' for key, value in settings.items())}}}
output: {{dir: {tmp_path / out}}}
"""
    return load_recipe(write_recipe(tmp_path / f"{out}.yaml", text))


def test_bf16_run_resumes_to_the_uninterrupted_losses(tmp_path, model_dir, monkeypatch):
    run_training(gpu_recipe(tmp_path, model_dir, "straight"))
    with ctrl_c_after_step(monkeypatch, 4), pytest.raises(Exception, match="interrupted after step 4"):
        run_training(gpu_recipe(tmp_path, model_dir, "resumed"))
    run_training(gpu_recipe(tmp_path, model_dir, "resumed"), resume="latest")
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert len(resumed) == len(straight) == 8
    # Same code, same GPU, but CUDA's kernels are not bit-reproducible: bf16's tolerance, not equality.
    assert resumed == pytest.approx(straight, rel=1.6e-2)
    assert straight[-1] < straight[0]


def test_qlora_run_quantizes_on_the_gpu_and_learns(tmp_path, model_dir):
    model = load_base_model(ModelConfig(base=str(model_dir), dtype="bfloat16", quantize="4bit"), training=True,
                            device=torch.device("cuda"))
    assert {m.weight.device.type for m in model.modules() if type(m).__name__ == "Linear4bit"} == {"cuda"}
    summary = run_training(gpu_recipe(tmp_path, model_dir, "qlora", model="quantize: 4bit"))
    assert summary.eval_loss < summary.base_eval_loss
    assert summary.peak_memory_bytes > 0


@pytest.mark.parametrize("lora", ["r: 4, alpha: 8, variant: dora", "r: 16, variant: vera",
                                  "r: 2, alpha: 8, variant: adalora"])
def test_every_variant_trains_on_the_gpu(tmp_path, model_dir, lora):
    summary = run_training(gpu_recipe(tmp_path, model_dir, "out", lora=lora, steps=10, lr="2.0e-2"))
    losses = train_losses(tmp_path / "out")
    assert all(torch.isfinite(torch.tensor(losses))) and summary.eval_loss < summary.base_eval_loss


@pytest.fixture
def gpu_adapter(tmp_path, model_dir):
    run_training(gpu_recipe(tmp_path, model_dir, "trained"))
    return tmp_path / "trained" / "adapter"


def test_eval_runs_model_and_inputs_on_the_gpu(tmp_path, model_dir, gpu_adapter, monkeypatch):
    from lorafit import evaluate

    devices = []
    original = evaluate.evaluate_model

    def recording(model, *args):
        devices.append(next(model.parameters()).device.type)
        return original(model, *args)  # its inputs follow the model: a CPU input would fail on CUDA weights

    monkeypatch.setattr(evaluate, "evaluate_model", recording)
    plan = evaluate.eval_plan(None, str(model_dir), [gpu_adapter], str(tmp_path / "train.jsonl"), "prompt_completion",
                              "bfloat16", ["loss", "exact_match"])
    base, adapted = evaluate.run_eval(plan, max_new_tokens=12)
    assert devices == ["cuda", "cuda"]
    assert adapted.loss < base.loss and adapted.n == base.n == 16


def test_generate_runs_on_the_gpu_and_cpu_flag_keeps_it_off(model_dir, gpu_adapter):
    from lorafit.generate import Generator

    config = ModelConfig(base=str(model_dir), dtype="bfloat16")
    for requested, expected in ((None, "cuda"), ("cpu", "cpu")):
        generator = Generator(config, gpu_adapter, requested)
        assert {p.device.type for p in generator.model.parameters()} == {expected}
        pieces = []
        answer = generator.reply([{"role": "user", "content": "day 3"}], pieces.append, max_new_tokens=8)
        assert isinstance(answer, str) and "".join(pieces).strip() == answer


def test_merge_of_a_gpu_trained_adapter_equals_base_plus_adapter(tmp_path, model_dir, gpu_adapter):
    from lorafit.merge import merge_adapter

    result = merge_adapter(str(model_dir), gpu_adapter, tmp_path / "merged", dtype="float32")
    # fp32 on the CPU both ways (merge runs there by design); logits of magnitude ~1 over 64-wide reductions.
    assert result.max_logit_diff < 1e-4


@pytest.mark.gpus(2)
def test_two_gpus_train_what_one_gpu_trains_with_twice_the_micro_batch(tmp_path, model_dir):
    runs = {}
    for nproc, micro in ((1, 8), (2, 4)):
        gpu_recipe(tmp_path, model_dir, f"nproc{nproc}", model="dtype: float32", precision='"no"',
                   micro_batch_size=micro)
        result = subprocess.run([sys.executable, "-m", "lorafit", "train", str(tmp_path / f"nproc{nproc}.yaml"),
                                 "--nproc", str(nproc)], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        runs[nproc] = train_losses(tmp_path / f"nproc{nproc}")
    assert "MULTI_GPU" in result.stdout
    # fp32, NCCL's all-reduce against one process's sum: a different summation order only, so the rule (cuBLAS
    # may use TF32 nowhere here: torch leaves it off for fp32 matmuls by default).
    model = load_base_model(ModelConfig(base=str(model_dir), dtype="float32"))
    assert_close_by_rule(runs[2], runs[1], reduction=reduction_through(model, tokens=8 * 40), dtype=torch.float32)
