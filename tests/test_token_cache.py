"""Tokenized data cached on disk (lorafit/token_cache.py): the same batches as tokenizing in memory, built once,
rebuilt when anything that changes the tokens changes, the same from worker processes as from one."""

import json
import shutil

import pytest

from lorafit import token_cache
from lorafit.config import DataConfig
from lorafit.data import Batches, bos_for, example_segments, load_rows, row_location, tokenize_segments
from lorafit.errors import LorafitError
from lorafit.examples import IGNORE_INDEX, Examples, PackedRows
from lorafit.model import cache_dir
from lorafit.token_cache import load_tokenized

from .conftest import REPO, tiny_tokenizer

QUICKSTART = REPO / "configs" / "data" / "dates_train.jsonl"


def reference_examples(source, data, tokenizer):
    """Row by row, one tokenizer call per segment: how lorafit tokenized before the cache existed."""
    examples = []
    for index, row in enumerate(load_rows(source)):
        segments = example_segments(row, data.format, tokenizer, row_location(source, index))
        example = tokenize_segments(segments, tokenizer, data.train_on_inputs, bos_for(data, tokenizer))
        example = {key: value[: data.max_seq_len] for key, value in example.items()}
        if any(label != IGNORE_INDEX for label in example["labels"][1:]):
            examples.append(example)
    return examples


def reference_pack(examples, max_seq_len):
    """The list-based greedy packing lorafit used before PackedRows."""
    rows, current = [], {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        length = len(example["input_ids"])
        if current["input_ids"] and len(current["input_ids"]) + length > max_seq_len:
            rows.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += example["input_ids"]
        current["labels"] += [IGNORE_INDEX] + example["labels"][1:]
        current["position_ids"] += list(range(length))
    return rows + [current]


def assert_same_batches(ours: Batches, reference: Batches, steps: int) -> None:
    for position in range(steps):
        (a, tokens_a), (b, tokens_b) = ours.get(position), reference.get(position)
        assert tokens_a == tokens_b and a.keys() == b.keys()
        assert all((a[key] == b[key]).all() for key in a)


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_cached_quickstart_batches_equal_in_memory_tokenization(packing, train_on_inputs):
    tokenizer = tiny_tokenizer()
    data = DataConfig(train=str(QUICKSTART), max_seq_len=96, train_on_inputs=train_on_inputs, packing=packing)
    cached = load_tokenized(str(QUICKSTART), data, tokenizer)
    expected = reference_examples(str(QUICKSTART), data, tokenizer)
    assert len(cached.examples) == len(expected) == cached.rows - cached.skipped
    assert [cached.examples[i] for i in range(len(expected))] == expected
    assert cached.trained_tokens == sum(sum(lab != IGNORE_INDEX for lab in e["labels"]) for e in expected)
    rows = PackedRows(cached.examples, 160) if packing else cached.examples
    reference_rows = reference_pack(expected, 160) if packing else expected
    assert len(rows) == len(reference_rows)
    per_epoch = -(-len(rows) // 4)
    assert_same_batches(Batches(rows, 4, seed=3, pad_id=0), Batches(reference_rows, 4, seed=3, pad_id=0),
                        steps=per_epoch + 2)  # into the second epoch


def test_a_second_load_reads_the_cache_and_changes_are_seen(tmp_path, monkeypatch):
    path = tmp_path / "x.jsonl"
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data, tokenizer = DataConfig(train=str(path), max_seq_len=32), tiny_tokenizer()
    first = load_tokenized(str(path), data, tokenizer)
    entries = set((cache_dir() / "tokenized").iterdir())

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    with monkeypatch.context() as patched:
        patched.setattr(token_cache, "tokenize_chunk", no_tokenizing)
        again = load_tokenized(str(path), data, tokenizer)
    assert [again.examples[i] for i in range(20)] == [first.examples[i] for i in range(20)]
    # the same size, other content -> tokenized again (the content is hashed, not only size and time)
    path.write_text(path.read_text().replace("p1", "q1"))
    changed = load_tokenized(str(path), data, tokenizer)
    assert changed.examples[1] != first.examples[1]
    load_tokenized(str(path), data.model_copy(update={"max_seq_len": 64}), tokenizer)
    other = tiny_tokenizer()
    other.chat_template += "{# another template, rendering the same #}"
    load_tokenized(str(path), data, other)
    load_tokenized(str(path), data.model_copy(update={"train_on_inputs": True}), tokenizer)
    assert len(set((cache_dir() / "tokenized").iterdir()) - entries) == 4  # one entry per tokenization
    # packing and the validation split read the same entry
    load_tokenized(str(path), data.model_copy(update={"packing": True, "val_fraction": 0.1}), tokenizer)
    assert len(set((cache_dir() / "tokenized").iterdir()) - entries) == 4


def test_worker_processes_tokenize_exactly_as_one_process(tmp_path, monkeypatch):
    path = tmp_path / "x.jsonl"
    rows = [{"prompt": f"question {i} " * (i % 5), "completion": f"answer {i}"} for i in range(60)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data, tokenizer = DataConfig(train=str(path), max_seq_len=40), tiny_tokenizer()
    monkeypatch.setattr(token_cache, "CHUNK_ROWS", 7)  # 9 chunks: worker processes (on a machine with 2+ cores)
    built = load_tokenized(str(path), data, tokenizer)
    assert built.rows == 60 and built.truncated > 0
    expected = reference_examples(str(path), data, tokenizer)
    assert [built.examples[i] for i in range(len(built.examples))] == expected
    # an error in a worker names the file and line, as it does in one process
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:24]) + '{"prompt": "p"}\n')
    with pytest.raises(LorafitError, match=r"x\.jsonl:25: field 'completion' is missing"):
        load_tokenized(str(path), data, tokenizer)


def test_a_killed_build_is_not_read_and_is_cleaned_up(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"prompt": "p", "completion": "c"}\n')
    data, tokenizer = DataConfig(train=str(path), max_seq_len=32), tiny_tokenizer()
    folder = cache_dir() / "tokenized" / token_cache.fingerprint(str(path), data, tokenizer)
    leftover = folder.parent / f".{folder.name}.12345"
    (leftover).mkdir(parents=True)
    (leftover / token_cache.TABLE_NAME).write_bytes(b"half a file")
    tokenized = load_tokenized(str(path), data, tokenizer)
    assert len(tokenized.examples) == 1 and not leftover.exists()
    # an entry without its meta.json (never renamed into place by a complete build) is built again
    (folder / token_cache.META_NAME).unlink()
    assert len(load_tokenized(str(path), data, tokenizer).examples) == 1
    # and so is one whose table was damaged on disk
    table = folder / token_cache.TABLE_NAME
    table.write_bytes(table.read_bytes()[:100])
    assert load_tokenized(str(path), data, tokenizer).examples[0]["input_ids"]
    shutil.rmtree(folder)


def test_examples_views_slice_and_take():
    examples = Examples.from_lists([{"input_ids": [i, i + 1], "labels": [IGNORE_INDEX, i + 1]} for i in range(10)])
    assert examples[-1] == {"input_ids": [9, 10], "labels": [IGNORE_INDEX, 10]}
    view = examples[1::3]
    assert len(view) == 3 and view[1]["input_ids"] == [4, 5]
    assert examples.take([7, 2])[0]["input_ids"] == [7, 8] and view.take([2])[0]["input_ids"] == [7, 8]
    assert view.trained_tokens() == 3 and list(view.column("length")) == [2, 2, 2]
    with pytest.raises(IndexError):
        view[3]


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True])
def test_cached_quickstart_batches_equal_in_memory_tokenization_with_smollm2(packing):
    """As above, with the quickstart recipe's own tokenizer (SmolLM2's BPE and chat template) and settings."""
    from lorafit.config import load_recipe
    from lorafit.model import load_tokenizer

    recipe = load_recipe(REPO / "configs" / "quickstart.yaml")
    tokenizer = load_tokenizer(recipe.model)
    data = recipe.data.model_copy(update={"packing": packing})
    cached = load_tokenized(data.train, data, tokenizer)
    expected = reference_examples(data.train, data, tokenizer)
    assert [cached.examples[i] for i in range(len(expected))] == expected and len(cached.examples) == len(expected)
    rows = PackedRows(cached.examples, data.max_seq_len) if packing else cached.examples
    reference_rows = reference_pack(expected, data.max_seq_len) if packing else expected
    batches = Batches(rows, 8, seed=0, pad_id=tokenizer.pad_token_id)
    reference = Batches(reference_rows, 8, seed=0, pad_id=tokenizer.pad_token_id)
    assert_same_batches(batches, reference, steps=batches.per_epoch + 3)


def test_eval_scores_from_the_entry_training_made(tmp_path, monkeypatch):
    from lorafit.evaluate import prepare_task

    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) + "\n" for i in range(12)))
    tokenizer = tiny_tokenizer()
    trained = load_tokenized(str(path), DataConfig(train=str(path), max_seq_len=64), tokenizer)
    monkeypatch.setattr(token_cache, "tokenize_chunk", lambda *args: pytest.fail("tokenized again"))
    task = prepare_task(tokenizer, str(path), "prompt_completion", ["loss"], 64, None, 4, 8)
    assert [task.tokenized.examples[i] for i in range(12)] == [trained.examples[i] for i in range(12)]
