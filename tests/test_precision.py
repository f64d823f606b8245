"""precision: auto resolved per machine, what runs under autocast, and that training computes in what it says."""

import json

import pytest
import torch
import yaml

from lorafit import precision
from lorafit.config import load_recipe
from lorafit.errors import LorafitError
from lorafit.loss import TokenLoss
from lorafit.precision import Hardware, resolve
from lorafit.train import accumulate_gradients, make_accelerator
from lorafit.train import train as run_training

from .conftest import write_recipe

AVX2 = Hardware(cuda=False, cuda_bf16=False, name="AMD EPYC (AVX2)", cpu_bf16_flags=())
SAPPHIRE_RAPIDS = Hardware(cuda=False, cuda_bf16=False, name="Intel Xeon", cpu_bf16_flags=("avx512_bf16", "amx_bf16"))
H100 = Hardware(cuda=True, cuda_bf16=True, name="NVIDIA H100", cpu_bf16_flags=())
T4 = Hardware(cuda=True, cuda_bf16=False, name="Tesla T4", cpu_bf16_flags=())


@pytest.mark.parametrize(("hardware", "quantize", "expected"), [
    (AVX2, None, ("float32", "no", False)),
    (SAPPHIRE_RAPIDS, None, ("bfloat16", "bf16", False)),  # bf16 base computing in bf16: no autocast
    (SAPPHIRE_RAPIDS, "4bit", ("bfloat16", "bf16", True)),  # fp32 norms/embeddings around 4-bit layers
    (H100, None, ("bfloat16", "bf16", False)),
    (T4, None, ("float16", "fp16", True)),  # fp16 always under autocast, with loss scaling
    (AVX2, "4bit", ("float32", "no", False)),
])
def test_auto_resolves_per_machine(hardware, quantize, expected):
    plan = resolve("auto", "auto", quantize, hardware)
    assert (plan.model_dtype, plan.precision, plan.autocast) == expected
    assert hardware.name in plan.reason or "native bf16" in plan.reason


def test_explicit_settings_are_kept_and_autocast_only_where_weights_are_wider():
    assert resolve("float32", "bf16", None, SAPPHIRE_RAPIDS).autocast  # fp32 master weights, bf16 math
    assert not resolve("bfloat16", "bf16", None, SAPPHIRE_RAPIDS).autocast
    assert resolve("float32", "no", None, SAPPHIRE_RAPIDS).mixed_precision == "no"
    assert "bfloat16 weights, no autocast" in resolve("bfloat16", "no", None, AVX2).describe()
    plan = resolve("auto", "bf16", None, AVX2)  # bf16 asked for on a CPU without it: honoured, with a warning
    assert (plan.model_dtype, plan.autocast) == ("bfloat16", False)
    assert "emulated" in precision.emulated_bf16_warning(plan, AVX2)
    assert precision.emulated_bf16_warning(resolve("auto", "auto", None, AVX2), AVX2) is None
    assert precision.emulated_bf16_warning(plan, SAPPHIRE_RAPIDS) is None


@pytest.mark.parametrize(("setting", "hardware", "message"), [
    ("fp16", AVX2, "fp16 needs a CUDA GPU"),
    ("bf16", T4, "Tesla T4 has no bf16 support"),
])
def test_unsupported_precision_is_refused(setting, hardware, message):
    with pytest.raises(LorafitError, match=message):
        resolve("auto", setting, None, hardware)


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch):
    lines = ["processor\t: 0", "model name\t: Intel(R) Xeon(R) Platinum 8480+",
             "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16"]
    monkeypatch.setattr(precision, "_cpuinfo_lines", lambda: lines)
    assert {"avx512_bf16", "amx_bf16"} <= precision.cpu_flags()
    assert precision.cpu_model() == "Intel(R) Xeon(R) Platinum 8480+"
    arm = ["Features\t: fp asimd bf16 i8mm"]
    monkeypatch.setattr(precision, "_cpuinfo_lines", lambda: arm)
    assert "bf16" in precision.cpu_flags()


def linear_output_dtypes(model) -> list[torch.dtype]:
    """Record the dtype every LoRA-wrapped linear layer computes in during the next forward."""
    from lorafit.inject import lora_modules

    seen = []
    for module in lora_modules(model).values():
        module.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


def test_bf16_autocast_over_fp32_weights_covers_the_fused_loss_path(model, input_ids):
    """accelerate wraps model.forward in autocast, but the fused loss calls the decoder directly:
    lorafit must put the autocast around the loss itself, or 'precision: bf16' silently trains in fp32."""
    from lorafit.config import LoRAConfig
    from lorafit.inject import inject_lora

    inject_lora(model, LoRAConfig(r=4, alpha=8), for_training=True)
    seen = linear_output_dtypes(model)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    accelerator = make_accelerator("bf16")
    accumulate_gradients(accelerator.prepare(TokenLoss(model)), [batch], accelerator)
    assert seen and set(seen) == {torch.bfloat16}
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)


@pytest.fixture
def run_dir(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"day {d}", "completion": f"2020-01-{d:02d}"} for d in range(1, 9)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def recipe(run_dir, out: str, *overrides: str):
    text = f"""\
model: {{base: {run_dir / 'tiny-llama'}}}
lora: {{r: 4, alpha: 8}}
data: {{train: {run_dir / 'train.jsonl'}, eval: {run_dir / 'train.jsonl'}}}
train: {{max_steps: 3, micro_batch_size: 4, lr: 1.0e-2, eval_every: 3}}
output: {{dir: {run_dir / out}}}
"""
    return load_recipe(write_recipe(run_dir / f"{out}.yaml", text), list(overrides))


def test_auto_on_a_bf16_cpu_trains_a_bf16_base_and_records_the_choice(run_dir, monkeypatch, capsys):
    """model.dtype and train.precision default to auto; on a (simulated) CPU with native bf16 the run
    loads the base in bf16, keeps LoRA weights fp32, writes what ran into OUT/recipe.yaml, and says why."""
    monkeypatch.setattr(precision, "detect_hardware", lambda: SAPPHIRE_RAPIDS)
    loaded = recipe(run_dir, "bf16")
    assert (loaded.model.dtype, loaded.train.precision) == ("auto", "auto")
    summary = run_training(loaded)
    written = yaml.safe_load((run_dir / "bf16" / "recipe.yaml").read_text())
    assert (written["model"]["dtype"], written["train"]["precision"]) == ("bfloat16", "bf16")
    out = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert "bf16 weights and compute, no autocast; LoRA weights fp32" in out and "avx512_bf16" in out
    assert summary.eval_loss < summary.base_eval_loss
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(run_dir / "bf16" / "adapter" / "adapter_model.safetensors").values()} == \
        {torch.float32}


def test_auto_on_an_avx2_cpu_trains_in_fp32(run_dir, monkeypatch, capsys):
    monkeypatch.setattr(precision, "detect_hardware", lambda: AVX2)
    run_training(recipe(run_dir, "fp32"))
    written = yaml.safe_load((run_dir / "fp32" / "recipe.yaml").read_text())
    assert (written["model"]["dtype"], written["train"]["precision"]) == ("float32", "no")
    assert "this CPU has no native bf16" in " ".join(capsys.readouterr().out.split())
