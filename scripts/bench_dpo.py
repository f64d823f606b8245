"""The bench's ``dpo`` config (scripts/bench.py --configs dpo): lorafit's DPO against TRL's DPOTrainer + PEFT.

Both train the same LoRA (r 16, alpha 32, all-linear, dropout 0, same initial A and zero B) on SmolLM2 with DPO's
sigmoid loss (beta 0.1) over the same pair batches: DPO_PAIRS pairs of the DPO quickstart's data
(configs/data/dates_pref_train.jsonl) per step, tokenized and collated once by lorafit
(``lorafit.preference.collate_pairs``: chosen rows then rejected rows, right-padded) and given to TRL in its own
collator's layout (tests/test_preference.py proves the layouts equal). Each framework's reference is the same
model with the adapter switched off (no second model): lorafit's ``adapters_disabled``, PEFT's
``disable_adapter`` inside TRL. A step is what each trainer does per optimizer step: the reference's no-grad
forward, the policy's forward over chosen + rejected in one batch, backward, AdamW.

TRL rows run ``DPOTrainer.compute_loss`` in the bench's loop (the same loop, optimizer and timing as lorafit's
rows): everything TRL does per step except its Trainer's bookkeeping. "trl" is TRL's DPO with checkpointing
off; "trl+checkpointing" is DPOConfig's default (``gradient_checkpointing=True``), what a user gets without
setting it. Tokens per second count real tokens (attention_mask), the prompt once per answer, in both.
"""

from __future__ import annotations

import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAIRS_FILE = REPO / "configs/data/dates_pref_train.jsonl"
DPO_PAIRS = 8  # pairs per step: 16 rows through the model at once (the DPO quickstart's micro-batch)
DPO_SEQ = 128  # data.max_seq_len (the quickstart's); the dates pairs are ~40-60 tokens
BETA = 0.1


def pair_batches(tokenizer, steps: int, pairs: int = DPO_PAIRS) -> list[dict]:
    """``steps`` batches of ``pairs`` consecutive pairs of the DPO quickstart's training data."""
    from lorafit.preference import collate_pairs, load_preference

    data = load_preference(str(PAIRS_FILE), tokenizer, DPO_SEQ)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [collate_pairs(data.pairs[k * pairs:(k + 1) * pairs], pad) for k in range(steps)]


def trl_inputs(batch: dict) -> dict:
    """A collate_pairs batch as TRL's DataCollatorForPreference writes it (answers marked by completion_mask)."""
    from lorafit.examples import IGNORE_INDEX

    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "completion_mask": (batch["labels"] != IGNORE_INDEX).long()}


def lorafit_step(model, row, rank: int, alpha: int, dropout: float):
    """lorafit's adapters on ``model`` and its DPO loss, as ``lorafit train`` builds them for ``objective: dpo``."""
    from lorafit.adapters.switch import adapters_disabled
    from lorafit.config import LoRAConfig
    from lorafit.fused import use_fused_layers
    from lorafit.inject import inject_lora, lora_modules
    from lorafit.objectives import DPOObjective, reference_under

    inject_lora(model, LoRAConfig(r=rank, alpha=alpha, dropout=dropout, variant=row.variant), for_training=True)
    modules = {f"{name}.{part}": param for name, module in lora_modules(model).items()
               for part, param in module.adapter_params().items()}
    use_fused_layers(model)  # as lorafit train does without compile
    objective = DPOObjective(model, beta=BETA, reference_logps=reference_under(model, lambda: adapters_disabled(model)))
    return model, modules, lambda batch: objective(**batch)[0]


def trl_step(model, tokenizer, rank: int, alpha: int, dropout: float, folder: str):
    """TRL's DPOTrainer over ``model`` with a PEFT LoRA (reference = adapter disabled) and its compute_loss."""
    import warnings

    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    if tokenizer.pad_token is None:  # TRL pads with the pad token; lorafit's collate_pairs falls back to eos too
        tokenizer.pad_token = tokenizer.eos_token
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}]  # the trainer wants a dataset; batches come from us
    args = DPOConfig(output_dir=folder, report_to=[], beta=BETA, loss_type=["sigmoid"], max_length=None,
                     per_device_train_batch_size=DPO_PAIRS, use_cpu=next(model.parameters()).device.type == "cpu",
                     bf16=False, fp16=False, disable_tqdm=True, dataset_num_proc=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             peft_config=LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                                    target_modules="all-linear"))
    model = trainer.model
    modules = {n.removeprefix("base_model.model.").replace(".default", ""): p
               for n, p in model.named_parameters() if "lora_" in n}
    return model, modules, lambda batch: trainer.compute_loss(model, trl_inputs(batch))


def run_dpo(row, steps: int, init_path: str, base: str, rank: int, alpha: int, dropout: float, lr: float,
            warmup: int) -> dict:
    """One DPO run of ``row`` (a bench.Row: framework lorafit or trl) in this process: per-step losses, times,
    tokens per second (median after ``warmup`` steps) and peak memory (RSS sampled during training on a CPU)."""
    import tempfile

    import torch
    from bench import precision_setup, start_from, timed_steps

    from lorafit.config import ModelConfig
    from lorafit.device import compute_device
    from lorafit.model import load_base_model, load_tokenizer
    from lorafit.quant import base_memory

    torch.manual_seed(0)
    weights, autocast = precision_setup(row, None)
    cfg = ModelConfig(base=base, dtype=weights)
    tokenizer = load_tokenizer(cfg)
    data = pair_batches(tokenizer, steps)
    device = compute_device()
    model = load_base_model(cfg, training=True, device=device)
    with tempfile.TemporaryDirectory() as folder:
        if row.framework == "lorafit":
            model, modules, loss_fn = lorafit_step(model, row, rank, alpha, dropout)
        else:
            model, modules, loss_fn = trl_step(model, tokenizer, rank, alpha, dropout, folder)
    start_from(modules, init_path)  # the same A (and zero B) for every run
    model.to(device)
    times, losses, tokens, peak, params = timed_steps(model, row, data, loss_fn, lr, autocast, device,
                                                      lambda batch: batch["attention_mask"].sum())
    step = statistics.median(times[warmup:])
    tokens_per_s = sum(tokens[warmup:]) / sum(times[warmup:])  # batches differ in length: all tokens over all time
    base_params = base_memory(model)[1] // 2
    lora_params = sum(p.numel() for p in params)
    # per token: the reference's forward 2N, the policy's forward 2N and input-gradient backward 2N; LoRA 6/param
    flops_per_token = 6 * base_params + 6 * lora_params
    return {"row": row.name, "weights": weights, "autocast": autocast, "quantize": None, "device": device.type,
            "losses": losses, "step_times": times, "median_step_s": step,
            "tokens_per_s": tokens_per_s,
            "peak_memory_bytes": peak, "flops_per_token": flops_per_token}
