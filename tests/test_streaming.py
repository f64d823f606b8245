"""data.streaming (lorafit/streaming.py): rows read in order as training goes, pass after pass; packed like
cached data; a resume reads exactly the rows the uninterrupted run read."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lorafit.config import DataConfig, load_recipe
from lorafit.data import Batches, collate
from lorafit.errors import LorafitError
from lorafit.streaming import StreamBatches
from lorafit.train import train as run_training

from .conftest import ROWS, ctrl_c_after_step, losses, recipe_at, tiny_tokenizer, write_recipe
from .test_token_cache import reference_examples, reference_pack


def endless(rows, count):
    """The first ``count`` items of ``rows`` repeated pass after pass."""
    return [rows[i % len(rows)] for i in range(count)]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_stream_reads_rows_in_order_pass_after_pass(tmp_path, suffix):
    rows = ROWS[:10] + [{"prompt": "x" * 80, "completion": "y"}]  # the last is skipped at max_seq_len 64
    path = tmp_path / f"train{suffix}"
    if suffix == ".parquet":
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data, tokenizer = DataConfig(train=str(path), max_seq_len=64, streaming=True), tiny_tokenizer()
    jsonl = tmp_path / "same.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = reference_examples(str(jsonl), data, tokenizer)
    assert len(expected) == 10
    stream = StreamBatches(str(path), data, tokenizer, micro_batch_size=2, pad_id=0, rank=1, world=2)
    wanted = endless(expected, 4 * 7)
    for position in range(7):  # 28 rows: into the third pass
        batch, _ = stream.get(position)
        expected_share = collate(wanted[position * 4 + 2 : position * 4 + 4], 0)
        assert all(torch.equal(batch[key], expected_share[key]) for key in batch)
    assert stream.state_dict(7) == {"position": 7, "pass": 2, "row": 8}  # row 28 of the stream: 3rd pass, row 8
    assert "skipped" in stream.describe()
    # a stream continued from that state reads on exactly as the first one does
    again = StreamBatches(str(path), data, tokenizer, micro_batch_size=2, pad_id=0, rank=1, world=2)
    again.load_state_dict(stream.state_dict(5), tmp_path)
    for position in (5, 6):
        expected_share = collate(wanted[position * 4 + 2 : position * 4 + 4], 0)
        assert torch.equal(again.get(position)[0]["input_ids"], expected_share["input_ids"])
    with pytest.raises(RuntimeError, match="read in order"):
        again.get(2)


def test_packed_stream_packs_as_cached_data_packs(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    data = DataConfig(train=str(path), max_seq_len=160, streaming=True, packing=True)
    tokenizer = tiny_tokenizer()
    examples = reference_examples(str(path), data, tokenizer)
    packed = reference_pack(examples, 160)
    stream = StreamBatches(str(path), data, tokenizer, micro_batch_size=3, pad_id=0)
    cached = Batches(packed, 3, seed=0, pad_id=0)
    # within the first pass the stream's packed rows are the cached packed rows, in order
    for position in range(len(packed) // 3):
        ours = stream.get(position)[0]
        in_order = collate(packed[position * 3 : position * 3 + 3], 0)
        assert all(torch.equal(ours[key], in_order[key]) for key in ours)
    assert cached.per_epoch == -(-len(packed) // 3)


def test_streamed_run_resumed_after_ctrl_c_matches_the_uninterrupted_run(run_dir, monkeypatch):
    settings = ("data.streaming=true", "data.packing=true", "train.grad_accum=2", "train.max_steps=6")
    run_training(recipe_at(run_dir, *settings, out="straight"))
    expected = losses(run_dir / "straight")
    with ctrl_c_after_step(monkeypatch, 3), pytest.raises(LorafitError, match="interrupted after step 3"):
        run_training(recipe_at(run_dir, *settings, out="resumed"))
    state = torch.load(run_dir / "resumed" / "checkpoints" / "step-000003" / "training_state.pt", weights_only=True)
    assert state["data"]["position"] == 6 and state["data"]["row"] > 0
    run_training(recipe_at(run_dir, *settings, out="resumed"), resume="latest")
    assert losses(run_dir / "resumed") == expected
    straight = load_file(run_dir / "straight" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(run_dir / "resumed" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    # a checkpoint of a streamed run cannot be continued by reading the data another way
    with pytest.raises(LorafitError, match="written by a run with data.streaming: true"):
        run_training(recipe_at(run_dir, "train.grad_accum=2", "train.max_steps=8", "data.packing=true",
                               out="resumed"), resume="latest")


def test_streaming_recipe_rules(tmp_path):
    base = "model: {base: x}\ndata: {train: t.jsonl, streaming: true%s}\n%s"
    cases = [(", val_fraction: 0.1", "train: {max_steps: 5}", "data.val_fraction cannot hold out rows of a stream"),
             ("", "train: {epochs: 1}", "set train.max_steps instead"),
             ("", "", "set train.max_steps instead")]
    for data_extra, train, message in cases:
        with pytest.raises(LorafitError, match=message):
            load_recipe(write_recipe(tmp_path / "r.yaml", base % (data_extra, train)))
