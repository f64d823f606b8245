"""The real `lorafit` executable, as a user runs it: output, exit codes, no tracebacks."""

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import write_recipe

LORAFIT = [sys.executable, "-m", "lorafit"]


def run(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*LORAFIT, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def tiny_recipe(tmp_path: Path, model_dir: Path, extra: str = "") -> Path:
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "a", "completion": "b"}\n')
    text = f"model:\n  base: {model_dir}\n  dtype: float32\ndata:\n  train: {train}\n{extra}"
    return write_recipe(tmp_path / "recipe.yaml", text)


def test_help_lists_the_commands():
    result = run("--help")
    assert result.returncode == 0
    for command in ("plan", "train", "merge", "eval", "generate"):
        assert f" {command} " in result.stdout


def test_plan_prints_targets_and_counts_and_writes_nothing(tmp_path, tiny_model_dir):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, "lora:\n  r: 4\n  target_modules: [q_proj, v_proj]\n")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = run("plan", str(recipe), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "q_proj" in result.stdout and "v_proj" in result.stdout
    assert "896 of" in result.stdout  # 2 layers x (4*(32+32) + 4*(32+16))
    assert "precision: " in result.stdout and "LoRA weights fp32" in result.stdout  # the choice, and why
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_plan_override(tmp_path, tiny_model_dir):
    result = run("plan", str(tiny_recipe(tmp_path, tiny_model_dir)), "--set", "lora.r=2", "--set", "lora.layers=[0]")
    assert result.returncode == 0, result.stderr
    # all-linear, layer 0 only, r=2: 2*(32+32)*2 (q,o) + 2*(32+16)*2 (k,v) + 2*(32+64)*3 (gate, up, down)
    assert f"{2 * 64 * 2 + 2 * 48 * 2 + 2 * 96 * 3:,} of" in result.stdout


def test_bad_recipe_exits_2_without_traceback(tmp_path, tiny_model_dir):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, "lora:\n  rank: 4\n")
    result = run("plan", str(recipe))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert "lora.rank: unknown key — did you mean lora.r?" in result.stderr


def test_targets_that_match_nothing_exit_2_with_names(tmp_path, tiny_model_dir):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, "lora:\n  target_modules: [query, value]\n")
    result = run("plan", str(recipe))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "matches no linear layer" in result.stderr and "['query', 'value']" in result.stderr
    assert "q_proj" in result.stderr


def test_missing_recipe_and_unloadable_base(tmp_path):
    result = run("plan", str(tmp_path / "none.yaml"))
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr
    empty = tmp_path / "empty-model"
    empty.mkdir()
    result = run("plan", str(tiny_recipe(tmp_path, empty)))
    assert result.returncode == 2 and "no config.json" in result.stderr and "Traceback" not in result.stderr


def test_train_bad_data_exits_2_and_writes_nothing(tmp_path, tiny_model_dir):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, f"output:\n  dir: {tmp_path / 'out'}\n")
    (tmp_path / "train.jsonl").write_text('{"prompt": "a"}\n')
    result = run("train", str(recipe))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train.jsonl:1: field 'completion' is missing" in result.stderr
    assert not (tmp_path / "out").exists()


def test_train_runs_from_the_command_line(tmp_path, tiny_model_dir):
    extra = f"train:\n  max_steps: 2\n  precision: 'no'\noutput:\n  dir: {tmp_path / 'out'}\n"
    recipe = tiny_recipe(tmp_path, tiny_model_dir, extra)
    result = run("train", str(recipe))
    assert result.returncode == 0, result.stderr
    assert "run summary" in result.stdout and (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    again = run("train", str(recipe))
    assert again.returncode == 2 and "already holds a run" in again.stderr


def test_version():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.startswith("lorafit ")


def test_plain_runs_never_import_bitsandbytes_or_peft(tmp_path, tiny_model_dir):
    """bitsandbytes only loads for a 4/8-bit base or a bnb optimizer: importing it costs start-up time
    and, on CPUs with avx512_bf16, prints a kernel warning. PEFT is a test dependency, never imported."""
    extra = (f"train:\n  max_steps: 2\n  eval_every: 2\n  precision: 'no'\noutput:\n  dir: {tmp_path / 'out'}\n"
             f"data:\n  train: {tmp_path / 'train.jsonl'}\n  eval: {tmp_path / 'train.jsonl'}\n")
    recipe = tiny_recipe(tmp_path, tiny_model_dir).read_text().split("data:")[0] + extra
    write_recipe(tmp_path / "recipe.yaml", recipe)
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    # With standalone_mode=False the app returns a command's exit code (2 for a LorafitError) instead of
    # exiting, so each command's code and a piece of its output are checked, not just that nothing raised.
    script = f"""
import contextlib
import io
import sys

from lorafit.cli import app
for args, expected in ((["train", "recipe.yaml"], "run summary"),
                       (["eval", "recipe.yaml", "--max-new-tokens", "2"], "perplexity"),
                       (["merge", {str(tiny_model_dir)!r}, "out/adapter", "merged", "--dtype", "float32"],
                        "modules into merged"),
                       (["plan", "recipe.yaml"], "precision: "),
                       (["generate", "--base", {str(tiny_model_dir)!r}, "--max-new-tokens", "2", "hi"], "\\n")):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = app(args, standalone_mode=False)
    print("RAN", args[0], code, expected in out.getvalue(), repr(out.getvalue()[-300:]))
print("IMPORTED", sorted(m for m in ("bitsandbytes", "peft") if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    ran = [line.split(" ", 4)[1:4] for line in result.stdout.splitlines() if line.startswith("RAN ")]
    assert ran == [[command, "None", "True"] for command in ("train", "eval", "merge", "plan", "generate")], (
        result.stdout + result.stderr)
    assert "IMPORTED []" in result.stdout
    assert "kernels-community" not in result.stderr


def test_help_does_not_import_torch():
    """`lorafit --help` and argument errors stay fast: torch loads only when a command needs it."""
    script = "import sys, lorafit.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_plan_prints_the_ranks_a_rank_allocation_would_use(tmp_path, tiny_model_dir):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, "lora:\n  r: 2\n  rank_allocation: {method: eva, rho: 2.0}\n")
    rows = "".join(f'{{"prompt": "add {i} and {i}", "completion": "the sum is {2 * i}, twice {i}"}}\n'
                   for i in range(40))
    (tmp_path / "train.jsonl").write_text(rows)
    result = run("plan", str(recipe), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "rank allocation (eva, rho=2)" in result.stdout and "of budget 28 over 14 modules" in result.stdout
    assert not (tmp_path / "runs").exists()

    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')  # 1 trained token a batch
    result = run("plan", str(recipe), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "raise train.micro_batch_size" in result.stderr + result.stdout


@pytest.mark.parametrize(("variant", "line", "trainable"), [
    # r + out per layer: q,o 32; k,v 16; gate,up 64; down 32 (x2 layers, r=4 x 14 modules)
    ("vera", "VeRA (trainable scaling vectors over shared random projections) r=4", f"{2 * (256 + 4 * 7)} of"),
    # init_r = 6 (1.5 x 4): 6 x (in + out + 1) per module
    ("adalora", "AdaLoRA (SVD-shaped triplets pruned to a budget while training): r=6 per layer at start",
     f"{2 * 6 * ((64 + 1) * 2 + (48 + 1) * 2 + (96 + 1) * 3):,} of"),
])
def test_plan_shows_each_variant_and_its_trainable_count(tmp_path, tiny_model_dir, variant, line, trainable):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, f"lora:\n  r: 4\n  variant: {variant}\n")
    result = run("plan", str(recipe), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert line in " ".join(result.stdout.split()) and trainable in result.stdout


@pytest.mark.parametrize("args", [["eval", "--limit", "-3"], ["eval", "--max-new-tokens", "0"],
                                  ["generate", "--max-new-tokens", "-5", "hi"]])
def test_out_of_range_options_exit_2_naming_the_option(args):
    result = run(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    text = " ".join(result.stderr.replace("│", " ").split())  # rich draws the message in a wrapped box
    assert f"Invalid value for '{args[1]}'" in text and "greater than or equal to 1" in text


def test_json_output_that_cannot_be_a_file_is_refused_before_evaluating(tmp_path):
    result = run("eval", "--json", str(tmp_path))
    assert result.returncode == 2 and "is a folder; give a file path" in result.stderr
    (tmp_path / "taken").write_text("mine")
    result = run("eval", "--json", str(tmp_path / "taken" / "results.json"))
    assert result.returncode == 2 and "is a file, so no folder can hold this path" in result.stderr
    assert (tmp_path / "taken").read_text() == "mine"
