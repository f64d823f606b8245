"""Training data: load rows (datasets), render them as text segments, tokenize, mask, pack, collate.

Every example becomes a list of ``(text, trained)`` segments, tokenized one by one and concatenated.
Tokenizing the prompt on its own is exactly what happens at inference time, so the model is trained on
the same token boundary it will later be asked to continue from. Labels are ``-100`` on untrained
segments (when ``train_on_inputs`` is false) and on padding, decided by position — never by comparing
ids with the pad token, which in many tokenizers is the same id as EOS.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorafit.config import DataConfig, shown
from lorafit.errors import LorafitError
from lorafit.examples import IGNORE_INDEX, Examples

Segments = list[tuple[str, bool]]


@dataclass
class TokenizedData:
    """Tokenized examples plus what happened on the way, for the run summary."""

    examples: Examples  # each: input_ids, labels (same length); Arrow-backed (lorafit/examples.py)
    source: str
    rows: int
    truncated: int = 0
    skipped: int = 0

    @property
    def trained_tokens(self) -> int:
        return self.examples.trained_tokens()


@dataclass
class TokenizedChunk:
    """Some consecutive rows tokenized: the examples kept and what happened to the others."""

    input_ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)  # which of the chunk's rows each example came from
    rows: int = 0
    truncated: int = 0
    skipped: int = 0


def load_rows(source: str) -> list[dict[str, Any]]:
    """Every row of a local file (jsonl/json/csv/txt/parquet) or of a hub dataset's train split, as dicts."""
    return [row for _, row in iter_rows(source)]


def iter_rows(source: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for each row of ``source``, read lazily: "file:line" (for errors) and the row as a dict.
    Text files may start with a UTF-8 byte-order mark (Excel writes one); it is not part of the first field.

    Text formats are parsed here, not by ``datasets``: its JSON/CSV readers infer column types, and
    would turn a completion like "2021-03-03" into a timestamp. Parsing ourselves also gives exact
    line numbers in errors. Parquet files (already typed) and hub datasets go through ``datasets``.
    A JSON file (one list) is read whole; the other formats one row at a time.
    """
    suffix = Path(source).suffix
    try:
        if suffix == ".jsonl":
            yield from _read_jsonl(Path(source))
        elif suffix == ".json":
            yield from ((row_location(source, i), row) for i, row in enumerate(_read_json(Path(source))))
        elif suffix == ".csv":
            with open(source, newline="", encoding="utf-8-sig") as f:
                yield from ((row_location(source, i), row) for i, row in enumerate(csv.DictReader(f)))
        elif suffix == ".txt":
            with open(source, encoding="utf-8-sig") as f:
                yield from ((f"{source}:{n}", {"text": line.rstrip("\r\n")})
                            for n, line in enumerate(f, start=1) if line.strip())
        else:
            dataset = load_with_datasets(source, parquet=suffix == ".parquet")
            for start in range(0, len(dataset), 1000):
                rows = dataset[start : start + 1000]
                yield from ((row_location(source, start + i), dict(zip(rows, values, strict=True)))
                            for i, values in enumerate(zip(*rows.values(), strict=True)))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise LorafitError(f"{source}: could not be read ({err})") from None


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                message = f"{path}:{number}: not valid JSON ({err.msg}); each line must be one JSON object"
                raise LorafitError(message) from None
            if not isinstance(row, dict):
                raise LorafitError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")
            yield f"{path}:{number}", row


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        content = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise LorafitError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    rows = content.get("data") if isinstance(content, dict) else content
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise LorafitError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}})")
    return rows


def load_with_datasets(source: str, parquet: bool):
    """A parquet file or a hub dataset's train split (Arrow-backed, memory-mapped by ``datasets``)."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if parquet:
            return datasets.load_dataset("parquet", data_files=source, split="train")
        return datasets.load_dataset(source, split="train")
    except Exception as err:  # datasets raises many types; all mean "this source cannot be read"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = "" if parquet else " (not a local file, so it was tried as a hub dataset, which needs network)"
        raise LorafitError(f"data: {source!r} could not be loaded{where}: {first}") from None


def row_location(source: str, index: int) -> str:
    """Where row ``index`` (0-based) is, for error messages: "file:line" for local files (a CSV's first
    line is its header), "name row N" for a hub dataset."""
    if not Path(source).suffix:
        return f"{source} row {index}"
    return f"{source}:{index + (2 if source.endswith('.csv') else 1)}"


def example_segments(row: dict[str, Any], data_format: str, tokenizer, where: str) -> Segments:
    """One row -> text segments, each marked trained or not. ``where`` is "file:line" for errors."""
    if data_format == "text":
        return [(_field(row, "text", where), True), (tokenizer.eos_token, True)]
    if data_format == "chat":
        return chat_segments(chat_messages(row, where), tokenizer, where)
    if data_format == "alpaca":
        instruction = _field(row, "instruction", where)
        extra = row.get("input") or ""
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        return prompt_completion_segments(prompt, _field(row, "output", where), tokenizer, where)
    return prompt_completion_segments(_field(row, "prompt", where), _field(row, "completion", where), tokenizer, where)


def prompt_completion_segments(prompt: str, completion: str, tokenizer, where: str) -> Segments:
    """A user turn and an assistant turn with the chat template, else prompt + completion + EOS."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return chat_segments(messages, tokenizer, where)
    return [(prompt, False), (completion + tokenizer.eos_token, True)]


def chat_segments(messages: list[dict[str, str]], tokenizer, where: str) -> Segments:
    """Split the rendered conversation at each assistant turn; every assistant turn is trained.

    An assistant turn's text is what the template adds after the generation prompt, up to and including
    its end-of-turn token, so the model learns to stop. This relies on the template rendering each
    conversation as a prefix of the longer one, which we check instead of assume.
    """
    if not tokenizer.chat_template:
        raise LorafitError(f"{where}: format chat needs a tokenizer with a chat template; this one has none")
    segments: Segments = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:index], generation_prompt=True, where=where)
        full = _render(tokenizer, messages[: index + 1], generation_prompt=False, where=where)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise LorafitError(f"{where}: the tokenizer's chat template does not render this conversation "
                               "turn by turn (each prefix must render as a prefix); use format text instead")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    if not segments:
        raise LorafitError(f"{where}: conversation has no assistant message to train on")
    # The whole conversation: already rendered when it ends with the last assistant turn (the usual case).
    last_is_assistant = messages[-1]["role"] == "assistant"
    whole = done if last_is_assistant else _render(tokenizer, messages, generation_prompt=False, where=where)
    tail = whole[len(done):]
    return segments + ([(tail, False)] if tail else [])


def generation_example(row: dict[str, Any], data_format: str, tokenizer, where: str) -> tuple[list[int], str]:
    """(prompt token ids, reference answer) for exact-match evaluation, with the prompt built exactly as
    training builds it: everything before the (last) trained segment."""
    if data_format == "text":
        raise LorafitError("exact_match needs prompt/answer pairs: use format prompt_completion, alpaca or chat")
    if data_format == "chat":
        messages = chat_messages(row, where)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise LorafitError(f"{where}: conversation has no assistant message to compare with")
        prompt, reference = _render(tokenizer, messages[:last], True, where), messages[last]["content"]
        return tokenizer(prompt, add_special_tokens=False)["input_ids"], reference
    segments = example_segments(row, data_format, tokenizer, where)
    trained = [i for i, (_, is_trained) in enumerate(segments) if is_trained]
    prompt = "".join(text for text, _ in segments[: trained[-1]])
    reference = _field(row, "output" if data_format == "alpaca" else "completion", where)
    bos = _bos_to_prepend(tokenizer) if not tokenizer.chat_template else None
    return ([bos] if bos is not None else []) + tokenizer(prompt, add_special_tokens=False)["input_ids"], reference


def tokenize_segments(segments: Segments, tokenizer, train_on_inputs: bool, bos_id: int | None) -> dict[str, list[int]]:
    """One example's input_ids and labels (the reference form of what ``tokenize_chunk`` computes in batches)."""
    return _join(segments, [tokenizer(text, add_special_tokens=False)["input_ids"] for text, _ in segments if text],
                 train_on_inputs, bos_id)


def _join(segments: Segments, pieces: list[list[int]], train_on_inputs: bool,
          bos_id: int | None) -> dict[str, list[int]]:
    """Concatenate the token ids of each non-empty segment (``pieces``, in order); untrained ones get label -100."""
    input_ids: list[int] = [] if bos_id is None else [bos_id]
    labels: list[int] = [] if bos_id is None else [bos_id if train_on_inputs else IGNORE_INDEX]
    texts = (trained for text, trained in segments if text)
    for ids, trained in zip(pieces, texts, strict=True):
        input_ids += ids
        labels += ids if (trained or train_on_inputs) else [IGNORE_INDEX] * len(ids)
    return {"input_ids": input_ids, "labels": labels}


def bos_for(data: DataConfig, tokenizer) -> int | None:
    """The BOS id every example starts with, if any (chat templates write their own)."""
    return _bos_to_prepend(tokenizer) if data.format == "text" or not tokenizer.chat_template else None


def tokenize_chunk(rows: list[tuple[str, dict[str, Any]]], data: DataConfig, tokenizer,
                   bos_id: int | None) -> TokenizedChunk:
    """Tokenize and mask ``(where, row)`` pairs; truncate at max_seq_len; skip rows with nothing trainable left.

    Every segment of every row goes to the tokenizer in one batched call (a fast tokenizer's batch encodes
    each text exactly as encoding it alone would): the per-call overhead is paid once per chunk, not per text.
    """
    segments = [example_segments(row, data.format, tokenizer, where) for where, row in rows]
    texts = [text for row_segments in segments for text, _ in row_segments if text]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    chunk = TokenizedChunk(rows=len(rows))
    for index, row_segments in enumerate(segments):
        pieces = [next(encoded) for text, _ in row_segments if text]
        example = _join(row_segments, pieces, data.train_on_inputs, bos_id)
        if len(example["input_ids"]) > data.max_seq_len:
            example = {key: value[: data.max_seq_len] for key, value in example.items()}
            chunk.truncated += 1
        # Shifted by one inside the loss: label k is predicted from tokens < k, so label 0 never counts.
        if all(label == IGNORE_INDEX for label in example["labels"][1:]):
            chunk.skipped += 1  # the prompt alone fills max_seq_len: nothing left to learn from
            continue
        chunk.input_ids.append(example["input_ids"])
        chunk.labels.append(example["labels"])
        chunk.kept.append(index)
    return chunk


def tokenize_rows(rows: list[dict[str, Any]], data: DataConfig, tokenizer, source: str) -> TokenizedData:
    """Rows already in memory (``lorafit eval``, tests), tokenized in memory: no cache."""
    chunk = tokenize_chunk([(row_location(source, i), row) for i, row in enumerate(rows)], data, tokenizer,
                           bos_for(data, tokenizer))
    examples = Examples.from_lists([{"input_ids": ids, "labels": labels}
                                    for ids, labels in zip(chunk.input_ids, chunk.labels, strict=True)])
    return checked(TokenizedData(examples, source, chunk.rows, chunk.truncated, chunk.skipped), data)


class NothingToScore(LorafitError):
    """Every example of a dataset was skipped (its prompt alone fills max_seq_len)."""


def checked(tokenized: TokenizedData, data: DataConfig) -> TokenizedData:
    """Refuse a dataset with nothing to train on: empty, or every example skipped."""
    if not tokenized.rows:
        raise LorafitError(f"{tokenized.source}: the dataset is empty; it needs at least one example")
    if not len(tokenized.examples):
        raise NothingToScore(f"{tokenized.source}: all {tokenized.rows} examples were skipped because their prompt "
                           f"alone reaches data.max_seq_len={data.max_seq_len}; raise data.max_seq_len")
    return tokenized


def split_validation(train: TokenizedData, fraction: float, seed: int) -> tuple[TokenizedData, TokenizedData]:
    """Hold out ``fraction`` of the training examples (at least one), chosen by a seeded permutation."""
    count = len(train.examples)
    held = max(1, math.floor(count * fraction))
    if held >= count:
        raise LorafitError(f"data.val_fraction={fraction} leaves no training examples out of {count}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).numpy()
    keep, hold = np.sort(order[held:]), np.sort(order[:held])
    return (
        TokenizedData(train.examples.take(keep), train.source, len(keep), train.truncated, train.skipped),
        TokenizedData(train.examples.take(hold), f"{train.source} (val_fraction {fraction})", len(hold)),
    )


def collate(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row. Padding gets label -100 and is kept out of attention.

    Packed rows carry position_ids and get no attention mask (see ``pack``); their padding continues
    as one more "sequence" whose positions restart at 0, which attends only to itself and is never a target.
    """
    width = max(len(row["input_ids"]) for row in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    packed = "position_ids" in batch[0]
    extra = torch.zeros((len(batch), width), dtype=torch.long)  # position_ids if packed, else attention_mask
    for i, row in enumerate(batch):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        if packed:
            extra[i, :n] = torch.tensor(row["position_ids"])
            extra[i, n:] = torch.arange(width - n)
        else:
            extra[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "position_ids" if packed else "attention_mask": extra}


def _field(row: dict[str, Any], name: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str):
        present = ", ".join(sorted(row)) or "none"
        problem = "is missing" if value is None else f"must be text, got {type(value).__name__}"
        raise LorafitError(f"{where}: field {name!r} {problem} (fields present: {present}); "
                           "check data.format or the file")
    return value


# The roles chat templates are written for. A template renders most strings it is given as a role (ChatML
# writes any role into its header), so a typo like "usr" would otherwise train silently on a turn no
# conversation at inference time will ever contain.
CHAT_ROLES = ("system", "user", "assistant", "tool")


def chat_messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """The row's ``messages``, checked: a list of {role, content} objects whose roles are in ``CHAT_ROLES``.
    The one check every reader of chat rows (training, the token cache's workers, streaming, eval) goes through."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not all(_is_message(m) for m in messages):
        raise LorafitError(f"{where}: format chat needs 'messages': a list of {{role, content}} objects")
    for index, message in enumerate(messages):
        if message["role"] not in CHAT_ROLES:
            raise LorafitError(f"{where}: messages[{index}] has role {shown(message['role'])}, which chat templates "
                               f"do not know; use one of {', '.join(CHAT_ROLES)}")
    return messages


def _is_message(message: Any) -> bool:
    return isinstance(message, dict) and all(isinstance(message.get(key), str) for key in ("role", "content"))


def _render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool, where: str) -> str:
    """The conversation as the chat template writes it; a template that refuses it (many raise on a role
    they do not support, e.g. system, or on turns that do not alternate) is the data's problem, not a bug."""
    from jinja2 import TemplateError

    if not messages and not generation_prompt:
        return ""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as err:
        raise LorafitError(f"{where}: the tokenizer's chat template refuses this conversation: "
                           f"{shown(str(err), quote=False)}; change the row, or use format text") from None


def _bos_to_prepend(tokenizer) -> int | None:
    """Prepend BOS to plain-text examples only if this tokenizer adds one by itself (its model expects it)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


class Batches:
    """An endless, seeded stream of micro-batches, addressable by position for exact resume.

    Micro-batch ``k`` is batch ``k % per_epoch`` of epoch ``k // per_epoch``; each epoch's order is a
    permutation seeded by (seed, epoch), so no sampler state needs saving — only ``k``.

    With ``world`` processes the stream is global: micro-batch ``k`` holds ``micro_batch_size × world`` rows
    and process ``rank`` takes the ``rank``-th slice of ``micro_batch_size`` rows, so N processes together
    see exactly the rows one process with an N-times larger micro-batch sees, in the same order.
    """

    def __init__(self, rows: Sequence[dict[str, list[int]]], micro_batch_size: int, seed: int, pad_id: int,
                 rank: int = 0, world: int = 1):
        self.rows, self.micro, self.seed, self.pad_id = rows, micro_batch_size, seed, pad_id
        self.rank, self.world = rank, world
        self.size = micro_batch_size * world  # rows in one global micro-batch
        self.per_epoch = math.ceil(len(rows) / self.size)
        self._order: tuple[int, list[int]] | None = None

    def state_dict(self, position: int) -> dict:
        """Nothing beyond the position (the step) is needed to continue: see the class docstring."""
        return {}

    def load_state_dict(self, state: dict, checkpoint: Path) -> None:
        if state:
            raise LorafitError(f"{checkpoint} was written by a run with data.streaming: true; resume with it")

    def get(self, position: int) -> tuple[dict[str, torch.Tensor], int]:
        """This process's share of the micro-batch at ``position`` and its number of real (non-padding) tokens.

        At an epoch's end a share can be empty (fewer rows left than processes need); that process then runs
        one row with every label masked: it trains nothing but takes part in the gradient all-reduce."""
        chosen = self.global_rows(position)
        share = chosen[self.rank * self.micro : (self.rank + 1) * self.micro]
        if not share:
            ghost = {**chosen[0], "labels": [IGNORE_INDEX] * len(chosen[0]["labels"])}
            return collate([ghost], self.pad_id), 0
        return collate(share, self.pad_id), sum(len(row["input_ids"]) for row in share)

    def get_global(self, position: int) -> dict[str, torch.Tensor]:
        """The whole micro-batch at ``position`` (every process's share): what a rank allocation reads, so
        that every process computes the same allocation."""
        return collate(self.global_rows(position), self.pad_id)

    def global_rows(self, position: int) -> list[dict[str, list[int]]]:
        epoch, index = divmod(position, self.per_epoch)
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.rows), generator=generator))  # 8 bytes per row
        return [self.rows[i] for i in self._order[1][index * self.size : (index + 1) * self.size].tolist()]
