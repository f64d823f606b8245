"""Preference tuning through the loop (lorafit/preference_train.py): recipes, a DPO / ORPO run end to end, resume,
the adapter switch, SFT then DPO from an adapter, and ``lorafit eval`` on pairs. A tiny random Llama, fp32, CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafit.adapters.switch import adapter_snapshot, adapter_weights, adapters_disabled
from lorafit.config import LoRAConfig, load_recipe
from lorafit.errors import LorafitError
from lorafit.inject import inject_lora
from lorafit.train import train as run_training

from .conftest import ctrl_c_after_step, randomize_lora_B, tiny_model, write_recipe

PAIRS = [{"prompt": f"Convert {m} {d}, {1990 + d}", "chosen": f"{1990 + d}-{m:02d}-{d:02d}",
          "rejected": f"{1990 + d}-{d:02d}-{m:02d}" if m != d else f"{2090 + d}-{m:02d}-{d:02d}"}
         for m in range(1, 5) for d in range(1, 9)]


@pytest.fixture
def pref_dir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    (tmp_path / "eval_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS[:8]))
    sft = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in PAIRS]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    return tmp_path


def pref_recipe(folder: Path, *overrides: str, out: str = "out", lora: str = "r: 4, alpha: 8"):
    text = f"""\
model: {{base: {folder / 'tiny-llama'}, dtype: float32}}
lora: {{{lora}}}
data: {{train: {folder / 'pairs.jsonl'}, eval: {folder / 'eval_pairs.jsonl'}, format: preference, max_seq_len: 64}}
train: {{objective: dpo, beta: 0.1, max_steps: 6, micro_batch_size: 4, lr: 2.0e-2, warmup_steps: 0,
         precision: "no", eval_every: 3, save_every: 2, seed: 0}}
output: {{dir: {folder / out}}}
"""
    return load_recipe(write_recipe(folder / f"{out}.yaml", text), list(overrides))


def records(out: Path, event: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


# ------------------------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.objective=sft"], "data.format: preference needs a preference objective.*train.objective: dpo"),
    (["data.format=prompt_completion"], "train.objective: dpo trains on pairs.*set data.format: preference"),
    (["train.objective=orpo", "data.format=chat"], "train.objective: orpo trains on pairs"),
    (["data.packing=true"], "preference does not support data.packing"),
    (["train.beta=0"], "train.beta"),
    (["lora.init_from=nowhere"], "lora.init_from: 'nowhere' is not an adapter folder"),
])
def test_recipes_that_mix_objective_and_data_are_refused_with_the_fix(pref_dir, overrides, message):
    with pytest.raises(LorafitError, match=message):
        pref_recipe(pref_dir, *overrides)


def test_defaults_are_sft_and_beta_one_tenth(pref_dir):
    recipe = pref_recipe(pref_dir)
    assert recipe.train.beta == 0.1
    assert type(recipe.train).model_fields["objective"].default == "sft"


# ------------------------------------------------------------------------------------------------ the loop


def test_a_dpo_run_writes_its_metrics_and_learns_the_preference(pref_dir):
    from rich.console import Console

    console = Console(record=True, width=200)
    summary = run_training(pref_recipe(pref_dir, "train.max_steps=8", "train.eval_every=4"), console=console)
    assert "step 0 (base model = DPO's reference) eval loss 0.6931" in console.export_text()
    assert summary.start == "base model = DPO's reference"
    out = pref_dir / "out"
    train = records(out, "train")
    assert [r["step"] for r in train] == list(range(1, 9))
    for record in train:
        assert all(key in record for key in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen",
                                             "rewards/rejected", "logps/chosen", "logps/rejected"))
        assert torch.isfinite(torch.tensor(record["loss"]))
    # Step 1: the fresh adapter (B = 0) is the reference, so every reward is 0 and the loss is log 2.
    assert train[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)
    assert train[0]["rewards/accuracies"] == 0.0
    assert train[-1]["rewards/accuracies"] > 0.5 and train[-1]["loss"] < train[0]["loss"]
    evals = records(out, "eval")
    assert [e["step"] for e in evals] == [0, 4, 8]
    assert evals[0]["eval_loss"] == pytest.approx(0.6931472, abs=1e-6)
    assert evals[-1]["eval_rewards/accuracies"] > evals[0]["eval_rewards/accuracies"]
    assert summary.eval_loss < summary.base_eval_loss
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()


def test_orpo_runs_without_a_reference(pref_dir):
    run_training(pref_recipe(pref_dir, "train.objective=orpo", "train.max_steps=4"))
    train = records(pref_dir / "out", "train")
    assert "nll_loss" in train[0] and "log_odds_ratio" in train[0]
    assert train[-1]["loss"] < train[0]["loss"]


def test_an_interrupted_dpo_run_resumes_to_the_same_adapter(pref_dir, monkeypatch):
    run_training(pref_recipe(pref_dir, out="straight"))
    with ctrl_c_after_step(monkeypatch, 3), pytest.raises(LorafitError, match="interrupted after step 3"):
        run_training(pref_recipe(pref_dir, out="resumed"))
    run_training(pref_recipe(pref_dir, out="resumed"), resume="latest")
    def logged(out: str) -> list[dict]:  # every metric of every step, bit for bit; time aside
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records(pref_dir / out, "train")]

    assert logged("resumed") == logged("straight")
    straight = load_file(pref_dir / "straight" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(pref_dir / "resumed" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize("lora", ["r: 4, variant: dora", "r: 4, variant: vera", "r: 4, variant: adalora"])
def test_dpo_trains_every_variant(pref_dir, lora):
    run_training(pref_recipe(pref_dir, "train.max_steps=3", "train.eval_every=3", "train.save_every=3", lora=lora))
    train = records(pref_dir / "out", "train")
    assert train[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)  # the variant's fresh update is zero
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert train[-1]["loss"] != train[0]["loss"]


@pytest.mark.parametrize(("precision", "precompute"), [("'no'", "false"), ("bf16", "true")])
def test_dpo_over_a_4bit_base_learns_with_the_base_as_its_reference(pref_dir, precision, precompute):
    """QLoRA + DPO: the reference is the 4-bit base itself (adapters off), so the fresh run starts at log 2. In bf16
    (4-bit layers computing in bf16 under autocast) with the reference precomputed before the first step: under
    the steps' autocast too (without it the 4-bit model's attention gets mixed dtypes). bf16: the policy's
    once-rounded output and the base's differ in the last bits of summed log-probs of ~60 (2^-8 relative per
    token), so log 2 within 5e-3."""
    pytest.importorskip("bitsandbytes")
    run_training(pref_recipe(pref_dir, "model.quantize=4bit", "train.max_steps=3", "train.eval_every=3",
                             "train.save_every=3", f"train.precision={precision}",
                             f"train.precompute_reference={precompute}"))
    train = records(pref_dir / "out", "train")
    assert train[0]["loss"] == pytest.approx(0.6931472, abs=1e-6 if precision == "'no'" else 5e-3)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train) and train[-1]["loss"] < train[0]["loss"]
    assert train[-1]["rewards/margins"] > 0
    saved = load_file(pref_dir / "out" / "adapter" / "adapter_model.safetensors")
    assert saved and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in saved.values())


def test_switched_off_adapters_over_a_4bit_base_give_its_logits_bit_for_bit(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    from lorafit.config import ModelConfig
    from lorafit.model import load_base_model

    model = load_base_model(ModelConfig(base=str(tiny_model_dir), dtype="float32", quantize="4bit"), training=True)
    with torch.no_grad():
        base = model(IDS).logits
    inject_lora(model, LoRAConfig(r=4), for_training=True)
    randomize_lora_B(model)
    with torch.no_grad():
        adapted = model(IDS).logits
        with adapters_disabled(model):
            off = model(IDS).logits
    assert not torch.equal(adapted, base)
    assert torch.equal(off, base)  # the 4-bit layers' own forward, on the same inputs


# ------------------------------------------------------------------------------------------------ the switch

IDS = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("variant", ["lora", "dora", "vera", "adalora"])
def test_switched_off_adapters_give_the_base_logits_bit_for_bit(variant):
    model = tiny_model()
    with torch.no_grad():
        base = model(IDS).logits
    inject_lora(model, LoRAConfig(r=4, variant=variant))
    randomize_lora_B(model)
    with torch.no_grad():
        adapted = model(IDS).logits
        with adapters_disabled(model):
            off = model(IDS).logits
        after = model(IDS).logits
    assert not torch.equal(adapted, base)
    assert torch.equal(off, base)  # same modules, same inputs, same device: the one case for bit-exactness
    assert torch.equal(after, adapted)


def test_a_snapshot_of_the_adapter_is_swapped_in_and_back_exactly():
    model = tiny_model()
    inject_lora(model, LoRAConfig(r=4))
    randomize_lora_B(model, seed=3)
    start = adapter_snapshot(model)
    with torch.no_grad():
        at_start = model(IDS).logits
    randomize_lora_B(model, seed=4)  # training moved the adapter
    own = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad(), adapter_weights(model, start):
        swapped = model(IDS).logits
    assert torch.equal(swapped, at_start)
    assert all(torch.equal(p, own[n]) for n, p in model.named_parameters() if p.requires_grad)
    model.base_model.layers[0].self_attn.q_proj.merge()
    with pytest.raises(ValueError, match="merged"), adapters_disabled(model):
        pass


# ------------------------------------------------------------------------------------------- SFT, then DPO


def sft_adapter(pref_dir: Path) -> Path:
    text = f"""\
model: {{base: {pref_dir / 'tiny-llama'}, dtype: float32}}
lora: {{r: 4, alpha: 8}}
data: {{train: {pref_dir / 'sft.jsonl'}, max_seq_len: 64}}
train: {{max_steps: 3, micro_batch_size: 4, lr: 2.0e-2, precision: "no"}}
output: {{dir: {pref_dir / 'sft'}}}
"""
    run_training(load_recipe(write_recipe(pref_dir / "sft.yaml", text)))
    return pref_dir / "sft" / "adapter"


def test_dpo_from_an_sft_adapter_starts_there_with_that_adapter_as_reference(pref_dir, monkeypatch):
    start = sft_adapter(pref_dir)
    recipe = pref_recipe(pref_dir, f"lora.init_from={start}", "train.max_steps=4", "train.save_every=2")
    assert run_training(recipe).start == "starting adapter = DPO's reference"
    train = records(pref_dir / "out", "train")
    # Step 1: the policy is the starting adapter, which is the reference: every reward 0, loss log 2.
    assert train[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)
    assert train[0]["rewards/margins"] == 0.0
    assert train[-1]["rewards/accuracies"] > 0.5
    evals = records(pref_dir / "out", "eval")
    assert evals[0]["eval_loss"] == pytest.approx(0.6931472, abs=1e-6)
    # Resume: the reference is still the starting adapter, not the checkpoint's weights.
    with ctrl_c_after_step(monkeypatch, 2), pytest.raises(LorafitError, match="interrupted after step 2"):
        run_training(pref_recipe(pref_dir, f"lora.init_from={start}", "train.max_steps=4", "train.save_every=2",
                                 out="resumed"))
    run_training(pref_recipe(pref_dir, f"lora.init_from={start}", "train.max_steps=4", "train.save_every=2",
                             out="resumed"), resume="latest")
    assert [r["loss"] for r in records(pref_dir / "resumed", "train")] == [r["loss"] for r in train]


def test_a_start_adapter_the_recipe_does_not_describe_is_refused(pref_dir):
    start = sft_adapter(pref_dir)
    with pytest.raises(LorafitError, match=r"lora.init_from: adapter .* is not the adapter this recipe's lora block"
                                           r"(.|\n)*r is 4 in the adapter, 8 in the recipe"):
        run_training(pref_recipe(pref_dir, f"lora.init_from={start}", lora="r: 8, alpha: 8"))
    with pytest.raises(LorafitError, match="the adapter is lora, the recipe's lora.variant builds DoRALinear"):
        run_training(pref_recipe(pref_dir, f"lora.init_from={start}", lora="r: 4, alpha: 8, variant: dora"))
    with pytest.raises(LorafitError, match="the adapter adapts it, the recipe does not"):
        run_training(pref_recipe(pref_dir, f"lora.init_from={start}", lora="r: 4, alpha: 8, target_modules: [q_proj]"))


# ------------------------------------------------------------------------ the reference precomputed and cached


def score_calls(monkeypatch) -> list[int]:
    """How many pairs each reference-table scoring pass covers (a whole table, or the cache check's first batch)."""
    import lorafit.reference_cache as reference_cache

    calls, score = [], reference_cache.score
    monkeypatch.setattr(reference_cache, "score", lambda reference, pairs, *a: calls.append(len(pairs))
                        or score(reference, pairs, *a))
    return calls


def test_a_precomputed_reference_trains_what_the_per_step_reference_trains(pref_dir, monkeypatch):
    """Same pairs, same reference: only where its numbers come from differs (and the padding of the batch they
    were computed in: last-bit roundings, hence a tolerance and not equality)."""
    run_training(pref_recipe(pref_dir, "train.max_steps=4", out="per_step"))
    calls = score_calls(monkeypatch)
    run_training(pref_recipe(pref_dir, "train.max_steps=4", "train.precompute_reference=true", out="pre"))
    assert calls == [len(PAIRS)]  # one pass over the training pairs, before the first step
    ours, theirs = records(pref_dir / "pre", "train"), records(pref_dir / "per_step", "train")
    assert ours[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)  # fresh adapter: policy = reference
    for a, b in zip(ours, theirs, strict=True):  # summed log-probs of ~10 tokens: fp32 rounding ~1e-6 relative
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["logps/chosen"] == pytest.approx(b["logps/chosen"], rel=1e-4)
    saved, expected = (load_file(pref_dir / out / "adapter" / "adapter_model.safetensors")
                       for out in ("pre", "per_step"))
    assert saved.keys() == expected.keys()
    for key, tensor in saved.items():  # 4 AdamW steps at lr 2e-2: rounding moves weights by far less than a step
        assert torch.allclose(tensor, expected[key], atol=2e-2 * 1e-3), key


def test_the_reference_table_is_cached_checked_and_made_again_when_it_no_longer_fits(pref_dir, monkeypatch):
    from lorafit.model import cache_dir

    def entries() -> set[Path]:  # the test session's cache folder: other tests' entries are there too
        return set((cache_dir() / "reference").glob("*.safetensors"))

    calls, before = score_calls(monkeypatch), entries()
    pre = ("train.max_steps=2", "train.save_every=2", "train.eval_every=2", "train.precompute_reference=true")
    run_training(pref_recipe(pref_dir, *pre, out="first"))
    new = entries() - before
    assert calls == [len(PAIRS)] and len(new) == 1
    entry = new.pop()
    run_training(pref_recipe(pref_dir, *pre, out="second"))
    assert calls == [len(PAIRS), 4]  # read back; only the first micro-batch (4 pairs) scored again, as a check
    def numbers(out: str) -> list[tuple]:
        return [(r["loss"], r["grad_norm"], r["logps/chosen"], r["rewards/margins"])
                for r in records(pref_dir / out, "train")]

    assert numbers("second") == numbers("first")  # the same table, bit for bit: the same run
    # Another base under the same names and sizes (the fingerprint cannot see it): the check catches it.
    from safetensors.torch import load_file as load
    from safetensors.torch import save_file

    table = load(entry)["logps"]
    save_file({"logps": table + 1.0}, entry)
    run_training(pref_recipe(pref_dir, *pre, out="third"))
    assert calls == [len(PAIRS), 4, 4, len(PAIRS)]
    assert torch.equal(load(entry)["logps"], table)  # made again, and equal to the first table
    # Anything the numbers depend on is another entry: here the micro-batch size (padding).
    run_training(pref_recipe(pref_dir, *pre, "train.micro_batch_size=8", out="fourth"))
    assert calls[-1] == len(PAIRS) and len(entries() - before) == 2


def test_a_precomputed_reference_after_sft_is_the_starting_adapter(pref_dir):
    start = sft_adapter(pref_dir)
    run_training(pref_recipe(pref_dir, f"lora.init_from={start}", "train.max_steps=2", "train.save_every=2",
                             "train.eval_every=2", "train.precompute_reference=true"))
    train = records(pref_dir / "out", "train")
    assert train[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)  # not the base: rewards would not start at 0
    assert abs(train[0]["rewards/margins"]) < 1e-4


def test_precompute_reference_needs_dpo(pref_dir):
    with pytest.raises(LorafitError, match="train.precompute_reference precomputes DPO's reference.*train.objective "
                                           "is orpo"):
        pref_recipe(pref_dir, "train.objective=orpo", "train.precompute_reference=true")


# ------------------------------------------------------------------------------------------------ eval


def test_eval_on_pairs_reports_preference_accuracy_and_margin(pref_dir):
    from lorafit.objectives import batch_logps, split_pairs
    from lorafit.preference import collate_pairs, tokenize_preference_rows

    from .conftest import tiny_tokenizer
    from .test_cli import run
    from .test_preference import pad_id

    recipe = pref_recipe(pref_dir, "train.max_steps=8", "train.eval_every=8", "train.save_every=8")
    run_training(recipe)
    result = run("eval", str(pref_dir / "out.yaml"), "--metric", "loss", "--json", str(pref_dir / "eval.json"))
    assert result.returncode == 0, result.stderr
    assert "pref" in result.stdout  # the table's preference columns
    base, adapter = json.loads((pref_dir / "eval.json").read_text())["results"]
    tokenizer = tiny_tokenizer()
    batch = collate_pairs(tokenize_preference_rows(PAIRS[:8], tokenizer, 64, "x").pairs, pad_id(tokenizer))
    with torch.no_grad():
        chosen, rejected = split_pairs(batch_logps(tiny_model(), batch))
    assert base["n"] == 8
    assert base["preference_accuracy"] == float((chosen > rejected).float().mean())
    # fp32 rounding of log-probs of magnitude |logp| (the margin is a difference of two of them)
    scale = 1e-5 * float(chosen.abs().max())
    assert base["preference_margin"] == pytest.approx(float((chosen - rejected).mean()), abs=scale)
    assert base["loss"] == pytest.approx(float(-chosen.sum() / (batch["labels"][:8, 1:] != -100).sum()), rel=1e-5)
    assert adapter["preference_margin"] > base["preference_margin"]  # DPO widened it (eval loss < log 2)

    flags = run("eval", "--base", str(pref_dir / "tiny-llama"), "--data", str(pref_dir / "eval_pairs.jsonl"),
                "--format", "preference", "--metric", "loss", "--metric", "exact_match", "--max-new-tokens", "12",
                "--json", str(pref_dir / "flags.json"))
    assert flags.returncode == 0, flags.stderr
    (only,) = json.loads((pref_dir / "flags.json").read_text())["results"]
    assert only["preference_accuracy"] == base["preference_accuracy"] and only["exact_match"] == 0.0


# ------------------------------------------------------------------------------------------ two processes


@pytest.mark.numerics
def test_two_processes_train_the_dpo_adapter_one_process_trains(tmp_path, tiny_model_dir):
    """Weighted by pairs across micro-batches and processes: 2 processes x 4 pairs = 1 process x 8 pairs, grad_accum
    2 each. 36 pairs: the 5th global micro-batch has 4, so the second process runs a masked pair (weighing 0).
    Also with the reference precomputed (the main process scores and caches the table, the other reads it), and
    sharded with FSDP (the reference pass runs through the sharded model in every process)."""
    from .test_cli import run
    from .test_distributed import REDUCTION
    from .tolerance import assert_close_by_rule

    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS + PAIRS[:4]))
    (tmp_path / "eval_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS[:7]))
    outs = {}
    for name, micro, extra in (("one", 8, []), ("two", 4, ["--nproc", "2"]),
                               ("two-precomputed", 4, ["--nproc", "2", "--set=train.precompute_reference=true"]),
                               ("two-fsdp", 4, ["--nproc", "2", "--set=train.fsdp=true"])):
        settings = [f"train.micro_batch_size={micro}", "train.grad_accum=2", "train.max_steps=5",
                    "train.eval_every=5", "train.save_every=5"]
        recipe = pref_recipe(tmp_path, *settings, out=name)
        result = run("train", str(recipe.source), *[f"--set={s}" for s in settings], *extra)
        assert result.returncode == 0, result.stderr
        assert ("computed and cached" in result.stdout) == (name == "two-precomputed")
        outs[name] = tmp_path / name
    for other in ("two", "two-precomputed", "two-fsdp"):
        for event in ("train", "eval"):
            ones, twos = records(outs["one"], event), records(outs[other], event)
            for key in (k for k in ones[0] if k not in ("event", "step", "tokens_per_s", "lr", "epoch")):
                assert_close_by_rule([r[key] for r in twos], [r[key] for r in ones], reduction=REDUCTION,
                                     dtype=torch.float32, msg=f"{other} {event} {key}")
        one = load_file(outs["one"] / "adapter" / "adapter_model.safetensors")
        two = load_file(outs[other] / "adapter" / "adapter_model.safetensors")
        for key in one:
            assert_close_by_rule(two[key], one[key], reduction=REDUCTION, dtype=torch.float32, msg=f"{other} {key}")
