"""Tiny deterministic models and tokenizers, built in-process in milliseconds; no network, no downloads."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import string
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _test_cache() -> None:
    """Runs in tests (and the processes they start) cache tokenized data in a folder of their own, deleted at
    exit, while converted models (the slow part: SmolLM2 from GGUF) stay shared with the user's cache."""
    import atexit
    import shutil
    import tempfile

    from lorafit.model import cache_dir

    shared = cache_dir()
    folder = Path(tempfile.mkdtemp(prefix="lorafit-test-cache-"))
    (shared / "gguf").mkdir(parents=True, exist_ok=True)
    (folder / "gguf").symlink_to(shared / "gguf")
    os.environ["LORAFIT_CACHE"] = str(folder)
    atexit.register(shutil.rmtree, folder, True)


_test_cache()

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def pytest_collection_modifyitems(config, items) -> None:
    """GPU tests run wherever CUDA is present and skip, saying why, everywhere else; a test marked
    ``gpus(N)`` also skips, saying so, where fewer than N GPUs are visible."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        if "gpu" not in item.keywords:
            continue
        needed = item.get_closest_marker("gpus").args[0] if item.get_closest_marker("gpus") else 1
        if visible == 0:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (none here); run make test on a GPU machine"))
        elif visible < needed:
            item.add_marker(pytest.mark.skip(reason=f"needs {needed} CUDA GPUs; this machine has {visible}"))


@pytest.fixture(autouse=True)
def device_by_marker(request, monkeypatch) -> None:
    """The one device rule (lorafit.device) in tests: tests about CPU arithmetic — all but those marked ``gpu`` —
    compute on the CPU even on a GPU machine (LORAFIT_DEVICE=cpu, inherited by the processes they launch, which
    therefore use gloo); ``gpu`` tests get the rule's own answer (the GPU)."""
    if "gpu" in request.keywords:
        monkeypatch.delenv("LORAFIT_DEVICE", raising=False)
    else:
        monkeypatch.setenv("LORAFIT_DEVICE", "cpu")


def tiny_config(**overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer random Llama in fp32, identical for the same seed."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(**overrides)).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer with ChatML specials and a chat template, and no pad token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    backend.decoder = decoders.Fuse()  # decode by concatenation, not WordLevel's space-joining
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def model_folder(model, folder: Path) -> Path:
    """``model`` saved with the tiny tokenizer: a local Hugging Face folder like a user's."""
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def model() -> LlamaForCausalLM:
    return tiny_model()


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A saved tiny model + tokenizer: a local Hugging Face folder like a user's."""
    folder = tmp_path / "tiny-llama"
    model_folder(tiny_model(), folder)
    return folder


@pytest.fixture
def input_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (2, 12), generator=generator)


@pytest.fixture
def adapter(tmp_path, input_ids):
    """A lorafit adapter with non-zero B on the tiny model, plus the logits base + adapter gives."""
    from lorafit.adapter_io import save_adapter
    from lorafit.config import LoRAConfig
    from lorafit.inject import inject_lora

    model = tiny_model()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_lora_B(model)
    save_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        return tmp_path / "adapter", model(input_ids).logits


# A training run on a tiny model: 32 date rows, an eval set, and a recipe builder (tests of train and faults).
ROWS = [{"prompt": f"Convert {m} {d}, {1990 + d}", "completion": f"{1990 + d}-{m:02d}-{d:02d}"}
        for m in range(1, 5) for d in range(1, 9)]


@pytest.fixture
def run_dir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:6]))
    return tmp_path


def recipe_at(run_dir: Path, *overrides: str, out: str = "out"):
    """The run's Recipe (written to run_dir/recipe.yaml, so the CLI can run the same one) with OUT = run_dir/out."""
    from lorafit.config import load_recipe

    text = f"""\
model: {{base: {run_dir / 'tiny-llama'}, dtype: float32}}
lora: {{r: 4, alpha: 8, dropout: 0.1}}
data: {{train: {run_dir / 'train.jsonl'}, eval: {run_dir / 'eval.jsonl'}, max_seq_len: 64}}
train: {{max_steps: 6, micro_batch_size: 4, lr: 1.0e-2, warmup_steps: 1, precision: "no", eval_every: 3,
         save_every: 2, keep_last: 2, seed: 0}}
output: {{dir: {run_dir / out}}}
"""
    return load_recipe(write_recipe(run_dir / "recipe.yaml", text), list(overrides))


def losses(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["event"] == "train"]


def randomize_lora_B(model: torch.nn.Module, seed: int = 3) -> None:
    """B (VeRA: λ_b, AdaLoRA: E) starts at zero; give it values so the adapter changes the outputs under test."""
    from lorafit.inject import lora_modules

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            zero = (module.vera_lambda_b if hasattr(module, "vera_lambda_b") else
                    module.lora_E if hasattr(module, "lora_E") else module.lora_B.weight)
            zero.copy_(torch.randn(zero.shape, generator=generator) * 0.1)


def day_run(tmp_path: Path, model_dir: Path, lora: str, max_steps: int, lr: float):
    """For a variant's train-and-resume test: 16 tiny date rows, and ``recipe(out)`` -> that run's Recipe
    (``lora`` is the flow-style mapping, e.g. "r: 4, variant: dora"; a checkpoint every 3 steps)."""

    from lorafit.config import load_recipe

    rows = [{"prompt": f"day {d}", "completion": f"2020-01-{d:02d}"} for d in range(1, 17)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def recipe(out: str):
        text = f"""\
model: {{base: {model_dir}, dtype: float32}}
lora: {{{lora}}}
data: {{train: {tmp_path / 'train.jsonl'}}}
train: {{max_steps: {max_steps}, micro_batch_size: 8, lr: {lr}, precision: "no", save_every: 3}}
output: {{dir: {tmp_path / out}}}
"""
        return load_recipe(write_recipe(tmp_path / f"{out}.yaml", text))

    return recipe


def three_step_recipe(folder: Path, model_dir: Path) -> Path:
    """A 3-step fp32 run on ROWS over the model in ``model_dir`` (all-linear, r 4), OUT = folder/out: the
    recipe an architecture's test trains with (and plans with)."""
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return write_recipe(folder / "three-steps.yaml", f"""\
model: {{base: {model_dir}, dtype: float32}}
lora: {{r: 4, alpha: 8}}
data: {{train: {folder / 'train.jsonl'}, max_seq_len: 48}}
train: {{max_steps: 3, micro_batch_size: 4, lr: 1.0e-2, precision: "no"}}
output: {{dir: {folder / 'out'}}}
""")


def train_losses(out: Path) -> list[float]:
    """The per-step training losses a run logged in OUT/metrics.jsonl."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if '"train"' in x]


def four_bit_tiny(tmp_path: Path, lora) -> torch.nn.Module:
    """A 64-wide tiny Llama loaded with a 4-bit base as training loads it, ``lora`` (a LoRAConfig) injected,
    adapters in fp32."""
    from lorafit.config import ModelConfig
    from lorafit.inject import inject_lora
    from lorafit.model import load_base_model

    folder = tmp_path / "tiny-64"
    tiny_model(hidden_size=64, intermediate_size=128).save_pretrained(folder)
    model = load_base_model(ModelConfig(base=str(folder), dtype="float32", quantize="4bit"), training=True)
    inject_lora(model, lora, for_training=True)
    return model


def peft_grads(peft_model) -> dict[str, torch.Tensor]:
    """A PEFT model's adapter gradients under lorafit's names: "<module path>.<part>" (no base_model.model.
    prefix, no .default adapter name)."""
    return {name.removeprefix("base_model.model.").replace(".default", ""): param.grad
            for name, param in peft_model.named_parameters() if param.requires_grad}


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@contextlib.contextmanager
def ctrl_c_after_step(monkeypatch, step: int):
    """Inside the block, a real SIGINT arrives while training step ``step`` is being logged."""
    from lorafit.report import MetricsLog

    original_write = MetricsLog.write

    def write_and_interrupt(self, record):
        original_write(self, record)
        if record.get("event") == "train" and record["step"] == step:
            os.kill(os.getpid(), signal.SIGINT)

    with monkeypatch.context() as patch:
        patch.setattr(MetricsLog, "write", write_and_interrupt)
        yield
