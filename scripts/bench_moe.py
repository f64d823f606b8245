"""LoRA on a mixture-of-experts model: lorafit's expert adapters against PEFT's target_parameters, same run.

A random Mixtral (no download; the size is set below) gets the same LoRA through lorafit (`all-linear` plus the
router, which is what PEFT's all-linear adapts) and through PEFT (`all-linear`), and trains a few steps of
next-token loss on random tokens. Each framework runs in its own child process, so each peak RSS is its own.
Reports the median step time, peak RSS, and the trainable parameter count. CPU or CUDA (where present).

    python scripts/bench_moe.py                     # defaults below
    python scripts/bench_moe.py --layers 2 --steps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_one(framework: str, args: argparse.Namespace) -> dict:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    sys.path.insert(0, str(REPO / "scripts"))
    from benchlib import RssSampler

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=2048, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                           num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                           num_local_experts=args.experts, num_experts_per_tok=2)
    model = MixtralForCausalLM(config).to(device)
    if framework == "lorafit":
        from lorafit.config import LoRAConfig
        from lorafit.inject import inject_lora

        inject_lora(model, LoRAConfig(r=args.r, alpha=2 * args.r, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj", "gate"]), for_training=True)
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 2048, (args.batch, args.seq), generator=generator).to(device)
    sampler, times = RssSampler(), []
    for _ in range(args.steps):
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return {"framework": framework, "median_step_s": statistics.median(times[1:] or times),
            "peak_rss_gib": sampler.stop() / 2**30, "trainable": sum(p.numel() for p in trainable),
            "loss_last": float(loss), "device": str(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--child", choices=["lorafit", "peft"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args)))
        return
    flags = [f"--{k}={v}" for k, v in vars(args).items() if k != "child"]
    rows = []
    for framework in ("lorafit", "peft"):
        out = subprocess.run([sys.executable, __file__, "--child", framework, *flags], capture_output=True,
                             text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"Mixtral hidden {args.hidden}, {args.layers} layers, {args.experts} experts, r={args.r}, "
          f"batch {args.batch} x {args.seq} tokens, {args.steps} steps on {rows[0]['device']}")
    print("| | median step | peak RSS | trainable | last loss |\n|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['framework']} | {row['median_step_s']:.3f} s | {row['peak_rss_gib']:.2f} GiB | "
              f"{row['trainable']:,} | {row['loss_last']:.4f} |")
    print(f"lorafit / PEFT step time: {rows[0]['median_step_s'] / rows[1]['median_step_s']:.2f}")


if __name__ == "__main__":
    main()
