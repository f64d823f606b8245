"""Formats, masking token by token, truncation, packing and bad-data errors, on a character tokenizer."""

import json

import pytest
import torch

from lorafit import token_cache
from lorafit.config import DataConfig, LoRAConfig
from lorafit.data import IGNORE_INDEX, collate, generation_example, load_rows, row_location, tokenize_rows
from lorafit.errors import LorafitError
from lorafit.examples import PackedRows
from lorafit.inject import inject_lora
from lorafit.loss import token_loss_sum
from lorafit.streaming import StreamBatches
from lorafit.token_cache import load_tokenized

from .conftest import tiny_model, tiny_tokenizer
from .tolerance import assert_close_by_rule, reduction_through

PROMPT_ROWS = [
    {"prompt": "3 Mar 2021", "completion": "2021-03-03"},
    {"prompt": "May 1, 1999", "completion": "1999-05-01"},
]


def data_config(path, **overrides) -> DataConfig:
    return DataConfig(train=str(path), **overrides)


def split(example, tokenizer) -> tuple[str, str]:
    """(untrained text, trained text) of one example, decoded token by token."""
    ids, labels = example["input_ids"], example["labels"]
    untrained = "".join(tokenizer.convert_ids_to_tokens([i for i, lab in zip(ids, labels) if lab == IGNORE_INDEX]))
    trained = "".join(tokenizer.convert_ids_to_tokens([lab for lab in labels if lab != IGNORE_INDEX]))
    return untrained, trained


def tokenize(rows, tokenizer=None, **config):
    tokenizer = tokenizer or tiny_tokenizer()
    return tokenize_rows(rows, DataConfig(train="x.jsonl", **config), tokenizer, "x.jsonl"), tokenizer


def test_prompt_completion_with_chat_template_trains_completion_and_end_of_turn():
    data, tokenizer = tokenize(PROMPT_ROWS)
    untrained, trained = split(data.examples[0], tokenizer)
    assert untrained == "<|im_start|>user\n3 Mar 2021<|im_end|>\n<|im_start|>assistant\n"
    assert trained == "2021-03-03<|im_end|>\n"
    assert tokenizer.eos_token_id in [lab for lab in data.examples[0]["labels"] if lab != IGNORE_INDEX]
    # masked positions are exactly a prefix here, and labels equal input_ids where trained
    ex = data.examples[0]
    assert all(lab in (IGNORE_INDEX, tok) for tok, lab in zip(ex["input_ids"], ex["labels"]))
    assert data.trained_tokens == 2 * len("2021-03-03") + 2 * 2


def test_prompt_completion_without_template_is_concatenation_plus_eos():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    data, _ = tokenize(PROMPT_ROWS, tokenizer)
    untrained, trained = split(data.examples[0], tokenizer)
    assert (untrained, trained) == ("3 Mar 2021", "2021-03-03<|im_end|>")


def test_alpaca_instruction_and_input_form_the_prompt():
    rows = [{"instruction": "Add", "input": "1+1", "output": "2"}, {"instruction": "Say hi", "output": "hi"}]
    data, tokenizer = tokenize(rows, format="alpaca")
    assert split(data.examples[0], tokenizer) == ("<|im_start|>user\nAdd\n\n1+1<|im_end|>\n<|im_start|>assistant\n",
                                                  "2<|im_end|>\n")
    assert split(data.examples[1], tokenizer)[1] == "hi<|im_end|>\n"


def test_chat_trains_every_assistant_turn_only():
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"},
    ]
    data, tokenizer = tokenize([{"messages": messages}], format="chat")
    ex = data.examples[0]
    trained_runs, run = [], []
    for tok, lab in zip(ex["input_ids"], ex["labels"]):
        if lab != IGNORE_INDEX:
            run.append(tok)
        elif run:
            trained_runs.append("".join(tokenizer.convert_ids_to_tokens(run)))
            run = []
    trained_runs += ["".join(tokenizer.convert_ids_to_tokens(run))] if run else []
    assert trained_runs == ["yo<|im_end|>\n", "ciao<|im_end|>\n"]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert "".join(tokenizer.convert_ids_to_tokens(ex["input_ids"])) == rendered


def test_text_trains_everything_and_ends_with_eos():
    data, tokenizer = tokenize([{"text": "hello world"}], format="text")
    ex = data.examples[0]
    assert ex["labels"] == ex["input_ids"]
    assert ex["input_ids"][-1] == tokenizer.eos_token_id


def test_train_on_inputs_labels_every_token():
    data, _ = tokenize(PROMPT_ROWS, train_on_inputs=True)
    assert all(ex["labels"] == ex["input_ids"] for ex in data.examples)


def test_truncation_is_counted_and_long_prompts_skipped():
    rows = PROMPT_ROWS + [{"prompt": "x" * 200, "completion": "y"}]
    data, _ = tokenize(rows, max_seq_len=40)
    assert data.skipped == 1 and len(data.examples) == 2
    assert all(len(ex["input_ids"]) <= 40 for ex in data.examples)
    data, _ = tokenize([{"prompt": "ab", "completion": "z" * 100}], max_seq_len=30)
    assert data.truncated == 1 and len(data.examples[0]["input_ids"]) == 30
    with pytest.raises(LorafitError, match="all 1 examples were skipped.*raise data.max_seq_len"):
        tokenize([{"prompt": "x" * 200, "completion": "y"}], max_seq_len=40)


def test_packing_loss_equals_unpacked_loss():
    rows = [{"prompt": f"date {i} " * (i % 4 + 1), "completion": f"{1990 + i}-01-0{i % 9 + 1}"} for i in range(7)]
    data, tokenizer = tokenize(rows, max_seq_len=128)
    model = tiny_model()
    inject_lora(model, LoRAConfig(r=2, alpha=4))
    pad = tokenizer.pad_token_id or 0
    with torch.no_grad():
        unpacked = sum(float(token_loss_sum(model, collate([ex], pad))) for ex in data.examples)
        packed_rows = list(PackedRows(data.examples, 128))
        assert len(packed_rows) < len(data.examples)  # it really packed
        packed = float(token_loss_sum(model, collate(packed_rows, pad)))
        # attention leakage would change the later examples' losses by far more than this
        leaky = collate(packed_rows, pad)
        leaky["position_ids"] = torch.arange(leaky["input_ids"].shape[1]).expand_as(leaky["input_ids"])
        leaked = float(token_loss_sum(model, leaky))
    # One sum over every token either way, in another order and through other attention shapes: the rule.
    assert_close_by_rule(packed, unpacked, reduction=reduction_through(model, tokens=data.trained_tokens),
                         dtype=torch.float32)
    assert abs(leaked - unpacked) > 1e-3
    assert sum(sum(lab != IGNORE_INDEX for lab in r["labels"]) for r in packed_rows) == data.trained_tokens


def test_collate_pads_with_ignored_labels():
    data, tokenizer = tokenize(PROMPT_ROWS)
    batch = collate(data.examples, pad_id=0)
    lengths = [len(ex["input_ids"]) for ex in data.examples]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    short = lengths.index(min(lengths))
    assert (batch["labels"][short, min(lengths):] == IGNORE_INDEX).all()


def test_file_formats_read_as_text(tmp_path):
    (tmp_path / "a.csv").write_text("prompt,completion\nMarch 3 2021,2021-03-03\n")
    (tmp_path / "a.json").write_text(json.dumps([{"prompt": "p", "completion": "2021-03-03"}]))
    (tmp_path / "a.txt").write_text("line one\n\nline two\n")
    assert load_rows(str(tmp_path / "a.csv")) == [{"prompt": "March 3 2021", "completion": "2021-03-03"}]
    assert load_rows(str(tmp_path / "a.json"))[0]["completion"] == "2021-03-03"  # a string, not a timestamp
    assert load_rows(str(tmp_path / "a.txt")) == [{"text": "line one"}, {"text": "line two"}]


def test_parquet_through_datasets(tmp_path):
    import datasets

    datasets.Dataset.from_list(PROMPT_ROWS).to_parquet(str(tmp_path / "a.parquet"))
    assert load_rows(str(tmp_path / "a.parquet")) == PROMPT_ROWS


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n', r"x\.jsonl:2: not valid JSON"),
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', r"x\.jsonl:2: field 'completion' is missing"),
        ('{"prompt": "a", "completion": 5}\n', r"x\.jsonl:1: field 'completion' must be text, got int"),
        ("", r"x\.jsonl: the dataset is empty"),
        ('["a"]\n', r"x\.jsonl:1: each line must be a JSON object"),
    ],
    ids=["bad-json", "missing-field", "wrong-type", "empty", "not-object"],
)
def test_bad_data_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "x.jsonl"
    path.write_text(content)
    with pytest.raises(LorafitError, match=message):
        load_tokenized(str(path), data_config(path), tiny_tokenizer())


def test_csv_error_line_counts_header(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("prompt,answer\na,b\n")
    with pytest.raises(LorafitError, match=r"x\.csv:2: field 'completion' is missing"):
        load_tokenized(str(path), data_config(path), tiny_tokenizer())


def test_chat_rows_must_hold_messages(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"messages": [{"role": "user"}]}\n')
    with pytest.raises(LorafitError, match=r"x\.jsonl:1: format chat needs 'messages'"):
        load_tokenized(str(path), data_config(path, format="chat"), tiny_tokenizer())
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(LorafitError, match="no assistant message"):
        load_tokenized(str(path), data_config(path, format="chat"), tiny_tokenizer())


CHAT_ROW = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "yo"}]}
BAD_ROLE = r"x\.jsonl:6: messages\[1\] has role 'usr', which chat templates do not know; use one of system, user, "


def read_chat_rows(how: str, path, tokenizer) -> None:
    """Read the chat rows of ``path`` the way one part of lorafit does."""
    data = data_config(path, format="chat", streaming=how == "stream")
    if how == "cache":
        load_tokenized(str(path), data, tokenizer)
    elif how == "stream":
        StreamBatches(str(path), data, tokenizer, micro_batch_size=8, pad_id=0).get(0)
    elif how == "eval":  # exact_match's prompts, as lorafit/evaluate.py builds them
        for index, row in enumerate(load_rows(str(path))):
            generation_example(row, "chat", tokenizer, row_location(str(path), index))
    else:
        tokenize_rows(load_rows(str(path)), data, tokenizer, str(path))


@pytest.mark.parametrize("how", ["cache", "stream", "eval", "memory"])
def test_chat_role_a_template_does_not_know_is_refused_with_file_line_and_roles(tmp_path, monkeypatch, how):
    """ChatML renders any role, so "usr" would train as a turn no conversation ever has; every reader refuses it,
    the token cache's worker processes included (chunks of 2 rows: 4 chunks, the bad row in the third)."""
    monkeypatch.setattr(token_cache, "CHUNK_ROWS", 2)
    path = tmp_path / "x.jsonl"
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "usr", "content": "yo"},
                        {"role": "assistant", "content": "ok"}]}
    rows = [CHAT_ROW] * 5 + [bad] + [CHAT_ROW] * 2
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = tiny_tokenizer()
    assert "usr" in tokenizer.apply_chat_template(bad["messages"], tokenize=False)  # the template alone takes it
    with pytest.raises(LorafitError, match=BAD_ROLE + "assistant, tool$"):
        read_chat_rows(how, path, tokenizer)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows[:5]))
    read_chat_rows(how, path, tokenizer)  # the same rows without the bad one are read without complaint


def test_chat_roles_are_quoted_short_and_tool_turns_are_accepted(tmp_path):
    path = tmp_path / "x.jsonl"
    tool = {"messages": [{"role": "user", "content": "time?"}, {"role": "assistant", "content": "call clock"},
                         {"role": "tool", "content": "12:00"}, {"role": "assistant", "content": "noon"}]}
    long_role = {"messages": [{"role": "u\n" * 500, "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path.write_text(json.dumps(tool) + "\n" + json.dumps(long_role) + "\n")
    with pytest.raises(LorafitError, match=r"x\.jsonl:2: messages\[0\] has role 'u\\nu\\n") as err:
        load_tokenized(str(path), data_config(path, format="chat"), tiny_tokenizer())
    assert len(str(err.value)) < 250 and "\n" not in str(err.value)
    path.write_text(json.dumps(tool) + "\n")
    data = load_tokenized(str(path), data_config(path, format="chat"), tiny_tokenizer())
    assert data.rows == 1 and len(data.examples) == 1


def test_a_chat_template_that_refuses_a_conversation_names_file_and_line(tmp_path):
    """Many templates raise on a role they do not support (Gemma's and Mistral's on system): that is the
    data's problem, reported like one, not a traceback from inside jinja."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}"
                               "{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}"
                               "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"messages": CHAT_ROW["messages"][1:]}) + "\n" + json.dumps(CHAT_ROW) + "\n")
    message = r"x\.jsonl:2: the tokenizer's chat template refuses this conversation: System role not supported"
    with pytest.raises(LorafitError, match=message):
        load_tokenized(str(path), data_config(path, format="chat"), tokenizer)


def test_unreachable_hub_dataset():
    with pytest.raises(LorafitError, match="tried as a hub dataset"):
        load_rows("no-such-org/no-such-dataset-xyz")
