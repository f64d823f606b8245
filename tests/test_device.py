"""The one device rule (lorafit.device): what it answers, and that every command that computes puts its model
and inputs where it says. Without a GPU the commands are pointed at torch's ``meta`` device (a device other than
the default CPU); a global forward hook records where the first forward's weights and inputs are, then stops
the command. test_cuda.py proves the same commands on a real GPU."""

import json
from pathlib import Path

import pytest
import torch
from transformers import GenerationMixin

from lorafit import device as device_rule
from lorafit.device import compute_device
from lorafit.errors import LorafitError

from .conftest import ROWS, write_recipe
from .test_cli import run


class FirstForward(Exception):
    """Raised by the hook at a command's first forward pass, once it has recorded where things are."""


@pytest.fixture
def on_meta(monkeypatch):
    """Every compute_device() answers meta (as LORAFIT_DEVICE would name a GPU); yields the list that the first
    token embedding of a forward pass fills with (its weight's device, the token ids' device) before it stops
    the command (every forward starts there: eval's loss, EVA's statistics pass), or that generate() records
    (its model's device and the prompt's) before it would generate: eval's exact match and generate."""
    monkeypatch.setattr(device_rule, "_checked", lambda name, where: torch.device(name))
    monkeypatch.setenv("LORAFIT_DEVICE", "meta")
    seen: list[tuple[str, str]] = []

    def first_forward(self, input_ids):
        seen.append((self.weight.device.type, input_ids.device.type))
        raise FirstForward

    def first_generate(self, input_ids=None, **kwargs):  # meta tensors cannot reach generate's first forward
        seen.append((next(self.parameters()).device.type, input_ids.device.type))
        raise FirstForward

    monkeypatch.setattr(torch.nn.Embedding, "forward", first_forward)
    monkeypatch.setattr(GenerationMixin, "generate", first_generate)
    return seen


def test_the_rule(monkeypatch):
    monkeypatch.delenv("LORAFIT_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compute_device() == torch.device("cpu")
    assert compute_device("auto") == torch.device("cpu")
    # A CUDA machine: the GPU, one per process by local rank; --device and LORAFIT_DEVICE choose over it.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert compute_device() == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert compute_device() == torch.device("cuda", 1)
    assert compute_device("cuda:0") == torch.device("cuda", 0)
    assert compute_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LORAFIT_DEVICE", "cpu")
    assert compute_device() == torch.device("cpu")
    assert compute_device("cuda") == torch.device("cuda", 0)  # the flag over the environment
    with pytest.raises(LorafitError, match=r"--device 'cuda:2': this machine has 2 visible CUDA GPU\(s\)"):
        compute_device("cuda:2")


def test_devices_that_cannot_be_used_are_refused_with_the_choices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LorafitError, match="--device 'cuda': torch sees no CUDA GPU here"):
        compute_device("cuda")
    with pytest.raises(LorafitError, match="--device 'gpu0': not a device; use auto, cpu, cuda or cuda:N"):
        compute_device("gpu0")
    with pytest.raises(LorafitError, match="LORAFIT_DEVICE 'mps': lorafit runs on CUDA GPUs or the CPU"):
        monkeypatch.setenv("LORAFIT_DEVICE", "mps")
        compute_device()


def test_eval_with_an_unusable_device_exits_2_before_loading(tiny_model_dir, tmp_path):
    (tmp_path / "eval.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    result = run("eval", "--base", str(tiny_model_dir), "--data", str(tmp_path / "eval.jsonl"), "--device", "tpu")
    assert result.returncode == 2
    assert "--device 'tpu'" in result.stderr and "Traceback" not in result.stderr


def test_eval_puts_model_and_inputs_where_the_rule_says(adapter, tiny_model_dir, tmp_path, on_meta):
    from lorafit.evaluate import eval_plan, run_eval

    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:4]))
    for metric in ("loss", "exact_match"):
        plan = eval_plan(None, str(tiny_model_dir), [adapter[0]], str(tmp_path / "eval.jsonl"), "prompt_completion",
                         "float32", [metric])
        with pytest.raises(FirstForward):
            run_eval(plan)
    assert on_meta == [("meta", "meta"), ("meta", "meta")]


def test_generate_puts_model_and_inputs_where_the_rule_says(adapter, tiny_model_dir, on_meta):
    from lorafit.config import ModelConfig
    from lorafit.generate import Generator

    generator = Generator(ModelConfig(base=str(tiny_model_dir), dtype="float32"), adapter[0])
    assert {p.device.type for p in generator.model.parameters()} == {"meta"}  # adapter weights too
    with pytest.raises(FirstForward):
        generator.reply([{"role": "user", "content": "hi"}], lambda text: None, max_new_tokens=2)
    assert on_meta == [("meta", "meta")]


def test_generate_device_flag_beats_the_environment(on_meta, tiny_model_dir):
    from lorafit.config import ModelConfig
    from lorafit.generate import Generator

    generator = Generator(ModelConfig(base=str(tiny_model_dir), dtype="float32"), device="cpu")
    assert {p.device.type for p in generator.model.parameters()} == {"cpu"}


def test_plan_runs_the_rank_allocation_pass_where_the_rule_says(on_meta, tmp_path: Path, tiny_model_dir):
    from typer.testing import CliRunner

    from lorafit.cli import app

    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    recipe = write_recipe(tmp_path / "eva.yaml", f"""\
model: {{base: {tiny_model_dir}, dtype: float32}}
lora: {{r: 4, alpha: 8, rank_allocation: {{rho: 2.0}}}}
data: {{train: {tmp_path / 'train.jsonl'}, max_seq_len: 48}}
train: {{max_steps: 2, micro_batch_size: 8, precision: "no"}}
output: {{dir: {tmp_path / 'out'}}}
""")
    result = CliRunner().invoke(app, ["plan", str(recipe)])
    assert isinstance(result.exception, FirstForward), result.output
    assert on_meta == [("meta", "meta")]
