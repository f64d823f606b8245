"""The training loop on a tiny random Llama: files, resume, accumulation, checkpointing, errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafit.adapters.base import TrainingHooks
from lorafit.adapters.lora import LoRALinear
from lorafit.config import DataConfig, LoRAConfig, load_recipe
from lorafit.data import collate, tokenize_rows
from lorafit.errors import LorafitError
from lorafit.inject import inject_lora, lora_modules
from lorafit.loss import TokenLoss
from lorafit.train import accumulate_gradients, make_accelerator
from lorafit.train import train as run_training

from .conftest import ROWS, ctrl_c_after_step, losses, recipe_at, tiny_model, tiny_tokenizer
from .tolerance import assert_close_by_rule, reduction_through


def test_run_writes_every_file_and_learns(run_dir):
    summary = run_training(recipe_at(run_dir))
    out = run_dir / "out"
    files = sorted(p.name for p in out.iterdir())
    assert files == ["adapter", "checkpoints", "loss.png", "metrics.jsonl", "recipe.yaml"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert sorted(p.name for p in (out / "checkpoints" / "step-000004").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "training_state.pt"]
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert [step for step, _ in losses(out)] == [1, 2, 3, 4, 5, 6]
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [e["step"] for e in evals] == [0, 3, 6]
    assert summary.eval_loss < summary.base_eval_loss
    assert (out / "loss.png").stat().st_size > 1000
    assert load_recipe(out / "recipe.yaml").lora.r == 4  # the resolved recipe is itself a valid recipe
    assert not [p for p in out.rglob(".*")]  # no temp folders left behind


def test_keep_last_prunes_old_checkpoints(run_dir):
    run_training(recipe_at(run_dir, "train.max_steps=7", "train.save_every=1", "train.keep_last=2"))
    assert sorted(p.name for p in (run_dir / "out" / "checkpoints").iterdir()) == ["step-000005", "step-000006"]


def test_interrupted_then_resumed_run_matches_uninterrupted(run_dir, monkeypatch):
    run_training(recipe_at(run_dir, out="straight"))
    expected = losses(run_dir / "straight")

    # Ctrl-C arrives while step 3 is being logged; the loop checkpoints after step 3 and stops.
    with ctrl_c_after_step(monkeypatch, 3), pytest.raises(LorafitError, match="interrupted after step 3"):
        run_training(recipe_at(run_dir, out="resumed"))
    assert not (run_dir / "resumed" / "adapter").exists()
    assert (run_dir / "resumed" / "checkpoints" / "step-000003").is_dir()

    with pytest.raises(LorafitError, match="already holds a run"):
        run_training(recipe_at(run_dir, out="resumed"))
    run_training(recipe_at(run_dir, out="resumed"), resume="latest")
    # exact, step by step: same code, same inputs, same device (the rule's one case for bit-exactness)
    assert losses(run_dir / "resumed") == expected
    straight = load_file(run_dir / "straight" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(run_dir / "resumed" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_resume_without_checkpoint_is_an_error(run_dir):
    with pytest.raises(LorafitError, match="no checkpoint"):
        run_training(recipe_at(run_dir), resume="latest")


def test_overwrite_replaces_previous_run(run_dir):
    run_training(recipe_at(run_dir, "train.max_steps=2"))
    run_training(recipe_at(run_dir, "train.max_steps=3", "output.overwrite=true"))
    assert [step for step, _ in losses(run_dir / "out")] == [1, 2, 3]


def micro_batches(sizes: list[int]):
    tokenizer = tiny_tokenizer()
    examples = tokenize_rows(ROWS[:8], DataConfig(train="x.jsonl"), tokenizer, "x.jsonl").examples
    batches, start = [], 0
    for size in sizes:
        batches.append(collate(examples[start : start + size], pad_id=0))
        start += size
    return batches


def lora_grads(model, batches) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    accumulate_gradients(TokenLoss(model), batches, make_accelerator("no"))
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def wrapped_model(**lora):
    model = tiny_model()
    inject_lora(model, LoRAConfig(r=4, alpha=8, **lora))
    with torch.no_grad():  # non-zero B so every adapter weight gets a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return model.train()


def batch_reduction(model, batches) -> int:
    """The rule's reduction for these gradients: through the model, summed over every token of the batches."""
    return reduction_through(model, tokens=sum(batch["input_ids"].numel() for batch in batches))


@pytest.mark.numerics
def test_grad_accumulation_equals_one_big_batch():
    model = wrapped_model()
    accumulated = lora_grads(model, micro_batches([4, 4]))
    whole = lora_grads(model, micro_batches([8]))
    reduction = batch_reduction(model, micro_batches([8]))
    for name in whole:
        # different padding widths and summation order: equal up to fp32 rounding
        assert_close_by_rule(accumulated[name], whole[name], reduction=reduction, msg=name)


@pytest.mark.numerics
def test_gradient_checkpointing_gives_same_lora_gradients():
    model = wrapped_model()
    plain = lora_grads(model, micro_batches([8]))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = lora_grads(model, micro_batches([8]))
    assert model.model.gradient_checkpointing
    for name in plain:
        assert checkpointed[name].abs().sum() > 0
        assert_close_by_rule(checkpointed[name], plain[name], reduction=batch_reduction(model, micro_batches([8])),
                             msg=name)


def test_gradient_checkpointing_run(run_dir):
    summary = run_training(recipe_at(run_dir, "train.gradient_checkpointing=true", "train.max_steps=2"))
    assert summary.steps == 2


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")), reason="needs a C++ compiler")
def test_compiled_run_matches_eager_run(run_dir):
    """train.compile: same losses and eval loss as eager (inductor reorders fp32 sums: 1e-4 relative).

    Outside tests/tolerance.py's rule on purpose: these are losses after optimizer steps, and AdamW divides
    each gradient by its own root mean square, so a rounding difference in a tiny gradient becomes a
    difference of order lr in the weights. 1e-4 relative is measured, not derived (tests/README.md)."""
    settings = ("lora.dropout=0", "train.max_steps=3", "train.save_every=3")  # inductor has its own dropout RNG
    eager = run_training(recipe_at(run_dir, *settings))
    compiled = run_training(recipe_at(run_dir, *settings, "train.compile=true", out="compiled"))
    assert [s for s, _ in losses(run_dir / "compiled")] == [1, 2, 3]
    for (_, ours), (_, reference) in zip(losses(run_dir / "compiled"), losses(run_dir / "out")):
        assert ours == pytest.approx(reference, rel=1e-4)
    assert compiled.eval_loss == pytest.approx(eager.eval_loss, rel=1e-4)


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "the dataset is empty"), ('{"prompt": "a"}\n', "field 'completion' is missing"),
     ('{"prompt": "a", "completion": "b"\n', "not valid JSON")],
    ids=["empty", "missing-field", "bad-json"],
)
def test_bad_data_writes_nothing(run_dir, content, message):
    (run_dir / "train.jsonl").write_text(content)
    with pytest.raises(LorafitError, match=message):
        run_training(recipe_at(run_dir))
    assert not (run_dir / "out").exists()


def test_non_finite_loss_stops_with_message_and_keeps_checkpoint(run_dir, monkeypatch):
    from lorafit import loss as loss_module

    original = loss_module.token_loss_sum
    calls = {"n": 0}

    def poisoned(model, batch):
        loss = original(model, batch)
        calls["n"] += int(model.training)  # one training micro-batch per step here
        return loss * float("nan") if model.training and calls["n"] > 4 else loss

    monkeypatch.setattr(loss_module, "token_loss_sum", poisoned)  # what TokenLoss calls
    with pytest.raises(LorafitError, match=r"loss became nan at step 5.*step-000004"):
        run_training(recipe_at(run_dir, "data.eval=null"))
    assert not (run_dir / "out" / "adapter").exists()
    assert (run_dir / "out" / "checkpoints" / "step-000004").is_dir()


def test_fp16_on_cpu_is_refused(run_dir):
    # The CPU even on a GPU machine: tests not marked gpu compute there (conftest's LORAFIT_DEVICE=cpu).
    with pytest.raises(LorafitError, match="fp16 needs a CUDA GPU"):
        run_training(recipe_at(run_dir, "train.precision=fp16"))
    assert not (run_dir / "out").exists()


def test_val_fraction_and_packing_run(run_dir):
    summary = run_training(recipe_at(run_dir, "data.eval=null", "data.val_fraction=0.25", "data.packing=true",
                                     "train.max_steps=2"))
    assert len(summary.eval_data.examples) == 8 and len(summary.train_data.examples) == 24


def test_overwrite_keeps_previous_run_when_new_data_is_bad(run_dir):
    run_training(recipe_at(run_dir, "train.max_steps=2"))
    (run_dir / "train.jsonl").write_text('{"prompt": "a"}\n')
    with pytest.raises(LorafitError, match="field 'completion' is missing"):
        run_training(recipe_at(run_dir, "output.overwrite=true"))
    assert (run_dir / "out" / "adapter" / "adapter_model.safetensors").is_file()


class _RecordingHooks(TrainingHooks):
    """A stand-in variant's hooks: an L2 penalty on B, and a log of each step end with its gradients."""

    calls: list[tuple[int, bool]] = []

    def regularization(self) -> torch.Tensor:
        return 0.5 * sum(m.lora_B.weight.square().sum() for m in self.modules.values())

    def on_step_end(self, step: int) -> None:
        grads = all(m.lora_B.weight.grad is not None for m in self.modules.values())
        _RecordingHooks.calls.append((step, grads))


@pytest.mark.numerics
def test_variant_regularization_joins_the_step_loss_once():
    """The gradient with a variant's penalty is the LM gradient plus the penalty's own gradient (0.5·‖B‖²
    gives B), whatever the number of micro-batches: the penalty counts once per optimizer step."""
    model = wrapped_model()
    plain = lora_grads(model, micro_batches([4, 4]))
    hooks = _RecordingHooks(lora_modules(model), total_steps=1)
    model.zero_grad(set_to_none=True)
    accumulate_gradients(TokenLoss(model), micro_batches([4, 4]), make_accelerator("no"), hooks)
    for name, param in model.named_parameters():
        if param.requires_grad:
            expected = plain[name] + (param.detach() if "lora_B" in name else 0)
            assert_close_by_rule(param.grad, expected, reduction=batch_reduction(model, micro_batches([4, 4])),
                                 msg=name)


def test_train_calls_the_variants_step_hook_after_each_step(run_dir, monkeypatch):
    _RecordingHooks.calls = []
    monkeypatch.setattr(LoRALinear, "training_hooks", _RecordingHooks)
    run_training(recipe_at(run_dir, "train.max_steps=3"))
    assert _RecordingHooks.calls == [(1, True), (2, True), (3, True)]


def test_output_dir_that_is_a_file_is_refused_and_kept(run_dir):
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(LorafitError, match="is a file, not a folder"):
        run_training(recipe_at(run_dir, out="notes.txt"))
    assert (run_dir / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("damage", ["truncated", "random", "pickle"])
def test_damaged_training_state_names_the_file_and_offers_the_previous_checkpoint(run_dir, damage):
    import pickle

    run_training(recipe_at(run_dir, "train.max_steps=4", "train.save_every=1", "train.keep_last=3"))
    state = run_dir / "out" / "checkpoints" / "step-000003" / "training_state.pt"
    payload = state.read_bytes()
    state.write_bytes({"truncated": payload[: len(payload) // 2], "random": bytes(range(256)) * 8,
                       "pickle": pickle.dumps(Path("."))}[damage])
    with pytest.raises(LorafitError, match="step-000003/training_state.pt is damaged or not a lorafit checkpoint") \
            as err:
        run_training(recipe_at(run_dir, "train.max_steps=4"), resume=str(state.parent))
    assert "--resume-from " + str(run_dir / "out" / "checkpoints" / "step-000002") in str(err.value)


def test_resume_drops_a_metrics_line_cut_short_by_a_kill(run_dir, monkeypatch):
    run_training(recipe_at(run_dir, out="straight"))
    with ctrl_c_after_step(monkeypatch, 3), pytest.raises(LorafitError, match="interrupted after step 3"):
        run_training(recipe_at(run_dir, out="resumed"))
    metrics = run_dir / "resumed" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"event": "train", "step": 4, "lo')  # a kill mid-write
    run_training(recipe_at(run_dir, out="resumed"), resume="latest")
    assert losses(run_dir / "resumed") == losses(run_dir / "straight")


def test_prepare_builds_the_run_and_fit_runs_it_as_train_does(run_dir):
    """prepare does everything before step 1 (OUT started, nothing stepped or logged); run.save writes a
    checkpoint; fit is the loop. Together they are train: the same losses, bit for bit (same code and inputs)."""
    from lorafit.train import fit, prepare

    run_training(recipe_at(run_dir, "train.max_steps=2", out="trained"))
    run = prepare(recipe_at(run_dir, "train.max_steps=2"))
    out = run_dir / "out"
    assert (run.start_step, run.total_steps, run.checkpoint, run.world) == (0, 2, None, 1)
    assert sorted(p.name for p in out.iterdir()) == ["recipe.yaml"]
    assert run.save(0) == out / "checkpoints" / "step-000000" and (out / "checkpoints" / "step-000000").is_dir()
    summary = fit(run)
    assert summary.steps == 2 and summary.adapter_dir == out / "adapter"
    assert losses(out) == losses(run_dir / "trained")


def test_one_batch_rule_for_train_and_plan():
    from lorafit.config import TrainConfig
    from lorafit.train import BatchShape

    four = BatchShape.of(TrainConfig(micro_batch_size=4, grad_accum=2, fsdp=True), 4)
    assert (four.per_process, four.rows, four.sharded) == (8, 32, True)
    assert four.run_line("MULTI_GPU") == ("4 processes (MULTI_GPU, FSDP: weights sharded): micro-batch 4 per process "
                                          "x grad_accum 2 x 4 = global batch 32 rows per step")
    assert four.plan_line().endswith("micro-batch 4 x grad_accum 2 per process x 4 = 32 rows per step")
    one = BatchShape.of(TrainConfig(micro_batch_size=4, grad_accum=2, fsdp=True), 1)
    assert (one.rows, one.sharded) == (8, False)  # one process: nothing to shard
    assert one.plan_line().startswith("batch: micro-batch 4 x grad_accum 2 = 8 rows per step")
