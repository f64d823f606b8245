"""Recipe loading: every mistake is a LorafitError that names the file, line or --set, and the key path."""

import time
from pathlib import Path

import pytest
import yaml

from lorafit.config import Recipe, RegexTarget, load_recipe
from lorafit.errors import LorafitError

from .conftest import REPO, write_recipe

MINIMAL = """\
data:
  train: {train}
lora:
  r: 8
"""


@pytest.fixture
def train_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n')
    return path


def recipe_error(path: Path, overrides=None) -> str:
    with pytest.raises(LorafitError) as err:
        load_recipe(path, overrides)
    return str(err.value)


def test_defaults_and_resolved_paths(tmp_path, train_file):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", MINIMAL.format(train=train_file)))
    assert recipe.lora.r == 8 and recipe.lora.alpha == 32 and recipe.lora.target_modules == "all-linear"
    assert recipe.train.epochs == 1.0 and recipe.train.max_steps is None
    assert recipe.data.train == str(train_file.resolve())
    # the resolved recipe round-trips (its content; which file it came from is not part of it)
    assert Recipe.model_validate(yaml.safe_load(recipe.to_yaml())).model_dump() == recipe.model_dump()
    assert recipe.source == tmp_path / "r.yaml"


def test_relative_data_path_falls_back_to_recipe_folder(tmp_path, train_file, monkeypatch):
    monkeypatch.chdir(REPO)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", MINIMAL.format(train="train.jsonl")))
    assert recipe.data.train == str(train_file.resolve())


def test_recipe_folder_comes_before_the_working_directory(tmp_path, train_file, monkeypatch):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    (elsewhere / "train.jsonl").write_text('{"prompt": "other", "completion": "file"}\n')
    monkeypatch.chdir(elsewhere)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", MINIMAL.format(train="train.jsonl")))
    assert recipe.data.train == str(train_file.resolve())  # the one next to the recipe
    quickstart = load_recipe(REPO / "configs" / "quickstart.yaml")  # from a folder outside the repository
    assert quickstart.data.train == str(REPO / "configs" / "data" / "dates_train.jsonl")


def test_unknown_key_suggests_nearest(tmp_path, train_file):
    path = write_recipe(tmp_path / "r.yaml", f"data:\n  train: {train_file}\nlora:\n  rank: 8\n  alpah: 3\n")
    message = recipe_error(path)
    assert f"{path}:4  lora.rank: unknown key — did you mean lora.r?" in message
    assert f"{path}:5  lora.alpah: unknown key — did you mean lora.alpha?" in message
    assert "2 problems" in message


def test_key_in_wrong_section_says_where_it_belongs(tmp_path, train_file):
    path = write_recipe(tmp_path / "r.yaml", f"data:\n  train: {train_file}\nlora:\n  micro_batch_size: 2\n")
    assert "lora.micro_batch_size: unknown key — micro_batch_size belongs in the train section" in recipe_error(path)


def test_wrong_type_and_bad_values_all_reported_together(tmp_path, train_file):
    text = (f"data:\n  train: {train_file}\n  format: markdown\nlora:\n  r: 0\n  alpha: -1\n  dropout: 1.0\n"
            "train:\n  lr: fast\n  scheduler: cosine_with_restarts\nmodel:\n  dtype: float8\n")
    path = write_recipe(tmp_path / "r.yaml", text)
    message = recipe_error(path)
    assert "7 problems" in message
    assert f"{path}:5  lora.r: input should be greater than or equal to 1 (got 0)" in message
    assert f"{path}:6  lora.alpha: input should be greater than 0 (got -1)" in message
    assert f"{path}:7  lora.dropout: input should be less than 1 (got 1.0)" in message
    assert f"{path}:9  train.lr: input should be a valid number" in message and "'fast'" in message
    assert "train.scheduler: input should be 'constant', 'linear' or 'cosine'" in message
    assert "model.dtype:" in message and "data.format:" in message


def test_missing_data_file(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", "data:\n  train: nowhere/train.jsonl\n")
    message = recipe_error(path)
    assert "data.train: file 'nowhere/train.jsonl' does not exist" in message


def test_missing_required_section(tmp_path):
    message = recipe_error(write_recipe(tmp_path / "r.yaml", "lora:\n  r: 4\n"))
    assert "data: required key is missing" in message


def test_missing_gguf_and_package(tmp_path, train_file):
    path = write_recipe(tmp_path / "r.yaml", f"data:\n  train: {train_file}\nmodel:\n  base: ./nope.gguf\n")
    assert "model.base: './nope.gguf' does not exist" in recipe_error(path)
    path = write_recipe(tmp_path / "r.yaml", f"data:\n  train: {train_file}\nmodel:\n  base: pkg:no_such_pkg/m.gguf\n")
    assert "package 'no_such_pkg' is not installed" in recipe_error(path)


def test_target_modules_shapes(tmp_path, train_file):
    base = f"data:\n  train: {train_file}\nlora:\n  target_modules: "
    listed = load_recipe(write_recipe(tmp_path / "a.yaml", base + "[q_proj, v_proj]")).lora.target_modules
    assert listed == ["q_proj", "v_proj"]
    regex = load_recipe(write_recipe(tmp_path / "b.yaml", base + "{regex: '.*q_proj'}")).lora.target_modules
    assert regex == RegexTarget(regex=".*q_proj")
    assert "lora.target_modules: must be 'all-linear'" in recipe_error(write_recipe(tmp_path / "c.yaml", base + "7"))
    assert "lora.target_modules: must be 'all-linear'" in recipe_error(write_recipe(tmp_path / "d.yaml", base + "[]"))
    assert "not a valid regular expression" in recipe_error(write_recipe(tmp_path / "e.yaml", base + "{regex: '(q'}"))


def test_conflicting_settings(tmp_path, train_file):
    path = write_recipe(tmp_path / "r.yaml", f"data:\n  train: {train_file}\n  eval: {train_file}\n"
                        "  val_fraction: 0.1\ntrain:\n  max_steps: 5\n  epochs: 2\n")
    message = recipe_error(path)
    assert "data.eval or data.val_fraction, not both" in message
    assert "train.max_steps or train.epochs, not both" in message


def test_overrides_are_yaml_scalars_and_name_the_set(tmp_path, train_file):
    path = write_recipe(tmp_path / "r.yaml", MINIMAL.format(train=train_file))
    recipe = load_recipe(path, ["lora.r=4", "train.lr=1.0e-4", "lora.target_modules=[q_proj]", "output.overwrite=true"])
    got = (recipe.lora.r, recipe.train.lr, recipe.lora.target_modules, recipe.output.overwrite)
    assert got == (4, 1e-4, ["q_proj"], True)
    assert load_recipe(path, ["train.lr=1e-4"]).train.lr == 1e-4  # YAML 1.1 reads 1e-4 as text; still a number
    message = recipe_error(path, ["lora.r=-2"])
    assert "--set lora.r=-2  lora.r: input should be greater than or equal to 1 (got -2)" in message
    assert "did you mean lora.r?" in recipe_error(path, ["lora.rank=4"])
    assert "expected KEY.PATH=VALUE" in recipe_error(path, ["lora.r"])
    assert "lora.r is a value, not a section" in recipe_error(path, ["lora.r.x=1"])


def test_yaml_syntax_error_names_line(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", "data:\n  train: a.jsonl\nlora: [r: 4\n")
    message = recipe_error(path)
    assert str(path) in message and "not valid YAML" in message


def test_not_a_mapping_and_missing_file(tmp_path):
    assert "must be a mapping" in recipe_error(write_recipe(tmp_path / "r.yaml", "- a\n- b\n"))
    assert "does not exist" in recipe_error(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path, monkeypatch):
    monkeypatch.chdir(REPO)
    recipe = load_recipe(path)
    assert Path(recipe.data.train).is_file()


def test_rank_and_alpha_patterns_are_checked_with_line_and_key(tmp_path, train_file):
    text = (f"data:\n  train: {train_file}\nlora:\n  use_rslora: true\n  rank_pattern:\n    q_proj: 0\n"
            "    'v_(proj': 4\n  alpha_pattern:\n    k_proj: -2\n")
    path = write_recipe(tmp_path / "r.yaml", text)
    message = recipe_error(path)
    assert f"{path}:6  lora.rank_pattern.q_proj: input should be greater than or equal to 1 (got 0)" in message
    assert f"{path}:7  lora.rank_pattern.v_(proj: key 'v_(proj' is not a valid regular expression" in message
    assert f"{path}:9  lora.alpha_pattern.k_proj: input should be greater than 0 (got -2)" in message
    good = write_recipe(tmp_path / "g.yaml", f"data:\n  train: {train_file}\n")
    recipe = load_recipe(good, ["lora.use_rslora=true", "lora.rank_pattern={q_proj: 8, 'layers\\.0\\..*': 2}"])
    assert recipe.lora.use_rslora and recipe.lora.rank_pattern == {"q_proj": 8, r"layers\.0\..*": 2}


def test_duplicate_keys_are_refused_with_both_lines(tmp_path, train_file):
    path = write_recipe(tmp_path / "r.yaml", f"data:\n  train: {train_file}\nlora:\n  r: 8\n  alpha: 16\n  r: 4\n")
    message = recipe_error(path)
    assert f"{path}:6: key 'lora.r' appears twice (first on line 4)" in message
    path = write_recipe(tmp_path / "s.yaml", f"data:\n  train: {train_file}\ndata:\n  train: {train_file}\n")
    assert "key 'data' appears twice (first on line 1)" in recipe_error(path)


def test_meaningless_combinations_name_the_key(tmp_path, train_file):
    path = write_recipe(tmp_path / "r.yaml", MINIMAL.format(train=train_file))
    assert "model.quant_type applies to quantize: 4bit only (quantize is '8bit')" in recipe_error(
        path, ["model.quantize=8bit", "model.quant_type=fp4"])
    assert "model.double_quant applies to quantize: 4bit only" in recipe_error(path, ["model.double_quant=false"])
    assert "train.compile does not support a quantized base" in recipe_error(
        path, ["model.quantize=4bit", "train.compile=true"])
    load_recipe(path, ["model.quantize=4bit", "model.quant_type=fp4", "model.double_quant=false"])  # all fine


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """A "billion laughs" document: each anchor lists ``width`` aliases of the one before (width ** levels values)."""
    names = [f"l{i}" for i in range(levels)]
    lines = [f"{names[0]}: &{names[0]} [" + ", ".join(['"lol"'] * width) + "]"]
    lines += [f"{name}: &{name} [" + ", ".join([f"*{prev}"] * width) + "]" for prev, name in zip(names, names[1:])]
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_at_once_with_its_line_and_a_short_message(tmp_path, train_file):
    # 9 ** 9 = 387 million values once expanded, from 600 bytes; the last alias sits in lora.target_modules.
    text = alias_bomb() + f"data:\n  train: {train_file}\nlora:\n  target_modules: *l8\n"
    path = write_recipe(tmp_path / "r.yaml", text)
    started = time.perf_counter()
    message = recipe_error(path)
    assert time.perf_counter() - started < 2.0
    # l0 holds 10 values and l1 91; l2 (820) and l3 (7,381) fit in 10,000 with them; l4's first aliases do not
    assert message.startswith(f"{path}:5: YAML aliases expand this document past 10,000 values by here (alias *l3)")
    assert "\n" not in message and len(message) < 300
    # the same in a --set value
    good = write_recipe(tmp_path / "g.yaml", MINIMAL.format(train=train_file))
    started = time.perf_counter()
    levels = ["&a [" + ", ".join(["x"] * 10) + "]"] + [f"&{name} [" + ", ".join([f"*{prev}"] * 10) + "]"
                                                       for prev, name in zip("abcdefg", "bcdefgh")]
    message = recipe_error(good, [f"lora.target_modules=[{', '.join(levels)}]"])  # 10 ** 8 values
    assert time.perf_counter() - started < 2.0
    assert message.startswith("--set 'lora.target_modules=[&a [x,") and "past 10,000 values" in message
    assert "\n" not in message and len(message) < 300


def test_aliases_of_a_sane_size_still_load_and_a_self_containing_one_is_refused(tmp_path, train_file):
    text = (f"data:\n  train: {train_file}\nlora:\n  target_modules: &targets [q_proj, v_proj]\n"
            "  rank_pattern: {<<: {q_proj: 2}, v_proj: 3}\nextra: &more\n  targets: *targets\n")
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", text.replace("extra: &more\n  targets: *targets\n", "")))
    assert recipe.lora.target_modules == ["q_proj", "v_proj"] and recipe.lora.rank_pattern == {"q_proj": 2, "v_proj": 3}
    path = write_recipe(tmp_path / "loop.yaml", f"data: &d\n  train: {train_file}\n  eval: [*d]\n")
    assert recipe_error(path) == f"{path}:3: alias *d is inside the value it names, which would make that value " \
                                 "contain itself forever; write the value out"


def test_values_echoed_in_recipe_errors_are_one_short_line(tmp_path, train_file):
    text = (f"data:\n  train: {train_file}\nlora:\n  r: '{'x' * 5000}'\n  layers: [{', '.join(['-1'] * 1000)}]\n"
            f"  target_modules:\n    regex: '{'(' * 3000}'\n")
    message = recipe_error(write_recipe(tmp_path / "r.yaml", text))
    lines = message.splitlines()
    assert len(lines) == 1 + 5 and all(len(line) < 300 for line in lines), message
    assert "lora.r: input should be a valid integer" in message and "(got 'xxxxxxxx" in message
    assert "lora.layers: must be a non-empty list of layer indices >= 0" in message
    message = recipe_error(write_recipe(tmp_path / "g.yaml", MINIMAL.format(train=train_file)),
                           ["lora.r=" + "9" * 4000 + "x"])
    assert message.count("\n") == 1 and len(message) < 400 and "--set lora.r=9999" in message
