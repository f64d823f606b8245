"""Tokenized examples as an Arrow table — memory-mapped from the cache (lorafit/token_cache.py) — read row by row.

A table holds one example per row: ``input_ids`` (list<int32>), ``trained`` (list<bool>: does this position
count in the loss), ``length`` and ``trained_count`` (int32, so sizes and totals never need a pass over the
tokens). Labels are rebuilt on read: the token where trained, -100 elsewhere — exactly what tokenizing makes.
Reading row i touches only that row's pages, so a run's memory does not grow with the dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

IGNORE_INDEX = -100
SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("trained", pa.list_(pa.bool_())),
                    ("length", pa.int32()), ("trained_count", pa.int32())])
Example = dict[str, list[int]]


def record_batch(input_ids: list[list[int]], labels: list[list[int]]) -> pa.RecordBatch:
    """Examples as they come from tokenizing (labels -100 where untrained) -> one batch of table rows."""
    trained = [[label != IGNORE_INDEX for label in row] for row in labels]
    return pa.record_batch([
        pa.array(input_ids, type=pa.list_(pa.int32())),
        pa.array(trained, type=pa.list_(pa.bool_())),
        pa.array([len(row) for row in input_ids], type=pa.int32()),
        pa.array([sum(row) for row in trained], type=pa.int32()),
    ], schema=SCHEMA)


class Examples(Sequence):
    """A sequence of ``{"input_ids": [...], "labels": [...]}`` over an Arrow table, optionally a subset of its rows
    (``indices``): slicing and ``take`` make views, never copies of the tokens."""

    def __init__(self, table: pa.Table, indices: np.ndarray | None = None) -> None:
        self.table = table
        self.indices = indices
        self._ids, self._trained = table.column("input_ids"), table.column("trained")
        # Row r lives in chunk k = searchsorted(starts, r, "right") - 1, at r - starts[k].
        self._starts = np.cumsum([0] + [len(chunk) for chunk in self._ids.chunks])[:-1]

    @classmethod
    def from_lists(cls, examples: list[Example]) -> Examples:
        """In-memory examples (small sets, tests) in the same form as the cache's."""
        batch = record_batch([e["input_ids"] for e in examples], [e["labels"] for e in examples])
        return cls(pa.Table.from_batches([batch], schema=SCHEMA))

    @classmethod
    def open(cls, path: Path) -> Examples:
        """A table file written by ``TableWriter``, memory-mapped: nothing is read until rows are."""
        return cls(pa.ipc.open_file(pa.memory_map(str(path))).read_all())

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else self.table.num_rows

    def __getitem__(self, item):
        if isinstance(item, slice):
            return self.take(np.arange(len(self))[item])
        if item < 0:
            item += len(self)
        if not 0 <= item < len(self):
            raise IndexError(item)
        row = int(self.indices[item]) if self.indices is not None else item
        chunk = int(np.searchsorted(self._starts, row, side="right")) - 1
        local = row - int(self._starts[chunk])
        input_ids = self._ids.chunk(chunk)[local].values.to_numpy(zero_copy_only=False)
        trained = self._trained.chunk(chunk)[local].values.to_numpy(zero_copy_only=False)
        return {"input_ids": input_ids.tolist(), "labels": np.where(trained, input_ids, IGNORE_INDEX).tolist()}

    def take(self, positions: np.ndarray | list[int]) -> Examples:
        """The examples at ``positions`` (of this sequence), as a view."""
        positions = np.asarray(positions, dtype=np.int64)
        return Examples(self.table, self.indices[positions] if self.indices is not None else positions)

    def column(self, name: str) -> np.ndarray:
        """A per-example column (``length``, ``trained_count``) for these examples."""
        values = self.table.column(name).to_numpy()
        return values[self.indices] if self.indices is not None else values

    def trained_tokens(self) -> int:
        return int(self.column("trained_count").sum())


class PackedRows(Sequence):
    """Examples concatenated greedily, in order, into rows of at most ``max_seq_len`` tokens (one longer example
    is a row of its own). Row i is built when read, from the examples the plan gives it.

    Each example restarts ``position_ids`` at 0; with no attention mask, transformers reads those resets
    as sequence boundaries and builds a block-diagonal causal mask, so no example attends to another.
    The first token of each example gets label -100: in the packed row it would otherwise be "predicted"
    from the previous example's last token, a target the unpacked example never has.
    """

    def __init__(self, examples: Sequence[Example], max_seq_len: int) -> None:
        self.examples = examples
        lengths = examples.column("length").tolist() if isinstance(examples, Examples) else \
            [len(e["input_ids"]) for e in examples]
        starts, filled = [], 0
        for index, length in enumerate(lengths):
            if not starts or (filled and filled + length > max_seq_len):
                starts.append(index)
                filled = 0
            filled += length
        self.bounds = starts + [len(lengths)]  # row i holds examples bounds[i] .. bounds[i+1]-1

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, item):
        if isinstance(item, slice):
            return [self[i] for i in range(len(self))[item]]
        if not 0 <= item < len(self):
            raise IndexError(item)
        row = empty_packed_row()
        for index in range(self.bounds[item], self.bounds[item + 1]):
            append_to_packed_row(row, self.examples[index])
        return row


def empty_packed_row() -> dict[str, list[int]]:
    return {"input_ids": [], "labels": [], "position_ids": []}


def append_to_packed_row(row: dict[str, list[int]], example: Example) -> None:
    """Add one example to a packed row: its positions restart at 0 and its first token is not a target."""
    row["input_ids"] += example["input_ids"]
    row["labels"] += [IGNORE_INDEX] + example["labels"][1:]
    row["position_ids"] += list(range(len(example["input_ids"])))


class TableWriter:
    """Appends record batches to an Arrow IPC file at ``path`` (the format ``Examples.open`` memory-maps)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_file(self._sink, SCHEMA)

    def write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)

    def close(self) -> None:
        self._writer.close()
        self._sink.close()
