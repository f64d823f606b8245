"""The GPU check: lorafit on a CUDA machine in one command, written to one JSON file (see scripts/gpu_check.sh).

1. the ``gpu`` tests (tests/test_cuda.py, tests/test_device.py's CPU-pinned neighbours stay out);
2. a short ``precision: auto`` run of ``lorafit train`` on a random-init Llama built here (no download, no
   SmolLM2 package), then eval (loss + exact match, base vs adapter) and generate on the GPU, each checked to
   have run there (the model's device and CUDA's peak memory);
3. ``scripts/bench.py --configs bf16 qlora`` against PEFT on that random Llama.

Usage: python scripts/gpu_check.py --json OUT.json [--skip-tests] [--skip-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def machine() -> dict:
    import importlib.metadata as metadata

    import torch

    versions = {}
    for name in ("torch", "transformers", "accelerate", "peft", "bitsandbytes", "datasets", "pydantic"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"gpus": gpus, "gpu": gpus[0] if gpus else None, "cuda": torch.version.cuda,
            "python": sys.version.split()[0], "versions": versions, "date": time.strftime("%Y-%m-%d")}


def gpu_tests(folder: Path, timeout: int) -> dict:
    """pytest -m gpu; counts from its JUnit XML, and the skip reasons."""
    import xml.etree.ElementTree as ET

    report = folder / "gpu-tests.xml"
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rs",
                             f"--junitxml={report}", "tests/"], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)
    print(result.stdout[-4000:], result.stderr[-2000:], sep="\n")
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = [case.get("name") for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {"exit_code": result.returncode, "tests": int(suite.get("tests")), "failed": failed,
            "skipped": int(suite.get("skipped")), "seconds": round(time.perf_counter() - started, 1)}


def random_llama(folder: Path) -> Path:
    """A random-init Llama of SmolLM2-135M's shape (30 layers, 576 wide, GQA 9/3 heads) with a character-level
    chat tokenizer (tests/conftest.py's), so nothing is downloaded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128 * ((len(tokenizer) + 127) // 128), hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1, eos_token_id=4)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train_eval_generate(folder: Path) -> dict:
    import torch

    from lorafit.config import ModelConfig, load_recipe
    from lorafit.device import compute_device
    from lorafit.evaluate import eval_plan, run_eval
    from lorafit.generate import Generator
    from lorafit.train import train

    model_dir = random_llama(folder / "random-llama")
    recipe = folder / "recipe.yaml"
    recipe.write_text(f"""\
model: {{base: {model_dir}}}
lora: {{r: 16, alpha: 32}}
data: {{train: {REPO / 'configs/data/dates_train.jsonl'}, eval: {REPO / 'configs/data/dates_eval.jsonl'},
       max_seq_len: 160}}
train: {{max_steps: 60, micro_batch_size: 16, lr: 2.0e-3, warmup_steps: 5, eval_every: 60, save_every: 30}}
output: {{dir: {folder / 'run'}}}
""")
    device = compute_device()
    summary = train(load_recipe(recipe))
    result = {"device": str(device), "train": {
        "steps": summary.steps, "final_loss": summary.train_loss, "base_eval_loss": summary.base_eval_loss,
        "eval_loss": summary.eval_loss, "tokens_per_second": round(summary.tokens_per_second, 1),
        "peak_memory_gib": round(summary.peak_memory_bytes / 2**30, 3), "seconds": round(summary.wall_seconds, 1)}}
    torch.cuda.reset_peak_memory_stats()
    plan = eval_plan(recipe, None, [], None, "prompt_completion", "auto", ["loss", "exact_match"])
    started = time.perf_counter()
    rows = run_eval(plan, limit=32, max_new_tokens=12)
    result["eval"] = {"results": [r.to_json() for r in rows], "seconds": round(time.perf_counter() - started, 1),
                      "cuda_peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
    generator = Generator(ModelConfig(base=str(model_dir), dtype="auto"), folder / "run" / "adapter")
    pieces: list[str] = []
    answer = generator.reply([{"role": "user", "content": "Convert March 3, 2021"}], pieces.append, max_new_tokens=16)
    result["generate"] = {"model_device": str(next(generator.model.parameters()).device), "answer": answer,
                          "streamed_equals_answer": "".join(pieces).strip() == answer}
    result["ok"] = (device.type == "cuda" and result["generate"]["model_device"].startswith("cuda")
                    and result["eval"]["cuda_peak_memory_gib"] > 0 and summary.eval_loss < summary.base_eval_loss)
    return result


def bench(folder: Path, timeout: int) -> dict:
    """scripts/bench.py's bf16 and QLoRA configs (lorafit vs PEFT, with its correctness gates) on the random
    SmolLM2-shaped Llama the run used."""
    out = folder / "bench.json"
    base = folder / "random-llama"
    if not (base / "config.json").is_file():
        random_llama(base)
    result = subprocess.run([sys.executable, "scripts/bench.py", "--configs", "bf16", "qlora", "--base", str(base),
                             "--no-compile", "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)
    print(result.stdout[-6000:], result.stderr[-2000:], sep="\n")
    report = json.loads(out.read_text()) if out.is_file() else None
    return {"exit_code": result.returncode, "report": report}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    args = parser.parse_args()
    import torch

    report: dict = {"machine": machine()}
    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA GPU here; nothing to check", file=sys.stderr)
        return 2
    os.environ.pop("LORAFIT_DEVICE", None)
    with tempfile.TemporaryDirectory(prefix="lorafit-gpu-check-") as tmp:
        folder = Path(tmp)
        steps = [("run", lambda: train_eval_generate(folder))]
        if not args.skip_tests:
            steps.insert(0, ("tests", lambda: gpu_tests(folder, timeout=300)))
        if not args.skip_bench:
            steps.append(("bench", lambda: bench(folder, timeout=240)))
        for name, step in steps:  # each part is reported even when another fails
            try:
                report[name] = step()
            except Exception as err:  # noqa: BLE001 - the report says what failed and the next part still runs
                report[name] = {"error": f"{type(err).__name__}: {err}"}
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    passed = (report.get("tests", {}).get("exit_code", 0) == 0 and report["run"].get("ok") is True
              and report.get("bench", {}).get("exit_code", 0) == 0)
    print(json.dumps({k: v for k, v in report.items() if k != "bench"}, indent=2))
    print(f"gpu_check: {'PASSED' if passed else 'FAILED'}; report in {args.json}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
