"""``lorafit eval``: the base model and each adapter side by side, from ONE load of the base.

Adapters are swapped in and out of the same base model (load, evaluate, unwrap), which is the cheap
task switching LoRA promises, and guarantees every row of the table saw the same base weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lorafit.adapter_io import load_adapter
from lorafit.adapters.tokens import grow_vocabulary
from lorafit.config import DataConfig, ModelConfig, load_recipe
from lorafit.data import (
    NothingToScore,
    TokenizedData,
    generation_example,
    iter_rows,
    load_rows,
    row_location,
    tokenize_rows,
)
from lorafit.device import compute_device
from lorafit.errors import LorafitError
from lorafit.files import local_paths
from lorafit.inject import remove_lora
from lorafit.loss import evaluate_loss
from lorafit.model import adapter_tokenizer, load_base_model, load_tokenizer
from lorafit.preference import Pair, tokenize_preference_rows
from lorafit.preference_train import score_pairs
from lorafit.token_cache import load_tokenized

METRICS = ("loss", "exact_match")
FORMATS = ("text", "alpaca", "chat", "prompt_completion", "preference")


@dataclass
class EvalResult:
    name: str
    loss: float | None
    perplexity: float | None
    exact_match: float | None
    n: int
    # preference data (lorafit/preference_train.py score_pairs): the share of pairs whose chosen answer has the
    # higher log-prob, and the mean log-prob margin chosen − rejected (nats); loss is then the chosen answers' NLL
    preference_accuracy: float | None = None
    preference_margin: float | None = None

    def to_json(self) -> dict:
        """The result's fields; the preference ones only where the data were pairs (SFT results keep their keys)."""
        fields = asdict(self)
        return {key: value for key, value in fields.items()
                if value is not None or not key.startswith("preference_")}


@dataclass
class EvalTask:
    """What to evaluate on, prepared once and reused for the base and every adapter."""

    tokenized: TokenizedData | None          # for loss
    pairs: list[Pair] | None                  # for loss and the preference metrics (preference data)
    prompts: list[list[int]] | None           # for exact_match
    references: list[str] | None
    micro_batch_size: int
    max_new_tokens: int


@dataclass
class EvalPlan:
    """What the command line asked for, checked: which base, adapters, data and metrics."""

    model_cfg: ModelConfig
    adapters: list[Path]
    data_path: str
    data_format: str
    metrics: list[str]
    max_seq_len: int = 1024
    device: str | None = None   # --device; None: lorafit.device's rule

    def inputs(self) -> dict[str, Path]:
        """The local files and folders this evaluation reads (an output must never replace one of them)."""
        adapters = {f"--adapter {adapter}": adapter for adapter in self.adapters}  # checked to exist
        return {**adapters, **local_paths({"--data": self.data_path, "--base": self.model_cfg.base})}


def eval_plan(recipe: Path | None, base: str | None, adapters: list[Path], data: str | None, data_format: str,
              dtype: str, metrics: list[str], device: str | None = None) -> EvalPlan:
    """From ``lorafit eval RECIPE`` (the recipe's base, OUT/adapter and data.eval; flags override) or from
    ``--base/--adapter/--data`` flags."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise LorafitError(f"--metric {unknown[0]!r}: use loss or exact_match")
    if data_format not in FORMATS:
        raise LorafitError(f"--format {data_format!r}: use {', '.join(FORMATS)}")
    if recipe is not None:
        loaded = load_recipe(recipe)
        if data is None and loaded.data.eval is None:
            raise LorafitError(f"{recipe}: data.eval is not set; pass --data FILE to say what to evaluate on")
        model_cfg = loaded.model.model_copy(update={"base": base} if base else {})
        plan = EvalPlan(model_cfg, adapters or [Path(loaded.output.dir) / "adapter"], data or loaded.data.eval,
                        loaded.data.format, metrics, loaded.data.max_seq_len, device)
    elif base is None or data is None:
        raise LorafitError("lorafit eval needs a RECIPE, or --base and --data (see lorafit eval --help)")
    else:
        plan = EvalPlan(ModelConfig(base=base, dtype=dtype), adapters, data, data_format, metrics, device=device)
    compute_device(device)  # an unusable --device is refused before anything loads
    for adapter in plan.adapters:
        if not (adapter / "adapter_config.json").is_file():
            raise LorafitError(f"--adapter {adapter}: no adapter_config.json there (train first, or check the path)")
    return plan


def run_eval(plan: EvalPlan, limit: int | None = None, max_new_tokens: int = 32,
             micro_batch_size: int = 16) -> list[EvalResult]:
    own = adapter_tokenizer(plan.adapters)  # the adapters' own tokenizer when they added tokens
    tokenizer = load_tokenizer(plan.model_cfg, own)
    task = prepare_task(tokenizer, plan.data_path, plan.data_format, plan.metrics, plan.max_seq_len, limit,
                        micro_batch_size, max_new_tokens)
    model = load_base_model(plan.model_cfg, device=compute_device(plan.device)).eval()
    if own is not None:  # added tokens: the base as the run started, their rows untrained
        grow_vocabulary(model, len(tokenizer))
    results = [evaluate_model(model, tokenizer, task, "base")]
    for adapter in plan.adapters:
        load_adapter(model, adapter)
        results.append(evaluate_model(model, tokenizer, task, str(adapter)))
        remove_lora(model)
    return results


def prepare_task(tokenizer, data_path: str, data_format: str, metrics: list[str], max_seq_len: int,
                 limit: int | None, micro_batch_size: int, max_new_tokens: int) -> EvalTask:
    # Generation needs the rows themselves, and so does --limit; loss alone reads the tokenized cache.
    rows = load_rows(data_path)[:limit] if limit or "exact_match" in metrics else None
    if rows == [] or (rows is None and not next(iter_rows(data_path), None)):
        raise LorafitError(f"{data_path}: no rows to evaluate (the file holds no examples); give a data file with "
                           f"at least one {data_format} row")
    if data_format == "preference":
        return preference_task(tokenizer, data_path, metrics, max_seq_len, limit, micro_batch_size, max_new_tokens)
    tokenized = prompts = references = None
    if "loss" in metrics:
        config = DataConfig(train=data_path, format=data_format, max_seq_len=max_seq_len)
        try:
            tokenized = (tokenize_rows(rows, config, tokenizer, data_path) if rows is not None
                         else load_tokenized(data_path, config, tokenizer))
        except NothingToScore:
            raise LorafitError(f"{data_path}: none of its rows has a token to score (all were skipped; see the data "
                               "summary rules in the README); check the rows and --format") from None
    if "exact_match" in metrics:
        pairs = [generation_example(row, data_format, tokenizer, row_location(data_path, i))
                 for i, row in enumerate(rows)]
        prompts, references = [p for p, _ in pairs], [r for _, r in pairs]
    return EvalTask(tokenized, None, prompts, references, micro_batch_size, max_new_tokens)


def preference_task(tokenizer, data_path: str, metrics: list[str], max_seq_len: int, limit: int | None,
                    micro_batch_size: int, max_new_tokens: int) -> EvalTask:
    """Preference rows: ``loss`` scores the pairs (chosen NLL, accuracy, margin); ``exact_match`` generates from
    each prompt and compares with the chosen answer."""
    rows = load_rows(data_path)[:limit]
    pairs = tokenize_preference_rows(rows, tokenizer, max_seq_len, data_path).pairs
    references = [row["chosen"] if isinstance(row["chosen"], str) else row["chosen"][-1]["content"] for row in rows]
    exact = "exact_match" in metrics
    return EvalTask(None, pairs if "loss" in metrics else None, [p["prompt_ids"] for p in pairs] if exact else None,
                    references if exact else None, micro_batch_size, max_new_tokens)


def evaluate_model(model, tokenizer, task: EvalTask, name: str) -> EvalResult:
    device = next(model.parameters()).device
    loss = exact = accuracy = margin = None
    n = 0
    if task.pairs is not None:
        loss, accuracy, margin = score_pairs(model, task.pairs, task.micro_batch_size, tokenizer.pad_token_id, device)
        n = len(task.pairs)
    if task.tokenized is not None:
        loss = evaluate_loss(model, task.tokenized, task.micro_batch_size, tokenizer.pad_token_id, device)
        n = len(task.tokenized.examples)
    if task.prompts is not None:
        answers = greedy_answers(model, tokenizer, task.prompts, task.max_new_tokens, task.micro_batch_size)
        exact = sum(a.strip() == r.strip() for a, r in zip(answers, task.references)) / len(answers)
        n = len(answers)
    return EvalResult(name, loss, math.exp(loss) if loss is not None else None, exact, n, accuracy, margin)


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuation of each prompt, decoded without special tokens. Batches are left-padded so
    every prompt ends where generation starts."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    answers = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, prompt in enumerate(chunk):
            input_ids[i, width - len(prompt):] = torch.tensor(prompt)
            attention_mask[i, width - len(prompt):] = 1
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        answers += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return answers
