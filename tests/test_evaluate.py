"""`lorafit eval` and `lorafit generate` on tiny models, against hand computations."""

import json
import math
from pathlib import Path

import pytest
import torch

from lorafit.adapter_io import save_adapter
from lorafit.config import LoRAConfig, ModelConfig, load_recipe
from lorafit.errors import LorafitError
from lorafit.evaluate import EvalPlan, run_eval
from lorafit.generate import Generator
from lorafit.inject import inject_lora
from lorafit.train import train as run_training

from .conftest import model_folder, randomize_lora_B, tiny_model, tiny_tokenizer, write_recipe
from .test_cli import run
from .tolerance import assert_close_by_rule, reduction_through

ROWS = [
    {"prompt": "cat", "completion": "meow"},
    {"prompt": "dog", "completion": "woof"},
    {"prompt": "cow", "completion": "moo"},
]


@pytest.fixture
def eval_file(tmp_path) -> Path:
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def make_adapter(folder: Path, seed: int, variant: str = "lora") -> Path:
    model = tiny_model()
    settings = {} if variant == "vera" else {"alpha": 8}  # VeRA has no alpha
    inject_lora(model, LoRAConfig(r=4, variant=variant, **settings))
    randomize_lora_B(model, seed=seed)
    return save_adapter(model, folder)


def hand_loss(model, tokenizer) -> float:
    """Mean -log p over completion tokens (completion + end of turn + newline), written out directly."""
    total, count = 0.0, 0
    for row in ROWS:
        prompt = f"<|im_start|>user\n{row['prompt']}<|im_end|>\n<|im_start|>assistant\n"
        answer = f"{row['completion']}<|im_end|>\n"
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        answer_ids = tokenizer(answer, add_special_tokens=False).input_ids
        ids = torch.tensor([prompt_ids + answer_ids])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        for k, token in enumerate(answer_ids):
            position = len(prompt_ids) + k  # token at `position` is predicted from logits at position - 1
            total -= float(log_probs[position - 1, token])
            count += 1
    return total / count


@pytest.mark.numerics
def test_eval_loss_equals_hand_computed_mean_token_loss(tiny_model_dir, eval_file):
    results = run_eval(EvalPlan(ModelConfig(base=str(tiny_model_dir), dtype="float32"), [], str(eval_file),
                                "prompt_completion", ["loss"]))
    expected = hand_loss(tiny_model(), tiny_tokenizer())
    assert results[0].name == "base" and results[0].n == 3
    # lorafit's batched fp32 loss against one row at a time with an fp64 log-softmax
    reduction = reduction_through(tiny_model(), tokens=3 * 64)  # 3 rows of < 64 tokens (template included)
    assert_close_by_rule(results[0].loss, expected, reduction=reduction, dtype=torch.float32)
    assert_close_by_rule(math.log(results[0].perplexity), expected, reduction=reduction, dtype=torch.float32)
    assert results[0].exact_match is None


@pytest.mark.parametrize("second_variant", ["lora", "dora", "vera", "adalora"])
def test_two_adapters_in_one_run_equal_separate_runs(tmp_path, tiny_model_dir, eval_file, second_variant):
    first, second = make_adapter(tmp_path / "a1", seed=1), make_adapter(tmp_path / "a2", 2, second_variant)
    cfg = ModelConfig(base=str(tiny_model_dir), dtype="float32")
    def plan(adapters):
        return EvalPlan(cfg, adapters, str(eval_file), "prompt_completion", ["loss", "exact_match"])

    together = run_eval(plan([first, second]), max_new_tokens=6)
    alone_1, alone_2 = run_eval(plan([first]), max_new_tokens=6), run_eval(plan([second]), max_new_tokens=6)
    assert together[0] == alone_1[0] == alone_2[0]  # the base row is the same: swapping left no trace
    assert together[1] == alone_1[1] and together[2] == alone_2[1]
    assert together[1].loss != together[2].loss != together[0].loss


def test_exact_match_on_a_model_trained_to_memorise(tmp_path, eval_file):
    # Larger init than the default 0.02: a 32-wide head with tiny weights cannot produce peaked logits.
    model_dir = tmp_path / "model"
    model_folder(tiny_model(initializer_range=0.5), model_dir)
    recipe = write_recipe(tmp_path / "memorise.yaml", f"""\
model: {{base: {model_dir}, dtype: float32}}
lora: {{r: 8, alpha: 16}}
data: {{train: {eval_file}}}
train: {{max_steps: 80, micro_batch_size: 3, lr: 2.0e-2, warmup_steps: 5, precision: "no", scheduler: constant}}
output: {{dir: {tmp_path / 'run'}}}
""")
    run_training(load_recipe(recipe))
    plan = EvalPlan(ModelConfig(base=str(model_dir), dtype="float32"), [tmp_path / "run" / "adapter"],
                    str(eval_file), "prompt_completion", ["exact_match"])
    results = run_eval(plan, max_new_tokens=8)
    assert results[0].exact_match == 0.0
    assert results[1].exact_match == 1.0 and results[1].n == 3


def test_exact_match_needs_pairs(tiny_model_dir, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "abc"}\n')
    with pytest.raises(LorafitError, match="exact_match needs prompt/answer pairs"):
        run_eval(EvalPlan(ModelConfig(base=str(tiny_model_dir), dtype="float32"), [], str(path), "text",
                          ["exact_match"]))


def test_eval_cli_table_and_json(tmp_path, tiny_model_dir, eval_file):
    adapter = make_adapter(tmp_path / "a1", seed=1)
    result = run("eval", "--base", str(tiny_model_dir), "--adapter", str(adapter), "--data", str(eval_file),
                 "--metric", "loss", "--json", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    assert "base" in result.stdout and "Δ loss" in result.stdout
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [r["name"] for r in results] == ["base", str(adapter)]
    assert set(results[0]) == {"name", "loss", "perplexity", "exact_match", "n"}
    bad = run("eval", "--base", str(tiny_model_dir), "--adapter", str(tmp_path / "none"), "--data", str(eval_file))
    assert bad.returncode == 2 and "no adapter_config.json" in bad.stderr and "Traceback" not in bad.stderr


def test_generator_matches_plain_greedy_generate(tiny_model_dir, tmp_path):
    adapter = make_adapter(tmp_path / "a1", seed=1)
    generator = Generator(ModelConfig(base=str(tiny_model_dir), dtype="float32"), adapter)
    streamed: list[str] = []
    messages = [{"role": "user", "content": "cat"}]
    reply = generator.reply(messages, streamed.append, max_new_tokens=8)
    tokenizer = tiny_tokenizer()
    ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                    return_tensors="pt", add_special_tokens=False).input_ids
    out = generator.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                   pad_token_id=0)
    assert reply == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert "".join(streamed).strip() == reply


def test_generate_cli(tiny_model_dir):
    result = run("generate", "--base", str(tiny_model_dir), "hello", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    missing = run("generate", "--base", str(tiny_model_dir))
    assert missing.returncode == 2 and "give a PROMPT" in missing.stderr
