"""Tokenize a dataset once, keep it on disk as Arrow, and memory-map it in every run after.

The cache entry lives in ``$LORAFIT_CACHE/tokenized/<fingerprint>/`` (``examples.arrow`` + ``meta.json``). The
fingerprint covers everything that changes the tokens: the data file's content (or a hub dataset's own
fingerprint), the data format, max_seq_len, train_on_inputs, the tokenizer (its full definition, special
tokens and chat template) and the version of lorafit's tokenization rules. Packing and the validation split
are applied when reading (they are cheap and depend only on the lengths), so they share one entry.

Building reads the rows lazily, tokenizes chunks of them in worker processes (batched fast-tokenizer calls)
and appends each chunk to the Arrow file as it arrives, in order: memory stays flat however many rows there
are. The entry appears under its final name only when complete (a killed build leaves a temp folder that
the next build ignores and removes).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from lorafit.config import DataConfig
from lorafit.data import (
    TokenizedChunk,
    TokenizedData,
    bos_for,
    checked,
    iter_rows,
    load_with_datasets,
    tokenize_chunk,
)
from lorafit.errors import LorafitError
from lorafit.examples import Examples, TableWriter, record_batch
from lorafit.model import cache_dir

# Bump when the way rows become tokens changes, so that no run reads tokens made by older rules.
TOKENIZATION_VERSION = 1
CHUNK_ROWS = 1000
TABLE_NAME = "examples.arrow"
META_NAME = "meta.json"


def load_tokenized(source: str, data: DataConfig, tokenizer, console: Console | None = None) -> TokenizedData:
    """``source`` tokenized under ``data``'s rules: from the cache when this exact tokenization was made before,
    else made now (and cached). The examples are memory-mapped either way. An entry that cannot be read
    (damaged on disk) is built again."""
    console = console or Console(stderr=True)
    folder = cache_dir() / "tokenized" / fingerprint(source, data, tokenizer)
    for attempt in range(2):
        if not (folder / META_NAME).is_file():
            try:
                build(folder, source, data, tokenizer, console)
            except OSError as err:
                raise LorafitError(f"could not write the tokenized data to {folder.parent} ({err}). Fix: free disk "
                                   "space there, or point $LORAFIT_CACHE at a writable folder") from None
        try:
            meta = json.loads((folder / META_NAME).read_text())
            examples = Examples.open(folder / TABLE_NAME)
        except (OSError, ValueError, KeyError) as err:  # pyarrow's ArrowInvalid is a ValueError
            if attempt:
                raise LorafitError(f"{folder}: the cached tokenized data cannot be read ({err}); delete that "
                                   "folder and run again") from None
            console.print(f"[yellow]warning:[/] {folder} is damaged ({err}); tokenizing again", highlight=False)
            shutil.rmtree(folder, ignore_errors=True)
    return checked(TokenizedData(examples, source, meta["rows"], meta["truncated"], meta["skipped"]), data)


def fingerprint(source: str, data: DataConfig, tokenizer) -> str:
    settings = {"version": TOKENIZATION_VERSION, "format": data.format, "max_seq_len": data.max_seq_len,
                "train_on_inputs": data.train_on_inputs, "source": source_fingerprint(source),
                "tokenizer": tokenizer_fingerprint(tokenizer)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def source_fingerprint(source: str) -> str:
    """A local file: its suffix (which decides how it is parsed) and a hash of its content. A hub dataset: the
    fingerprint ``datasets`` gives the loaded split."""
    path = Path(source)
    if path.is_file():
        with open(path, "rb") as f:
            return f"{path.suffix}:{hashlib.file_digest(f, 'sha256').hexdigest()}"
    return f"hub:{source}:{load_with_datasets(source, parquet=False)._fingerprint}"


def tokenizer_fingerprint(tokenizer) -> str:
    """Everything of a tokenizer that decides the ids: its full serialized definition when it has one (fast
    tokenizers), else its vocabulary; its special tokens; its chat template; whether examples get a BOS."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    parts = [type(tokenizer).__name__, definition, specials, str(tokenizer.chat_template),
             str(tokenizer.bos_token_id), str(tokenizer("a")["input_ids"])]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def build(folder: Path, source: str, data: DataConfig, tokenizer, console: Console) -> None:
    """Tokenize ``source`` into ``folder`` (written as a temp folder beside it, then renamed into place)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".{folder.name}.*"):  # a build killed earlier
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.parent / f".{folder.name}.{os.getpid()}"
    tmp.mkdir()
    try:
        meta = _write_table(tmp / TABLE_NAME, source, data, tokenizer, console)
        (tmp / META_NAME).write_text(json.dumps({**meta, "source": source}, indent=2) + "\n")
        if folder.exists() and not (folder / META_NAME).is_file():
            shutil.rmtree(folder)  # not an entry a complete build made (damaged by hand): replaced
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / META_NAME).is_file():  # not another process finishing the same build first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_table(path: Path, source: str, data: DataConfig, tokenizer, console: Console) -> dict[str, Any]:
    counts = {"rows": 0, "examples": 0, "truncated": 0, "skipped": 0}
    writer = TableWriter(path)
    started = time.perf_counter()
    with Progress(SpinnerColumn(), TextColumn("tokenizing {task.description}: {task.completed:,} rows"),
                  TextColumn("({task.fields[rate]:,.0f} rows/s)"), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task(source, rate=0.0)
        for chunk in tokenized_chunks(iter_rows(source), data, tokenizer):
            writer.write(record_batch(chunk.input_ids, chunk.labels))
            for key, value in (("rows", chunk.rows), ("examples", len(chunk.input_ids)),
                               ("truncated", chunk.truncated), ("skipped", chunk.skipped)):
                counts[key] += value
            progress.update(task, completed=counts["rows"],
                            rate=counts["rows"] / max(time.perf_counter() - started, 1e-9))
    writer.close()
    seconds = time.perf_counter() - started
    console.print(f"tokenized {source}: {counts['rows']:,} rows in {seconds:.1f} s "
                  f"({counts['rows'] / max(seconds, 1e-9):,.0f} rows/s); cached for the next run", highlight=False)
    return counts


def tokenized_chunks(rows: Iterable[tuple[str, dict[str, Any]]], data: DataConfig, tokenizer
                     ) -> Iterator[TokenizedChunk]:
    """Chunks of ``CHUNK_ROWS`` rows tokenized, in order: in this process for a single chunk, else in one
    worker process per CPU core with at most two chunks per worker in flight (so rows are read only as fast
    as they are tokenized)."""
    chunks = _batched(rows, CHUNK_ROWS)
    first = list(itertools.islice(chunks, 2))
    bos_id = bos_for(data, tokenizer)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(cores, 8)  # the cores this process may run on (a container's share, not the host's)
    if len(first) < 2 or workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        for chunk in itertools.chain(first, chunks):
            yield tokenize_chunk(chunk, data, tokenizer, bos_id)
        return
    global _WORKER_STATE
    _WORKER_STATE = (data, tokenizer, bos_id)  # inherited by the forked workers, not pickled per chunk
    with _quiet_tokenizer_fork(), multiprocessing.get_context("fork").Pool(workers) as pool:
        pending: deque = deque()
        for chunk in itertools.chain(first, chunks):
            pending.append(pool.apply_async(_tokenize_in_worker, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


_WORKER_STATE: tuple[DataConfig, Any, int | None] | None = None


def _tokenize_in_worker(chunk: list[tuple[str, dict[str, Any]]]) -> TokenizedChunk:
    data, tokenizer, bos_id = _WORKER_STATE
    return tokenize_chunk(chunk, data, tokenizer, bos_id)


@contextlib.contextmanager
def _quiet_tokenizer_fork():
    """Each worker encodes on one thread (the workers are the parallelism); saying so also keeps the tokenizers
    library from warning about a fork after its thread pool ran."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def _batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk
