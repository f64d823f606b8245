"""Where one lorafit training step spends its time: torch.profiler over forward, loss, backward, optimizer.

Runs the bench's step (SmolLM2-135M-Instruct, r=16, alpha=32, all-linear, packed quickstart batches) and
prints self time per op category — matmul, attention, casts, elementwise/other — and per phase, plus
how many dtype casts ran. ``--layers N`` keeps the first N decoder layers (every layer is identical, so
the per-layer picture holds) to make emulated-bf16 profiles affordable on CPUs without native bf16;
there the matmul times are the emulation's, but the op and cast counts are what any machine runs.

    python scripts/profile_step.py --weights bfloat16                 # lorafit's bf16 path (no autocast)
    python scripts/profile_step.py --weights float32 --autocast       # fp32 weights, bf16 autocast
    python scripts/profile_step.py --weights float32 --layers 30 --json profile.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MATMUL = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation"}
CASTS = {"aten::_to_copy", "aten::copy_", "aten::to", "aten::_copy_from", "aten::_copy_from_and_resize"}


def category(name: str) -> str:
    if name in MATMUL or name.startswith("aten::mkldnn") or "gemm" in name:
        return "matmul"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if name in CASTS:
        return "casts"
    if name.startswith("aten::") or name.startswith("bitsandbytes::"):
        return "elementwise/other"
    return "python/other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast around the step")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers kept (SmolLM2 has 30)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import bench
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    import lorafit.loss
    from lorafit.config import LoRAConfig, ModelConfig
    from lorafit.fused import use_fused_layers
    from lorafit.inject import inject_lora
    from lorafit.loss import token_loss_sum, trained_positions
    from lorafit.model import load_base_model, load_tokenizer
    from lorafit.train import make_optimizer

    bench.SEQ, bench.BATCH = args.seq, args.batch
    torch.manual_seed(0)
    cfg = ModelConfig(base=bench.BASE, dtype=args.weights)
    tokenizer = load_tokenizer(cfg)
    data = bench.batches(tokenizer, 2)
    model = load_base_model(cfg)
    model.model.layers = model.model.layers[: args.layers]
    model.config.num_hidden_layers = args.layers
    inject_lora(model, LoRAConfig(r=bench.RANK, alpha=bench.ALPHA), for_training=True)
    use_fused_layers(model)  # as lorafit train does without compile
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer("adamw", params, 3e-4, 0.0)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if args.autocast else contextlib.nullcontext()

    fused_loss = lorafit.loss.linear_cross_entropy

    def timed_loss(*loss_args):  # the fused head + cross-entropy, inside the forward phase
        with record_function("region::loss (head + cross-entropy)"):
            return fused_loss(*loss_args)

    lorafit.loss.linear_cross_entropy = timed_loss

    def step(batch):
        with record_function("phase::forward+loss"), amp:
            loss = token_loss_sum(model, batch) / trained_positions(batch)
        with record_function("phase::backward"):
            loss.backward()
        with record_function("phase::optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step(data[0])  # warm-up: allocator, oneDNN primitive caches
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(data[1])

    events = prof.key_averages()
    by_category, counts = Counter(), Counter()
    phases = {}
    for event in events:
        if event.key.startswith(("phase::", "region::")):
            phases[event.key.split("::", 1)[1]] = event.cpu_time_total / 1e6
            continue
        kind = category(event.key)
        by_category[kind] += event.self_cpu_time_total / 1e6
        counts[kind] += event.count
    total = sum(seconds for name, seconds in phases.items() if not name.startswith("loss"))
    setup = f"weights {args.weights}, {'bf16 autocast' if args.autocast else 'no autocast'}, " \
            f"{args.layers} layers, {args.batch}x{args.seq} tokens"
    print(f"one training step: {total:.2f} s ({setup})")
    for name, seconds in phases.items():
        print(f"  {'  of which ' if name.startswith('loss') else 'phase '}{name:16} {seconds:8.3f} s "
              f"{seconds / total:6.1%}")
    for name, seconds in by_category.most_common():
        print(f"  {name:22} {seconds:8.3f} s {seconds / total:6.1%}   {counts[name]:6d} ops")
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    print("  top ops by self time: " + ", ".join(f"{e.key} {e.self_cpu_time_total / 1e6:.2f}s x{e.count}" for e in top))
    if args.json:
        args.json.write_text(json.dumps({"setup": setup, "step_s": total, "phases": phases,
                                         "categories": dict(by_category), "op_counts": dict(counts)}, indent=2))


if __name__ == "__main__":
    main()
