"""More than one process on CPU (gloo): N processes train what one process trains with an N-times larger
micro-batch, write one set of files, and resume exactly. The runs are real launches: `lorafit train --nproc 2`
(accelerate's launcher) and `torchrun --nproc-per-node 2 -m lorafit train`, as users start them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafit.data import IGNORE_INDEX, Batches
from lorafit.distributed import refuse_lonely_processes
from lorafit.errors import LorafitError

from .conftest import ROWS, model_folder, tiny_model, write_recipe
from .test_cli import run
from .tolerance import assert_close_by_rule, reduction_through, tolerance

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                     "--main_process_port", "0"]
# 36 rows: with 4 rows per process the 5th global micro-batch has 4 rows, so the second process gets none
# there (its masked stand-in row must change nothing).
DATA = ROWS + ROWS[:4]


def write_run_recipe(folder: Path, micro_batch_size: int) -> Path:
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in DATA))
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:7]))
    model_folder(tiny_model(), folder / "tiny-llama")
    text = f"""\
model: {{base: {folder / 'tiny-llama'}, dtype: float32}}
lora: {{r: 4, alpha: 8, dropout: 0.0}}
data: {{train: {folder / 'train.jsonl'}, eval: {folder / 'eval.jsonl'}, max_seq_len: 64}}
train: {{max_steps: 6, micro_batch_size: {micro_batch_size}, grad_accum: 2, lr: 1.0e-2, warmup_steps: 1,
         precision: "no", eval_every: 3, save_every: 2, keep_last: 3, seed: 0}}
output: {{dir: {folder / 'out'}}}
"""
    return write_recipe(folder / "recipe.yaml", text)


def metrics(out: Path, event: str, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


# N processes vs one (or FSDP vs DDP) sum the same fp32 numbers in another order: gradients all-reduced or
# reduce-scattered instead of summed in one backward, eval sums added across processes. The rule
# (tests/README.md): fp32 eps through the tiny model's reductions (its layers plus the ~16 x 40 tokens of a
# step). Adam's step is bounded by lr, so 6 steps move a weight by at most 6·lr and carry the gradients'
# rounding as a relative error of that move, far inside the rule's fp32 floor.
REDUCTION = reduction_through(tiny_model(), tokens=16 * 40)


def assert_same_run(ours: Path, reference: Path, msg: str) -> None:
    """Losses, eval losses and adapter tensors of two runs of one recipe, equal by the rule."""
    for event, key in (("train", "loss"), ("eval", "eval_loss")):
        assert_close_by_rule(metrics(ours, event, key), metrics(reference, event, key), reduction=REDUCTION,
                             dtype=torch.float32, msg=f"{msg}: {key}")
    theirs, mine = adapter(reference), adapter(ours)
    assert mine.keys() == theirs.keys()
    for key in theirs:
        assert_close_by_rule(mine[key], theirs[key], reduction=REDUCTION, dtype=torch.float32, msg=f"{msg}: {key}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One process with micro-batch 8, two processes with 4 each (launched by `lorafit train --nproc 2`), and
    the same two with FSDP."""
    one = tmp_path_factory.mktemp("one")
    result = run("train", str(write_run_recipe(one, micro_batch_size=8)))
    assert result.returncode == 0, result.stderr
    two = tmp_path_factory.mktemp("two")
    result = run("train", str(write_run_recipe(two, micro_batch_size=4)), "--nproc", "2")
    assert result.returncode == 0, result.stderr
    assert "2 processes (MULTI_CPU, DDP: a full copy each): micro-batch 4 per process x grad_accum 2 x 2 = " \
        "global batch 16" in \
        " ".join(result.stdout.split())
    assert result.stdout.count("run summary") == 1  # the main process alone reports
    result = run("train", str(two / "recipe.yaml"), "--nproc", "2", "--set", "train.fsdp=true", "--set",
                 f"output.dir={two / 'fsdp'}")
    assert result.returncode == 0, result.stderr
    assert "FSDP: weights sharded" in result.stdout
    return {"one": one / "out", "two": two / "out", "fsdp": two / "fsdp", "two_recipe": two / "recipe.yaml"}


def test_two_processes_train_what_one_process_trains_with_twice_the_micro_batch(runs):
    one, two = runs["one"], runs["two"]
    assert_same_run(two, one, "2 processes vs 1")
    assert any(float(t.abs().max()) > 1e-3 for k, t in adapter(two).items() if "lora_B" in k)  # it did train


def test_fsdp_trains_what_ddp_trains(runs):
    """Same batches: sharding the weights changes where they live, not the numbers beyond the order of the
    gradient reduction (reduce-scatter vs all-reduce), so the rule's fp32 tolerance."""
    fsdp, ddp = runs["fsdp"], runs["two"]
    ours, reference = adapter(fsdp), adapter(ddp)
    assert {k: t.shape for k, t in ours.items()} == {k: t.shape for k, t in reference.items()}  # whole tensors
    assert_same_run(fsdp, ddp, "FSDP vs DDP")


def test_only_the_main_process_writes(runs):
    two = runs["two"]
    assert sorted(p.name for p in two.iterdir()) == ["adapter", "checkpoints", "loss.png", "metrics.jsonl",
                                                     "recipe.yaml"]
    assert metrics(two, "train", "step") == [1, 2, 3, 4, 5, 6]  # one line per step, not one per process
    assert metrics(two, "eval", "step") == [0, 3, 6]
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


# torchrun runs this file: `lorafit train` with the main process SIGKILLed right after checkpoint 4 is saved.
KILL_AFTER_CHECKPOINT = """
import os, signal, sys
from lorafit import checkpoint, train
real_save = checkpoint.save_checkpoint
def save(out, step, *args, **kwargs):
    path = real_save(out, step, *args, **kwargs)
    if step == 4 and (len(args) < 7 or args[-1]):
        os.kill(os.getpid(), signal.SIGKILL)
    return path
train.save_checkpoint = save
sys.argv = ["lorafit", "train", *sys.argv[1:]]
from lorafit.cli import app
app()
"""


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_killed_two_process_run_resumes_to_the_uninterrupted_adapter(runs, tmp_path, strategy):
    recipe = runs["two_recipe"]
    killer = tmp_path / "killer.py"
    killer.write_text(KILL_AFTER_CHECKPOINT)
    args = [str(recipe), "--set", f"output.dir={tmp_path / 'out'}", "--set", f"train.fsdp={strategy == 'fsdp'}"]
    killed = subprocess.run([*TORCHRUN, str(killer), *args], capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0 and (tmp_path / "out" / "checkpoints" / "step-000004").is_dir()
    assert not (tmp_path / "out" / "adapter").exists()
    # one process cannot continue a two-process run exactly: refused, saying why
    alone = run("train", *args, "--resume")
    assert alone.returncode == 2 and "written by a run of 2 process(es) and this run has 1" in \
        " ".join(alone.stderr.split())
    if strategy == "fsdp":  # nor can DDP continue an FSDP run (its optimizer state is keyed by name)
        other = run("train", *args, "--set", "train.fsdp=false", "--resume", "--nproc", "2")
        assert other.returncode == 2 and "was written with train.fsdp: true" in " ".join(other.stderr.split())
    resumed = subprocess.run([*TORCHRUN, "-m", "lorafit", "train", *args, "--resume"], capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "at step 4" in " ".join(resumed.stdout.split())  # "resumed from .../step-000004 at step 4"
    uninterrupted_run = runs["two" if strategy == "ddp" else "fsdp"]
    assert metrics(tmp_path / "out", "train", "loss") == metrics(uninterrupted_run, "train", "loss")
    uninterrupted = adapter(uninterrupted_run)
    assert all(torch.equal(adapter(tmp_path / "out")[key], uninterrupted[key]) for key in uninterrupted)


# EVA's A comes from an SVD that the one-process run computes with 2 threads and each launched process with 1
# (torchrun sets OMP_NUM_THREADS=1): other summation orders. A singular vector moves by the input's rounding
# divided by the relative gap to the next singular value (Davis-Kahan), so EVA's A carries the rule's fp32
# error times 1/gap; the top components of these small random activations sit ~0.1 apart relative to the
# largest, hence 10x the rule for EVA (seen: 3e-5 against a 1e-4 allowance). The ranks (which tensors exist,
# their shapes) are exactly the same.
@pytest.mark.parametrize(("setting", "svd_gap"), [("lora.variant=adalora", 1.0),
                                                  ("lora.rank_allocation={rho: 2.0}", 0.1)])
def test_adalora_budgets_and_eva_ranks_are_the_same_with_two_processes(tmp_path, setting, svd_gap):
    """AdaLoRA's allocator reads the step's gradients (all-reduced: the same masks everywhere); EVA reads whole
    global micro-batches in every process (the same ranks everywhere, the same as one process)."""
    outs = {}
    for name, micro in (("one", 8), ("two", 4)):
        folder = tmp_path / name
        folder.mkdir()
        args = ["train", str(write_run_recipe(folder, micro)), "--set", setting]
        if name == "one":
            result = run(*args)
        else:  # accelerate's own command line, as users type it (`accelerate launch ...`)
            result = subprocess.run([*ACCELERATE_LAUNCH, "-m", "lorafit", *args], capture_output=True, text=True,
                                    timeout=300)
        assert result.returncode == 0, result.stderr
        outs[name] = folder / "out"
    assert_close_by_rule(metrics(outs["two"], "train", "loss"), metrics(outs["one"], "train", "loss"),
                         reduction=REDUCTION, dtype=torch.float32, msg="losses")
    ours, reference = adapter(outs["two"]), adapter(outs["one"])
    assert {k: t.shape for k, t in ours.items()} == {k: t.shape for k, t in reference.items()}  # same ranks
    for key in reference:
        rtol, atol = tolerance(reference[key], reduction=REDUCTION, dtype=torch.float32)
        torch.testing.assert_close(ours[key], reference[key], atol=atol / svd_gap, rtol=rtol, msg=key)


def test_plan_shows_the_batch_of_an_n_process_run(tmp_path):
    recipe = write_run_recipe(tmp_path, micro_batch_size=4)
    result = run("plan", str(recipe), "--nproc", "4", "--set", "train.fsdp=true")
    assert result.returncode == 0, result.stderr
    assert ("batch over 4 processes (FSDP: weights sharded over the processes): micro-batch 4 x grad_accum 2 per "
            "process x 4 = 32 rows per step") in " ".join(result.stdout.split())


def test_process_shares_of_a_global_micro_batch():
    rows = [{"input_ids": [i, i + 1], "labels": [i, i + 1]} for i in range(10)]
    one = Batches(rows, micro_batch_size=4, seed=3, pad_id=0)
    two = [Batches(rows, micro_batch_size=2, seed=3, pad_id=0, rank=rank, world=2) for rank in (0, 1)]
    assert one.per_epoch == two[0].per_epoch == 3
    for position in range(6):  # two epochs, each ending in a global micro-batch of 2 rows
        whole, _ = one.get(position)
        shares = [b.get(position) for b in two]
        if position % 3 == 2:  # 2 rows left: all to process 0, a fully masked stand-in row for process 1
            assert torch.equal(shares[0][0]["input_ids"], whole["input_ids"])
            assert shares[1][1] == 0 and bool((shares[1][0]["labels"] == IGNORE_INDEX).all())
        else:
            assert torch.equal(torch.cat([s[0]["input_ids"] for s in shares]), whole["input_ids"])
            assert sum(s[1] for s in shares) == 8
        assert torch.equal(two[1].get_global(position)["input_ids"], whole["input_ids"])


@pytest.mark.parametrize(("setting", "named"), [
    ("model.quantize=4bit", "a quantized base"), ("lora.variant=vera", "lora.variant: vera"),
    ("train.optimizer=adamw_8bit", "train.optimizer: adamw_8bit"), ("train.compile=true", "train.compile"),
])
def test_what_fsdp_cannot_shard_is_refused_before_anything_runs(tmp_path, setting, named):
    from lorafit.config import load_recipe

    recipe = write_recipe(tmp_path / "r.yaml", "data: {train: t.jsonl}\ntrain: {fsdp: true}\n")
    (tmp_path / "t.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(LorafitError, match=f"train.fsdp cannot shard a run with {named}"):
        load_recipe(recipe, [setting])


@pytest.mark.parametrize("variable", ["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"])
def test_several_processes_that_would_each_train_alone_are_refused(variable):
    with pytest.raises(LorafitError, match="2 processes were launched but accelerate sees no distributed setup"):
        refuse_lonely_processes("DistributedType.NO", {variable: "2"})
    refuse_lonely_processes("DistributedType.MULTI_CPU", {variable: "2"})
    refuse_lonely_processes("DistributedType.NO", {})


def test_a_failure_inside_the_processes_is_their_message_and_exit_2(tmp_path):
    recipe = write_run_recipe(tmp_path, micro_batch_size=4)
    (tmp_path / "train.jsonl").write_text('{"prompt": "a"}\n')  # found by each process, after launch
    result = run("train", str(recipe), "--nproc", "2")
    assert result.returncode == 2 and "train.jsonl:1: field 'completion' is missing" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
    torchrun = subprocess.run([*TORCHRUN, "-m", "lorafit", "train", str(recipe)], capture_output=True, text=True,
                              timeout=300)  # bare torchrun: its own failure report follows lorafit's message
    assert torchrun.returncode != 0 and "field 'completion' is missing" in torchrun.stderr


def test_two_processes_stream_what_one_process_streams_with_twice_the_micro_batch(runs, tmp_path):
    """data.streaming: every process reads the stream and takes its slice of each global micro-batch."""
    stream = ("--set", "data.streaming=true", "--set", "data.packing=true")
    result = run("train", str(runs["two_recipe"]), "--nproc", "2", *stream, "--set", f"output.dir={tmp_path / 'two'}")
    assert result.returncode == 0, result.stderr
    result = run("train", str(runs["two_recipe"]), *stream, "--set", "train.micro_batch_size=8",
                 "--set", f"output.dir={tmp_path / 'one'}")
    assert result.returncode == 0, result.stderr
    assert "train (streamed): " in result.stdout
    one, two = tmp_path / "one", tmp_path / "two"
    assert_same_run(two, one, "streamed, 2 processes vs 1")
