"""Hostile input and faults: one clear message (exit 2, no traceback), and nothing of the user's destroyed.

One test (or a parametrized few) per class of the hostile-input audit: locks and concurrent runs, inputs that a
command would write over, kills at the worst instant (fault injection in a child process), disk full and
read-only folders (real small tmpfs mounts where this machine allows mounting), and tracebacks that became
messages. Earlier classes (recipe keys, damaged checkpoints, --json paths) are tested next to their code.
"""

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafit.adapter_io import save_adapter
from lorafit.config import LoRAConfig
from lorafit.errors import LorafitError
from lorafit.files import FolderLock, atomic_dir
from lorafit.inject import inject_lora, lora_modules
from lorafit.merge import merge_adapter
from lorafit.train import train as run_training

from .conftest import losses, recipe_at, tiny_model, write_recipe
from .test_cli import run

# A child process that runs `lorafit ARGS` with one function patched to SIGKILL the process at a chosen instant.
KILLER = """
import os, signal, sys
{patch}
sys.argv = ["lorafit", *{args!r}]
from lorafit.cli import app
app()
"""
# Kill right after os.replace(src, dst) when dst ends with WHEN: the instants of a rename-aside replace.
KILL_AFTER_REPLACE = """
real_replace = os.replace
def replace(src, dst):
    real_replace(src, dst)
    if str(dst).endswith({when!r}):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
"""
# Kill in the middle of writing checkpoint STEP's training_state.pt: half the bytes are on disk.
KILL_MID_STATE = """
import lorafit.checkpoint as checkpoint
real_write = checkpoint.write_bytes
def write(path, data):
    if path.name == "training_state.pt" and ".step-{step:06d}.tmp-" in str(path):
        open(path, "wb").write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    real_write(path, data)
checkpoint.write_bytes = write
"""


def run_killed(patch: str, *args: str) -> subprocess.CompletedProcess:
    code = KILLER.format(patch=patch, args=list(args))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def clean_failure(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, and every needle in the message (rich may wrap it: whitespace is joined)."""
    text = " ".join(result.stderr.split())
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in text, text
    return text


# ---- one run per output.dir: the lock ----------------------------------------------------------------------

LOCK_HOLDER = """
import sys, time
from pathlib import Path
from lorafit.files import FolderLock
FolderLock(Path(sys.argv[1])).__enter__()
print("locked", flush=True)
time.sleep(120)
"""


@contextlib.contextmanager
def lock_held_by_child(out: Path):
    """Another process (a stand-in for a running `lorafit train`) holds OUT's lock inside the block."""
    child = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        yield child
    finally:
        child.kill()
        child.wait()


def test_a_second_run_into_a_running_output_dir_is_refused_naming_the_holder(run_dir):
    out = run_dir / "out"
    recipe_at(run_dir)  # writes run_dir/recipe.yaml with output.dir = out
    with lock_held_by_child(out) as holder:
        result = run("train", str(run_dir / "recipe.yaml"))
        clean_failure(result, f"output.dir {out} is in use by another lorafit command (pid {holder.pid}",
                      "choose another output.dir")
        assert sorted(p.name for p in out.iterdir()) == [".lorafit.lock"]  # nothing of the refused run
        # in-process too (a second descriptor on the same file conflicts like a second process)
        with pytest.raises(LorafitError, match="is in use by another lorafit command"):
            run_training(recipe_at(run_dir))


def test_a_lock_left_by_a_killed_run_is_stale_and_taken_over(run_dir):
    out = run_dir / "out"
    with lock_held_by_child(out):
        pass  # the holder is SIGKILLed here: its lock file stays, its flock is gone
    assert (out / FolderLock.NAME).is_file()
    run_training(recipe_at(run_dir))
    assert (out / "adapter" / "adapter_config.json").is_file() and not (out / FolderLock.NAME).exists()


# ---- nothing the user gave is written over --------------------------------------------------------------------

def test_output_dir_dot_never_writes_over_the_recipe(tmp_path, tiny_model_dir):
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    text = f"model: {{base: {tiny_model_dir}, dtype: float32}}\ndata: {{train: train.jsonl}}\noutput: {{dir: .}}\n"
    recipe = write_recipe(tmp_path / "recipe.yaml", text)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run("train", "recipe.yaml", "--set", "output.overwrite=true", cwd=tmp_path)
    clean_failure(result, "the run writes recipe.yaml, which is the recipe you passed", "choose another output.dir")
    assert recipe.read_text() == text and sorted(p.name for p in tmp_path.iterdir()) == before


def test_eval_json_never_replaces_the_data_or_an_adapter(tmp_path, tiny_model_dir, adapter):
    adapter_dir, _ = adapter
    data = tmp_path / "eval.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    args = ["eval", "--base", str(tiny_model_dir), "--adapter", str(adapter_dir), "--data", str(data)]
    clean_failure(run(*args, "--json", str(data)), f"--json {data} is --data", "never writes over its inputs")
    clean_failure(run(*args, "--json", str(adapter_dir / "r.json")), "lies inside --adapter")
    assert data.read_text() == '{"prompt": "a", "completion": "b"}\n' and not (adapter_dir / "r.json").exists()


def test_data_file_among_the_run_files_is_refused(run_dir):
    out = run_dir / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text((run_dir / "train.jsonl").read_text())
    with pytest.raises(LorafitError, match=r"metrics.jsonl, which is data.train"):
        run_training(recipe_at(run_dir, f"data.train={out / 'metrics.jsonl'}", "output.overwrite=true"))
    assert (out / "metrics.jsonl").read_text() == (run_dir / "train.jsonl").read_text()


@pytest.mark.parametrize(("out", "relation"), [
    ("adapter", "is ADAPTER"), ("adapter/merged", "lies inside ADAPTER"), (".", "contains ADAPTER"),
    ("tiny-llama", "is BASE"), ("tiny-llama/merged", "lies inside BASE"),
])
def test_merge_never_replaces_its_inputs_even_with_overwrite(tmp_path, tiny_model_dir, adapter, out, relation):
    adapter_dir, _ = adapter
    before = {folder: folder_bytes(folder) for folder in (adapter_dir, tiny_model_dir)}
    with pytest.raises(LorafitError, match=f"OUT .* {relation} .*never writes over its inputs \\(not even with"):
        merge_adapter(str(tiny_model_dir), adapter_dir, tmp_path / out, dtype="float32", overwrite=True)
    assert {folder: folder_bytes(folder) for folder in before} == before


# ---- kills at the worst instant ---------------------------------------------------------------------------

@pytest.mark.parametrize("instant", ["old moved aside", "new moved in"])
def test_merge_overwrite_killed_mid_replace_keeps_a_complete_model(tmp_path, tiny_model_dir, adapter, instant):
    adapter_dir, _ = adapter
    out = tmp_path / "merged"
    merge_adapter(str(tiny_model_dir), adapter_dir, out, dtype="float32")
    old = folder_bytes(out)
    when = ".merged.previous" if instant == "old moved aside" else "/merged"
    result = run_killed(KILL_AFTER_REPLACE.format(when=when), "merge", str(tiny_model_dir), str(adapter_dir),
                        str(out), "--dtype", "bfloat16", "--overwrite")
    assert result.returncode == -signal.SIGKILL, result.stderr
    complete = out if instant == "new moved in" else tmp_path / ".merged.previous"
    assert sorted(p.name for p in complete.iterdir()) == sorted(old)  # every file of a model is there
    # The next merge into OUT puts things right before it looks at OUT: the old model back, or the new one kept.
    again = run("merge", str(tiny_model_dir), str(adapter_dir), str(out))
    clean_failure(again, "exists and is not empty; pass --overwrite")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")) == []
    weights = load_file(out / "model.safetensors")
    if instant == "old moved aside":
        assert folder_bytes(out) == old
    else:
        assert all(t.dtype == torch.bfloat16 for t in weights.values())


def test_checkpoint_save_killed_mid_write_resumes_from_the_previous_one(run_dir):
    run_training(recipe_at(run_dir, out="straight"))
    recipe_at(run_dir, out="killed")  # run_dir/recipe.yaml now names output.dir killed
    recipe = str(run_dir / "recipe.yaml")
    result = run_killed(KILL_MID_STATE.format(step=4), "train", recipe)
    assert result.returncode == -signal.SIGKILL, result.stderr
    checkpoints = run_dir / "killed" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir() if not p.name.startswith(".")] == ["step-000002"]
    assert any(p.name.startswith(".step-000004.tmp-") for p in checkpoints.iterdir())  # the half-written one
    resumed = run("train", recipe, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "step-000002" in resumed.stdout
    assert not any(p.name.startswith(".") for p in checkpoints.iterdir())  # the temp was cleaned under the lock
    # Same machine, same thread count: the resumed run is the uninterrupted one, bit for bit.
    assert losses(run_dir / "killed") == losses(run_dir / "straight")
    final, straight = (load_file(run_dir / name / "adapter" / "adapter_model.safetensors")
                       for name in ("killed", "straight"))
    assert all(torch.equal(final[key], straight[key]) for key in straight)


def test_replace_interrupted_between_the_renames_is_undone_on_the_next_write(tmp_path):
    final = tmp_path / "adapter"
    final.mkdir()
    (final / "a.txt").write_text("old")
    os.replace(final, tmp_path / ".adapter.previous")  # what a kill after the first rename leaves
    with atomic_dir(final) as tmp:
        assert (final / "a.txt").read_text() == "old"  # restored before the new one is written
        (tmp / "a.txt").write_text("new")
    assert (final / "a.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# ---- the machine refuses a write: disk full, read-only ---------------------------------------------------------

@contextlib.contextmanager
def small_mount(path: Path, options: str):
    """A real tmpfs at ``path`` (root only); skips the test, saying why, where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); the monkeypatched test covers it")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_during_a_checkpoint_is_one_message_and_no_partial_checkpoint(run_dir):
    out = run_dir / "full" / "run"
    with small_mount(run_dir / "full", "size=40k"):
        recipe_at(run_dir, out="full/run")
        result = run("train", str(run_dir / "recipe.yaml"), "--set", "train.save_every=1")
        clean_failure(result, "could not write checkpoint", "step-000001", "No space left on device",
                      "Fix: free disk space there")
        assert list((out / "checkpoints").iterdir()) == []  # no half-written checkpoint, no temp
        assert not (out / FolderLock.NAME).exists()


def test_read_only_folders_are_one_message(run_dir, tiny_model_dir, adapter):
    adapter_dir, _ = adapter
    with small_mount(run_dir / "ro", "ro,size=40k"):
        recipe_at(run_dir, out="ro/run")
        result = run("train", str(run_dir / "recipe.yaml"))
        clean_failure(result, "could not write the run folder", "read-only", "Fix: choose a folder you can write to")
        result = run("merge", str(tiny_model_dir), str(adapter_dir), str(run_dir / "ro" / "merged"))
        clean_failure(result, "could not write", "read-only")


def test_a_failed_write_keeps_the_previous_adapter(tmp_path, monkeypatch):
    """The same path without a real full disk (for machines that cannot mount): ENOSPC from the writer."""
    from lorafit import adapter_io

    model = tiny_model()
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    save_adapter(model, tmp_path / "adapter")
    before = folder_bytes(tmp_path / "adapter")

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(adapter_io, "save_file", full_disk)
    with pytest.raises(LorafitError, match=r"could not write the adapter .*previous .* is intact.*free disk space"):
        save_adapter(model, tmp_path / "adapter")
    assert folder_bytes(tmp_path / "adapter") == before and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# ---- tracebacks that are now one message ------------------------------------------------------------------------

def test_eval_of_an_empty_data_file(tmp_path, tiny_model_dir):
    (tmp_path / "empty.jsonl").write_text("\n")
    result = run("eval", "--base", str(tiny_model_dir), "--data", str(tmp_path / "empty.jsonl"))
    clean_failure(result, "empty.jsonl: no rows to evaluate")


def test_merge_that_would_be_non_finite_is_refused_and_writes_nothing(tmp_path, tiny_model_dir):
    model = tiny_model()
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    with torch.no_grad():
        lora_modules(model)["model.layers.1.mlp.down_proj"].lora_B.weight[0, 0] = float("inf")
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(LorafitError, match="layers.1.mlp.down_proj gives non-finite weights.*nothing was written"):
        merge_adapter(str(tiny_model_dir), tmp_path / "adapter", tmp_path / "merged", verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "tiny-llama"]


def test_merge_refuses_a_base_that_runs_its_own_code_unless_trusted(tmp_path, tiny_model_dir, adapter):
    adapter_dir, _ = adapter
    config_path = tiny_model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config.update(model_type="tinycustom", auto_map={"AutoConfig": "configuration_tiny.TinyConfig",
                                                      "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"})
    config_path.write_text(json.dumps(config))
    (tiny_model_dir / "configuration_tiny.py").write_text(textwrap.dedent("""\
        from transformers import LlamaConfig
        class TinyConfig(LlamaConfig):
            model_type = "tinycustom"
        """))
    (tiny_model_dir / "modeling_tiny.py").write_text(textwrap.dedent("""\
        from transformers import LlamaForCausalLM
        from .configuration_tiny import TinyConfig
        class TinyForCausalLM(LlamaForCausalLM):
            config_class = TinyConfig
        """))
    result = run("merge", str(tiny_model_dir), str(adapter_dir), str(tmp_path / "merged"))
    clean_failure(result, "asks to run code shipped with the model", "--trust-remote-code")
    assert not (tmp_path / "merged").exists()
    trusted = run("merge", str(tiny_model_dir), str(adapter_dir), str(tmp_path / "merged"), "--dtype", "float32",
                  "--trust-remote-code")
    assert trusted.returncode == 0, trusted.stderr
    diff = re.search(r"max \|logit difference\| vs base \+ adapter in fp32 = (\S+)", trusted.stdout)
    assert diff and float(diff.group(1)) < 1e-5  # fp32 merge: rounding only


def test_a_folder_as_recipe_and_a_json_list_as_adapter_config(tmp_path, tiny_model_dir, adapter):
    adapter_dir, _ = adapter
    clean_failure(run("train", str(tmp_path)), f"recipe file {tmp_path} is a folder")
    (adapter_dir / "adapter_config.json").write_text("[1, 2]")
    clean_failure(run("merge", str(tiny_model_dir), str(adapter_dir), str(tmp_path / "m")),
                  "adapter_config.json: expected a JSON object of PEFT config fields, found a JSON list")


def test_lorafit_debug_adds_the_traceback(tmp_path):
    quiet = run("plan", str(tmp_path / "none.yaml"))
    clean_failure(quiet, "does not exist")
    env = {**os.environ, "LORAFIT_DEBUG": "1"}
    loud = subprocess.run([sys.executable, "-m", "lorafit", "plan", str(tmp_path / "none.yaml")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert loud.returncode == 2 and "Traceback" in loud.stderr and "does not exist" in loud.stderr


@pytest.mark.parametrize("args", [["generate", "--dtype", "fp32", "hi"], ["merge", "a", "b", "c", "--dtype", "f32"],
                                  ["eval", "--format", "sharegpt"]])
def test_cli_choices_are_checked_like_the_recipe(args):
    result = run(*args)
    text = " ".join(result.stderr.replace("│", " ").split())
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "Invalid value for '--" in text and "is not one of" in text


def test_a_byte_order_mark_is_not_part_of_the_first_field(tmp_path):
    from lorafit.data import load_rows

    bom = "\ufeff"
    (tmp_path / "rows.csv").write_text(f"{bom}prompt,completion\nhi,there\n", encoding="utf-8")
    (tmp_path / "rows.jsonl").write_text(f'{bom}{{"prompt": "hi", "completion": "there"}}\n', encoding="utf-8")
    for name in ("rows.csv", "rows.jsonl"):
        assert load_rows(str(tmp_path / name)) == [{"prompt": "hi", "completion": "there"}]

