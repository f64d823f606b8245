"""``data.streaming``: read the training rows as a stream, in order, tokenizing as training goes.

For datasets larger than the disk (a hub dataset's streaming split) or than the cache should hold: nothing
is cached and nothing is held but the micro-batches being assembled. The stream is the source's rows in
their order, repeated pass after pass (no shuffle: a stream cannot be permuted; shuffle the source
beforehand if its order matters). Micro-batch k holds the next ``micro_batch_size × processes`` training rows
(packed rows when data.packing is on), and each process takes its slice, as with cached data.

Resume contract: a checkpoint stores where the next micro-batch starts (pass and row number in the source),
so a resumed run reads exactly the rows the uninterrupted run would have read, provided the source still
holds the same rows in the same order (a hub dataset that changed in between is not detected). Rows before
that point are skipped without tokenizing them.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lorafit.config import DataConfig
from lorafit.data import bos_for, collate, iter_rows, row_location, tokenize_chunk
from lorafit.errors import LorafitError
from lorafit.examples import append_to_packed_row, empty_packed_row

CHUNK_ROWS = 256  # rows tokenized at a time: small, so the first step starts at once
_LOCAL_TEXT = (".jsonl", ".json", ".csv", ".txt")  # parsed by lorafit (values stay text), read lazily
Start = tuple[int, int]  # (pass, row number in the source) where a training row's first example comes from


def stream_rows(source: str, start: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) from row ``start`` of ``source`` on: a local text file read lazily, else a ``datasets``
    streaming split (a hub dataset, a local parquet file or dataset folder)."""
    if Path(source).suffix in _LOCAL_TEXT:
        return itertools.islice(iter_rows(source), start, None)
    import datasets

    datasets.disable_progress_bars()
    try:
        if Path(source).suffix == ".parquet":
            stream = datasets.load_dataset("parquet", data_files=source, split="train", streaming=True)
        else:
            stream = datasets.load_dataset(source, split="train", streaming=True)
    except Exception as err:  # datasets raises many types; all mean "this source cannot be streamed"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LorafitError(f"data.train {source!r} could not be opened as a stream: {first}") from None
    stream = stream.skip(start) if start else stream
    return ((row_location(source, start + index), row) for index, row in enumerate(stream))


class StreamBatches:
    """The micro-batch stream of ``data.streaming``; the same interface as data.Batches, read in order.

    ``get(position)`` must be asked for positions 0, 1, 2, ... (or from the position a checkpoint restored).
    ``state_dict(position)`` says where micro-batch ``position`` starts in the source, for checkpoints.
    """

    per_epoch = None  # unknown: a stream has no length

    def __init__(self, source: str, data: DataConfig, tokenizer, micro_batch_size: int, pad_id: int,
                 rank: int = 0, world: int = 1) -> None:
        self.source, self.data, self.tokenizer, self.pad_id = source, data, tokenizer, pad_id
        self.micro, self.rank, self.size = micro_batch_size, rank, micro_batch_size * world
        self.counts: Counter = Counter()  # rows read, truncated, skipped; examples kept (this process)
        self._position = 0
        self._starts: dict[int, Start] = {0: (0, 0)}  # micro-batch position -> where it starts (recent ones)
        self._rows: Iterator[tuple[Start, dict[str, list[int]]]] | None = None
        self._next: tuple[Start, dict[str, list[int]]] | None = None

    def get(self, position: int) -> tuple[dict[str, torch.Tensor], int]:
        """This process's share of micro-batch ``position`` and its number of real tokens."""
        share = self._global_rows(position)[self.rank * self.micro : (self.rank + 1) * self.micro]
        return collate(share, self.pad_id), sum(len(row["input_ids"]) for row in share)

    def get_global(self, position: int) -> dict[str, torch.Tensor]:
        return collate(self._global_rows(position), self.pad_id)

    def state_dict(self, position: int) -> dict[str, int]:
        """Where micro-batch ``position`` (one already read, or the next) starts: what a checkpoint stores."""
        if position not in self._starts:
            raise RuntimeError(f"stream position {position} is no longer known (have {sorted(self._starts)})")
        pass_number, row = self._starts[position]
        return {"position": position, "pass": pass_number, "row": row}

    def load_state_dict(self, state: dict[str, int], checkpoint: Path) -> None:
        """Continue from a checkpoint's ``state_dict``: the next ``get`` is for ``state["position"]``."""
        if not state:
            raise LorafitError(f"{checkpoint} was written by a run without data.streaming; resume without it")
        self._position = int(state["position"])
        self._starts = {self._position: (int(state["pass"]), int(state["row"]))}
        self._rows = self._next = None

    def _global_rows(self, position: int) -> list[dict[str, list[int]]]:
        if position != self._position:
            raise RuntimeError(f"a stream is read in order: asked for micro-batch {position}, next is {self._position}")
        if self._rows is None:
            self._rows = self._training_rows(*self._starts[position])
            self._next = next(self._rows)
        chosen = []
        for _ in range(self.size):
            chosen.append(self._next[1])
            self._next = next(self._rows)
        self._position = position + 1
        self._starts[self._position] = self._next[0]  # where the following micro-batch starts
        for old in [p for p in self._starts if p < self._position - 64]:
            del self._starts[old]
        return chosen

    def _training_rows(self, first_pass: int, first_row: int) -> Iterator[tuple[Start, dict[str, list[int]]]]:
        """(start, row) for every training row from ``(first_pass, first_row)`` on, endlessly: examples, or
        examples packed greedily as data.Batches' packed rows are (see examples.PackedRows)."""
        examples = self._examples(first_pass, first_row)
        if not self.data.packing:
            yield from examples
            return
        start, row = None, None
        for where, example in examples:
            if row is not None and len(row["input_ids"]) + len(example["input_ids"]) > self.data.max_seq_len:
                yield start, row
                row = None
            if row is None:
                start, row = where, empty_packed_row()
            append_to_packed_row(row, example)

    def _examples(self, first_pass: int, first_row: int) -> Iterator[tuple[Start, dict[str, list[int]]]]:
        bos_id = bos_for(self.data, self.tokenizer)
        for pass_number in itertools.count(first_pass):
            offset = first_row if pass_number == first_pass else 0
            kept_in_pass = 0
            rows = stream_rows(self.source, offset)
            while chunk_rows := list(itertools.islice(rows, CHUNK_ROWS)):
                chunk = tokenize_chunk(chunk_rows, self.data, self.tokenizer, bos_id)
                self.counts.update(rows=chunk.rows, examples=len(chunk.input_ids), truncated=chunk.truncated,
                                   skipped=chunk.skipped)
                for index, input_ids, labels in zip(chunk.kept, chunk.input_ids, chunk.labels, strict=True):
                    yield (pass_number, offset + index), {"input_ids": input_ids, "labels": labels}
                offset += chunk.rows
                kept_in_pass += len(chunk.input_ids)
            if kept_in_pass == 0 and (pass_number > first_pass or first_row == 0):
                what = "is empty" if offset == 0 else (f"has no row with a token to train on (all {offset} were "
                                                       f"skipped at data.max_seq_len={self.data.max_seq_len})")
                raise LorafitError(f"data.train {self.source} {what}")

    def describe(self) -> str:
        counts = self.counts
        notes = [f"{counts[what]:,} {what}" for what in ("truncated", "skipped") if counts[what]]
        extra = f" ({', '.join(notes)} at data.max_seq_len)" if notes else ""
        return f"train (streamed): {counts['rows']:,} rows read, {counts['examples']:,} examples kept{extra}"
