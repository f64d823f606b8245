"""Preference data (DPO, ORPO): rows of a prompt with a better and a worse answer -> token ids -> pair batches.

A row is either plain text or a conversation (TRL's two dataset shapes):

    {"prompt": "Convert ...", "chosen": "2021-03-03", "rejected": "2021-03-03 (a Wednesday)"}
    {"chosen":   [{"role": "user", "content": "..."}, {"role": "assistant", "content": "2021-03-03"}],
     "rejected": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "2021-03-03 ..."}]}

A conversation's prompt is the shared message prefix (every message but the last, which must be the
assistant's answer, in both lists); TRL's explicit form, ``"prompt": [messages]`` with one assistant message
in each of ``chosen`` and ``rejected``, is read too. Each answer is rendered exactly as the ``prompt_completion``
and ``chat`` formats render a trained turn (``lorafit.data.prompt_completion_segments`` / ``chat_segments``):
with a chat template the prompt is the conversation up to the generation prompt and the answer is what the
template adds after it, end-of-turn included; without one the answer is the text plus EOS and the prompt gets
the BOS the tokenizer would add. Prompt and answers are tokenized separately, the same token boundary the
model is asked to continue from at inference (and the same as SFT on the same rows).

Tokenized pair: ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` (TRL's names). Only answer tokens are trained.

Truncation at ``max_seq_len``, TRL's rule (``DataCollatorForPreference``, truncation_mode ``keep_start``, the only
mode ``DPOConfig`` accepts): the start of prompt + answer is kept, i.e. the prompt whole and each answer cut to
``max_seq_len - len(prompt_ids)`` tokens — the same budget for both answers. TRL silently drops a pair whose
prompt alone fills ``max_seq_len``; here that pair is an error naming its row, since it says max_seq_len is
too small for the data (or the row is not what the user thinks).

Batches (``collate_pairs``): chosen and rejected go through the model in ONE batch, rows 0..B-1 prompt +
chosen and rows B..2B-1 prompt + rejected (TRL's layout), right-padded; labels are -100 on the prompt and on
padding, decided by position (never by comparing ids with the pad id, often the same as EOS).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lorafit.config import shown
from lorafit.data import (
    CHAT_ROLES,
    _bos_to_prepend,
    chat_segments,
    iter_rows,
    prompt_completion_segments,
    row_location,
)
from lorafit.errors import LorafitError
from lorafit.examples import IGNORE_INDEX

Pair = dict[str, list]  # prompt_ids, chosen_ids, rejected_ids (token ids); REF_LOGPS when precomputed (floats)
REF_LOGPS = "ref_logps"  # [chosen, rejected] summed log-probs of a pair's answers under DPO's reference
FIX = "each row needs a prompt with a better (chosen) and a worse (rejected) answer"


@dataclass
class PreferenceData:
    """Tokenized pairs plus what happened on the way, for the run summary."""

    pairs: list[Pair]
    source: str
    rows: int
    truncated: int = 0  # pairs with at least one answer cut at max_seq_len
    skipped: int = 0  # never: a bad pair is an error (the run summary reads it as for SFT data)

    @property
    def examples(self) -> list[Pair]:
        """The pairs, under the name the run summary reads for SFT data."""
        return self.pairs

    @property
    def trained_tokens(self) -> int:
        return sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in self.pairs)


@dataclass
class PreferenceChunk:
    pairs: list[Pair] = field(default_factory=list)
    rows: int = 0
    truncated: int = 0


def preference_texts(row: dict[str, Any], tokenizer, where: str) -> tuple[str, str, str]:
    """One row -> (prompt text, chosen answer text, rejected answer text), rendered as training renders them.
    Every problem with the row is one ``LorafitError`` that starts with ``where`` ("file:line")."""
    if not isinstance(row, dict):
        raise LorafitError(f"{where}: a preference row must be an object; {FIX}")
    conversational = isinstance(row.get("chosen"), list) or isinstance(row.get("rejected"), list)
    if conversational:
        prefix, chosen, rejected = _conversation(row, where)
        if not tokenizer.chat_template:
            raise LorafitError(f"{where}: conversational preference rows need a tokenizer with a chat template; this "
                               "one has none (write the row as prompt/chosen/rejected strings instead)")
        chosen_segments = chat_segments(prefix + [chosen], tokenizer, where)
        rejected_segments = chat_segments(prefix + [rejected], tokenizer, where)
    else:
        prompt, chosen, rejected = (_text(row, name, where) for name in ("prompt", "chosen", "rejected"))
        _check_answers(chosen, rejected, where)
        chosen_segments = prompt_completion_segments(prompt, chosen, tokenizer, where)
        rejected_segments = prompt_completion_segments(prompt, rejected, tokenizer, where)
    # The last segment is the answer (trained); everything before it is the prompt, identical for both.
    prompt_text = "".join(text for text, _ in chosen_segments[:-1])
    if "".join(text for text, _ in rejected_segments[:-1]) != prompt_text:
        raise LorafitError(f"{where}: the chat template renders the shared prompt differently before the chosen and "
                           "the rejected answer; use the prompt/chosen/rejected string form")
    return prompt_text, chosen_segments[-1][0], rejected_segments[-1][0]


def _text(row: dict[str, Any], name: str, where: str) -> str:
    value = row.get(name)
    if isinstance(value, str):
        return value
    present = ", ".join(sorted(map(str, row))) or "none"
    problem = "is missing" if name not in row or value is None else f"must be text, got {type(value).__name__}"
    raise LorafitError(f"{where}: field {name!r} {problem} (fields present: {present}); {FIX}: "
                       '{"prompt": str, "chosen": str, "rejected": str}, or chosen/rejected as conversations')


def _check_answers(chosen: str, rejected: str, where: str) -> None:
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer.strip():
            raise LorafitError(f"{where}: the {name} answer is empty; {FIX}")
    if chosen == rejected:
        raise LorafitError(f"{where}: chosen and rejected are the same answer ({shown(chosen)}), which teaches "
                           "nothing; fix or drop the row")


def _conversation(row: dict[str, Any], where: str) -> tuple[list[dict[str, str]], dict[str, str], dict[str, str]]:
    """(prompt messages, chosen answer message, rejected answer message) of a conversational row."""
    lists = {}
    for name in ("chosen", "rejected"):
        value = row.get(name)
        if value is None:
            raise LorafitError(f"{where}: field {name!r} is missing; {FIX} (here as conversations)")
        if not isinstance(value, list) or not value or not all(_is_message(m) for m in value):
            raise LorafitError(f"{where}: field {name!r} must be a non-empty list of {{role, content}} messages "
                               f"with text content, got {shown(value)}")
        for index, message in enumerate(value):
            if message["role"] not in CHAT_ROLES:
                raise LorafitError(f"{where}: {name}[{index}] has role {shown(message['role'])}, which chat "
                                   f"templates do not know; use one of {', '.join(CHAT_ROLES)}")
        lists[name] = value
    explicit = row.get("prompt")
    if explicit is not None:  # TRL's explicit-prompt form: the answers are one assistant message each
        if not isinstance(explicit, list) or not all(_is_message(m) for m in explicit):
            raise LorafitError(f"{where}: with conversational answers, 'prompt' must be a list of {{role, content}} "
                               "messages (or left out: the shared prefix of chosen and rejected), got "
                               f"{shown(explicit)}")
        for name, messages in lists.items():
            if len(messages) != 1:
                raise LorafitError(f"{where}: with an explicit 'prompt', {name!r} must be one assistant message, "
                                   f"got {len(messages)} messages")
        prefix, chosen, rejected = explicit, lists["chosen"][0], lists["rejected"][0]
    else:
        chosen_list, rejected_list = lists["chosen"], lists["rejected"]
        if chosen_list[:-1] != rejected_list[:-1]:
            first = next((i for i, (a, b) in enumerate(zip(chosen_list, rejected_list, strict=False)) if a != b),
                         min(len(chosen_list), len(rejected_list)) - 1)
            raise LorafitError(f"{where}: chosen and rejected must be the same conversation up to their last message "
                               f"(the prompt), then differ in the assistant's answer; they first differ at message "
                               f"{first} (chosen has {len(chosen_list)} messages, rejected {len(rejected_list)})")
        prefix, chosen, rejected = chosen_list[:-1], chosen_list[-1], rejected_list[-1]
    for name, message in (("chosen", chosen), ("rejected", rejected)):
        if message["role"] != "assistant":
            raise LorafitError(f"{where}: the last message of {name!r} must be the assistant's answer, got role "
                               f"{shown(message['role'])}")
    _check_answers(chosen["content"], rejected["content"], where)
    return prefix, chosen, rejected


def _is_message(message: Any) -> bool:
    return isinstance(message, dict) and all(isinstance(message.get(key), str) for key in ("role", "content"))


def tokenize_pairs(rows: Sequence[tuple[str, dict[str, Any]]], tokenizer, max_seq_len: int) -> PreferenceChunk:
    """``(where, row)`` pairs -> tokenized, truncated pairs (the module docstring has the rules).

    Every text of the chunk goes to the tokenizer in one batched call, as ``lorafit.data.tokenize_chunk`` does.
    """
    texts = [preference_texts(row, tokenizer, where) for where, row in rows]
    bos = None if tokenizer.chat_template else _bos_to_prepend(tokenizer)
    flat = [text for triple in texts for text in triple]
    encoded = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    chunk = PreferenceChunk(rows=len(rows))
    for index, (where, _) in enumerate(rows):
        prompt_ids, chosen_ids, rejected_ids = encoded[3 * index : 3 * index + 3]
        prompt_ids = ([bos] if bos is not None else []) + list(prompt_ids)
        for name, ids in (("chosen", chosen_ids), ("rejected", rejected_ids)):
            if not ids:  # e.g. an answer the tokenizer maps to nothing
                raise LorafitError(f"{where}: the {name} answer has no tokens; {FIX}")
        budget = max_seq_len - len(prompt_ids)
        if budget < 1:
            raise LorafitError(f"{where}: the prompt alone is {len(prompt_ids)} tokens, so at data.max_seq_len="
                               f"{max_seq_len} both answers would be cut to nothing; raise data.max_seq_len above "
                               f"{len(prompt_ids)} or shorten the prompt")
        if len(chosen_ids) > budget or len(rejected_ids) > budget:
            chunk.truncated += 1
        chunk.pairs.append({"prompt_ids": prompt_ids, "chosen_ids": list(chosen_ids[:budget]),
                            "rejected_ids": list(rejected_ids[:budget])})
    return chunk


def tokenize_preference_rows(rows: Sequence[dict[str, Any]], tokenizer, max_seq_len: int,
                             source: str) -> PreferenceData:
    """Rows already in memory (eval, tests) -> checked PreferenceData; errors name ``source``'s lines."""
    located = [(row_location(source, i), row) for i, row in enumerate(rows)]
    chunk = tokenize_pairs(located, tokenizer, max_seq_len)
    return _checked(PreferenceData(chunk.pairs, source, chunk.rows, chunk.truncated))


def load_preference(source: str, tokenizer, max_seq_len: int, chunk_rows: int = 1000) -> PreferenceData:
    """A preference file (jsonl/json/csv/parquet) or hub dataset, read as ``lorafit.data`` reads any data."""
    data = PreferenceData([], source, 0)
    for rows in _chunks(iter_rows(source), chunk_rows):
        chunk = tokenize_pairs(rows, tokenizer, max_seq_len)
        data.pairs += chunk.pairs
        data.rows += chunk.rows
        data.truncated += chunk.truncated
    return _checked(data)


def _chunks(items: Iterable, size: int) -> Iterable[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _checked(data: PreferenceData) -> PreferenceData:
    if not data.rows:
        raise LorafitError(f"{data.source}: the dataset is empty; it needs at least one preference pair")
    return data


def collate_pairs(pairs: Sequence[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> one batch of 2B rows: 0..B-1 prompt + chosen, B..2B-1 prompt + rejected, right-padded.

    input_ids (2B, T) padded with ``pad_id``; attention_mask (2B, T) 1 on real tokens; labels (2B, T) the token on
    answer positions, -100 on the prompt and on padding (by position). Pairs that carry precomputed reference
    log-probs (``REF_LOGPS``: lorafit/reference_cache.py) add ref_chosen_logps and ref_rejected_logps (B,) fp32.
    """
    rows = [(p["prompt_ids"], p["chosen_ids"]) for p in pairs] + [(p["prompt_ids"], p["rejected_ids"]) for p in pairs]
    width = max(len(prompt) + len(answer) for prompt, answer in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, answer) in enumerate(rows):
        start, end = len(prompt), len(prompt) + len(answer)
        input_ids[i, :end] = torch.tensor(list(prompt) + list(answer), dtype=torch.long)
        attention_mask[i, :end] = 1
        labels[i, start:end] = torch.tensor(list(answer), dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if pairs and all(REF_LOGPS in p for p in pairs):
        reference = torch.tensor([p[REF_LOGPS] for p in pairs], dtype=torch.float32)  # (B, 2)
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = reference[:, 0], reference[:, 1]
    return batch
