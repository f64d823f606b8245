"""Preference data (lorafit/preference.py) and the DPO / ORPO objectives (lorafit/objectives.py).

Oracles: lorafit's own SFT tokenization (a pair's prompt + chosen is exactly the prompt_completion / chat
example of the same row), TRL's tokenization of conversational pairs, and TRL's trainers on the same tiny model,
adapter and batch: ``DPOTrainer.compute_loss`` (loss_type "sigmoid", reference = adapter disabled, or the
"ref" copy of a starting adapter) and the experimental ``ORPOTrainer.get_batch_loss_metrics``.

Tolerances follow tests/README.md: fp32 eps, reduction = ``reduction_through(model, tokens)`` (every weight
matrix of the 2-layer Llama plus the tokens of the batch that a loss or a weight gradient sums), magnitude of
the expected value — for these shapes atol is max(1e-5, 2·eps·sqrt(~1000)·|x|), about 1.5e-5·|x|.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lorafit.data import _bos_to_prepend, prompt_completion_segments, tokenize_segments
from lorafit.errors import LorafitError
from lorafit.examples import IGNORE_INDEX
from lorafit.objectives import (
    DPOObjective,
    ORPOObjective,
    answer_tokens,
    batch_logps,
    dpo_loss,
    orpo_odds_ratio,
    preference_scores,
    reference_under,
    sequence_logps,
    sft_objective,
    split_pairs,
)
from lorafit.preference import collate_pairs, load_preference, preference_texts, tokenize_preference_rows

from .conftest import peft_grads, randomize_lora_B, tiny_model, tiny_tokenizer
from .tolerance import assert_close_by_rule, reduction_through

ROWS = [
    {"prompt": "Convert 3 Mar 2021", "chosen": "2021-03-03", "rejected": "2021-03-03 (a Wednesday)"},
    {"prompt": "Convert May 4, 1999", "chosen": "1999-05-04", "rejected": "1999-04-05"},
    {"prompt": "Convert the 9th of June, 1961", "chosen": "1961-06-09", "rejected": "2061-06-09"},
]


def conversation(row: dict) -> dict:
    def turns(answer: str) -> list[dict]:
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": answer}]

    return {"chosen": turns(row["chosen"]), "rejected": turns(row["rejected"])}


def pad_id(tokenizer) -> int:
    return tokenizer.eos_token_id  # the tiny tokenizer has no pad token; EOS as pad is the hard case for masking


# ---------------------------------------------------------------------------------------------- data rules


def test_string_pairs_tokenize_exactly_as_the_sft_format_does():
    """prompt + chosen of a pair is the prompt_completion example of (prompt, chosen), token for token, mask
    included — with the chat template (user turn + generation prompt, answer + end of turn) and without one."""
    for template in (True, False):
        tokenizer = tiny_tokenizer()
        if not template:
            tokenizer.chat_template = None
        data = tokenize_preference_rows(ROWS, tokenizer, 256, "x.jsonl")
        for row, pair in zip(ROWS, data.pairs, strict=True):
            for answer in ("chosen", "rejected"):
                segments = prompt_completion_segments(row["prompt"], row[answer], tokenizer, "x")
                bos = None if template else _bos_to_prepend(tokenizer)
                sft = tokenize_segments(segments, tokenizer, train_on_inputs=False, bos_id=bos)
                assert pair["prompt_ids"] + pair[f"{answer}_ids"] == sft["input_ids"]
                assert [IGNORE_INDEX] * len(pair["prompt_ids"]) + pair[f"{answer}_ids"] == sft["labels"]
        if template:
            prompt, chosen, _ = preference_texts(ROWS[0], tokenizer, "x")
            assert prompt == "<|im_start|>user\nConvert 3 Mar 2021<|im_end|>\n<|im_start|>assistant\n"
            assert chosen == "2021-03-03<|im_end|>\n"
        else:
            assert data.pairs[0]["chosen_ids"][-1] == tokenizer.eos_token_id


def test_conversational_forms_match_the_string_form_and_trl(trl_dpo):
    """The implicit-prompt conversation (shared prefix), TRL's explicit-prompt form and the string form (with a
    chat template) give the same ids; and TRL's own tokenization of the conversations gives them too."""
    tokenizer = tiny_tokenizer()
    strings = tokenize_preference_rows(ROWS, tokenizer, 256, "s.jsonl").pairs
    implicit = tokenize_preference_rows([conversation(r) for r in ROWS], tokenizer, 256, "c.jsonl").pairs
    explicit_rows = [{"prompt": conversation(r)["chosen"][:1], "chosen": conversation(r)["chosen"][1:],
                      "rejected": conversation(r)["rejected"][1:]} for r in ROWS]
    explicit = tokenize_preference_rows(explicit_rows, tokenizer, 256, "e.jsonl").pairs
    assert strings == implicit == explicit
    theirs = trl_dpo([conversation(r) for r in ROWS]).train_dataset
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    assert [{k: theirs[i][k] for k in keys} for i in range(len(ROWS))] == implicit


def test_a_multi_turn_prefix_is_all_prompt():
    tokenizer = tiny_tokenizer()
    prefix = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
              {"role": "assistant", "content": "hello"}, {"role": "user", "content": "date?"}]
    row = {"chosen": prefix + [{"role": "assistant", "content": "2020-01-01"}],
           "rejected": prefix + [{"role": "assistant", "content": "2020-01-02"}]}
    prompt, chosen, rejected = preference_texts(row, tokenizer, "x")
    assert prompt == tokenizer.apply_chat_template(prefix, tokenize=False, add_generation_prompt=True)
    assert (chosen, rejected) == ("2020-01-01<|im_end|>\n", "2020-01-02<|im_end|>\n")


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


BAD_ROWS = {
    "missing prompt": ({"chosen": "a", "rejected": "b"}, "field 'prompt' is missing"),
    "missing chosen": ({"prompt": "p", "rejected": "b"}, "field 'chosen' is missing"),
    "missing rejected": ({"prompt": "p", "chosen": "a"}, "field 'rejected' is missing"),
    "null rejected": ({"prompt": "p", "chosen": "a", "rejected": None}, "field 'rejected' is missing"),
    "non-string chosen": ({"prompt": "p", "chosen": 5, "rejected": "b"}, "field 'chosen' must be text, got int"),
    "non-string prompt": ({"prompt": ["p"], "chosen": "a", "rejected": "b"}, "field 'prompt' must be text, got list"),
    "empty chosen": ({"prompt": "p", "chosen": "", "rejected": "b"}, "the chosen answer is empty"),
    "blank rejected": ({"prompt": "p", "chosen": "a", "rejected": " \n"}, "the rejected answer is empty"),
    "identical": ({"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen and rejected are the same answer"),
    "conversation prefixes differ": ({"chosen": [user("p"), bot("a")], "rejected": [user("q"), bot("b")]},
                                     "they first differ at message 0"),
    "conversation lengths differ": ({"chosen": [user("p"), bot("a")], "rejected": [user("p"), bot("x"), bot("b")]},
                                    "same conversation up to their last message"),
    "last message not assistant": ({"chosen": [user("p"), bot("a")], "rejected": [user("p"), user("b")]},
                                   "last message of 'rejected' must be the assistant's answer"),
    "identical conversation answers": ({"chosen": [user("p"), bot("a")], "rejected": [user("p"), bot("a")]},
                                       "chosen and rejected are the same answer"),
    "empty conversation answer": ({"chosen": [user("p"), bot("")], "rejected": [user("p"), bot("b")]},
                                  "the chosen answer is empty"),
    "conversation missing rejected": ({"chosen": [user("p"), bot("a")]}, "field 'rejected' is missing"),
    "non-message in conversation": ({"chosen": [user("p"), "a"], "rejected": [user("p"), bot("b")]},
                                    "field 'chosen' must be a non-empty list of {role, content} messages"),
    "unknown role": ({"chosen": [{"role": "usr", "content": "p"}, bot("a")],
                      "rejected": [{"role": "usr", "content": "p"}, bot("b")]}, "chosen[0] has role 'usr'"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_each_bad_row_is_one_clear_error_at_its_line(tmp_path: Path, case: str):
    row, expected = BAD_ROWS[case]
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(row) + "\n")  # the bad row is on line 3
    with pytest.raises(LorafitError) as error:
        load_preference(str(path), tiny_tokenizer(), 256)
    message = str(error.value)
    assert message.startswith(f"{path}:3: "), message
    assert expected in message, message


def test_conversations_need_a_chat_template():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(LorafitError, match="x.jsonl:2: conversational preference rows need a tokenizer with a chat"):
        tokenize_preference_rows([ROWS[0], conversation(ROWS[1])], tokenizer, 256, "x.jsonl")


def test_truncation_keeps_the_prompt_and_cuts_both_answers_to_the_same_budget():
    """TRL's keep_start rule: prompt + answer cut to max_seq_len from the end, so each answer keeps
    max_seq_len - len(prompt) tokens; a pair that fits is untouched."""
    tokenizer = tiny_tokenizer()
    full = tokenize_preference_rows(ROWS, tokenizer, 256, "x.jsonl")
    prompt = len(full.pairs[0]["prompt_ids"])
    budget = len(full.pairs[0]["chosen_ids"]) - 2  # chosen is shorter than rejected in ROWS[0]: both get cut
    cut = tokenize_preference_rows(ROWS[:1], tokenizer, prompt + budget, "x.jsonl")
    assert cut.truncated == 1 and full.truncated == 0
    (pair,) = cut.pairs
    assert pair["prompt_ids"] == full.pairs[0]["prompt_ids"]
    assert pair["chosen_ids"] == full.pairs[0]["chosen_ids"][:budget]
    assert pair["rejected_ids"] == full.pairs[0]["rejected_ids"][:budget]
    assert len(pair["chosen_ids"]) == len(pair["rejected_ids"]) == budget
    one = tokenize_preference_rows(ROWS[:1], tokenizer, prompt + 1, "x.jsonl").pairs[0]  # the least that is kept
    assert len(one["chosen_ids"]) == len(one["rejected_ids"]) == 1


def test_a_pair_cut_to_nothing_is_an_error_with_its_row():
    tokenizer = tiny_tokenizer()
    prompt = len(tokenize_preference_rows(ROWS[1:2], tokenizer, 256, "x.jsonl").pairs[0]["prompt_ids"])
    rows = [ROWS[0] | {"prompt": "x"}, ROWS[1]]  # row 0's prompt is short, row 1's fills max_seq_len
    with pytest.raises(LorafitError, match=rf"^x.jsonl:2: the prompt alone is {prompt} tokens, so at "
                                           rf"data.max_seq_len={prompt} both answers would be cut to nothing"):
        tokenize_preference_rows(rows, tokenizer, prompt, "x.jsonl")


def test_collate_puts_chosen_then_rejected_in_one_batch_masked_by_position():
    pairs = [{"prompt_ids": [1, 5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 2]},
             {"prompt_ids": [1, 5], "chosen_ids": [2], "rejected_ids": [7, 7, 7, 2]}]
    batch = collate_pairs(pairs, pad_id=2)  # pad id == EOS id (2): padding still gets label -100, EOS keeps its label
    P = IGNORE_INDEX
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2, 2], [1, 5, 2, 2, 2, 2],
                                           [1, 5, 6, 8, 9, 2], [1, 5, 7, 7, 7, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0],
                                                [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[P, P, P, 7, 2, P], [P, P, 2, P, P, P],
                                        [P, P, P, 8, 9, 2], [P, P, 7, 7, 7, 2]]
    assert answer_tokens(batch["labels"]).tolist() == [2, 1, 3, 4]
    assert "ref_chosen_logps" not in batch  # only pairs with precomputed reference log-probs carry them
    with_reference = [{**pair, "ref_logps": [-1.5 - k, -7.25 - k]} for k, pair in enumerate(pairs)]
    batch = collate_pairs(with_reference, pad_id=2)
    assert batch["ref_chosen_logps"].tolist() == [-1.5, -2.5] and batch["ref_rejected_logps"].tolist() == [-7.25, -8.25]
    assert batch["ref_chosen_logps"].dtype == torch.float32


# ---------------------------------------------------------------------------------------------- objectives


def lorafit_adapter_model(seed: int = 3):
    """The tiny Llama with a lorafit LoRA (all-linear, r 4, alpha 8) whose B is random: a trainable perturbation."""
    from lorafit.config import LoRAConfig
    from lorafit.inject import inject_lora

    model = tiny_model()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_lora_B(model, seed=seed)
    return model


@contextlib.contextmanager
def adapters_off(model):
    """The reference policy for a fresh adapter: every adapter layer computes its base layer alone. A stand-in,
    for these tests, for the adapter layers' own switch (it changes no parameter, so a policy graph already
    built keeps its saved tensors valid)."""
    from lorafit.inject import lora_modules

    modules = list(lora_modules(model).values())
    for module in modules:
        module.forward = module.base_layer.forward
    try:
        yield
    finally:
        for module in modules:
            del module.forward


def lorafit_grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def copy_into_peft(ours, peft_model) -> None:
    """lorafit's adapter weights into a PEFT model's "default" adapter (same layout: A [r, in], B [out, r])."""
    theirs = {name.removeprefix("base_model.model.").replace(".default", ""): p
              for name, p in peft_model.named_parameters() if ".default." in name}
    mine = {name: p for name, p in ours.named_parameters() if p.requires_grad}
    assert theirs.keys() == mine.keys()
    with torch.no_grad():
        for name, p in mine.items():
            theirs[name].copy_(p)


def test_sequence_logps_is_the_summed_log_prob_of_answer_tokens(model):
    tokenizer = tiny_tokenizer()
    batch = collate_pairs(tokenize_preference_rows(ROWS, tokenizer, 256, "x").pairs, pad_id(tokenizer))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = []
    for row in range(len(logits)):
        total = torch.zeros((), dtype=torch.float64)
        for t in range(1, logits.shape[1]):
            if batch["labels"][row, t] != IGNORE_INDEX:
                total += torch.log_softmax(logits[row, t - 1].double(), -1)[batch["labels"][row, t]]
        expected.append(total)
    tokens = int(answer_tokens(batch["labels"]).max())
    assert_close_by_rule(sequence_logps(logits, batch["labels"]), torch.stack(expected), reduction=128 + tokens,
                         dtype=torch.float32)


@pytest.mark.numerics
def test_fused_and_plain_log_prob_paths_agree():
    """batch_logps through the fused head (the tiny Llama's head is a plain frozen linear layer once adapters are
    injected) equals log_softmax over the model's own logits, values and adapter gradients."""
    tokenizer = tiny_tokenizer()
    batch = collate_pairs(tokenize_preference_rows(ROWS, tokenizer, 256, "x").pairs, pad_id(tokenizer))
    model = lorafit_adapter_model()
    from lorafit.loss import _plain_head

    assert _plain_head(model) is not None
    fused = batch_logps(model, batch)
    fused.sum().backward()
    fused_grads = {k: v.clone() for k, v in lorafit_grads(model).items()}
    model.zero_grad()
    plain = sequence_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                           batch["labels"])
    plain.sum().backward()
    reduction = reduction_through(model, tokens=int(batch["attention_mask"].sum()))
    assert_close_by_rule(fused.detach(), plain.detach(), reduction=reduction)
    for name, grad in lorafit_grads(model).items():
        assert_close_by_rule(fused_grads[name], grad, reduction=reduction, msg=name)


def test_dpo_loss_is_the_sigmoid_formula():
    pc, pr = torch.tensor([-3.0, -10.0]), torch.tensor([-5.0, -4.0])
    rc, rr = torch.tensor([-4.0, -9.0]), torch.tensor([-4.5, -6.0])
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # pair 0: chosen logratio 1, rejected -0.5 -> margin 0.75; pair 1: -1 and 2 -> -1.5
    assert chosen.tolist() == [0.5, -0.5] and rejected.tolist() == [-0.25, 1.0]
    expected = torch.tensor([math.log1p(math.exp(-0.75)), math.log1p(math.exp(1.5))])
    assert_close_by_rule(losses, expected, reduction=4)


def test_precomputed_reference_in_the_batch_equals_the_callable():
    tokenizer = tiny_tokenizer()
    batch = collate_pairs(tokenize_preference_rows(ROWS, tokenizer, 256, "x").pairs, pad_id(tokenizer))
    model = lorafit_adapter_model()
    reference = reference_under(model, lambda: adapters_off(model))
    with torch.no_grad():
        by_callable = DPOObjective(model, 0.1, reference)(**batch)
        ref_chosen, ref_rejected = reference(batch)
        by_batch = DPOObjective(model, 0.1)(**batch, ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
    # Bit-exact: the same forward on the same inputs on the same device, only where the numbers come from differs.
    assert {k: float(v) for k, v in by_callable[1].items()} == {k: float(v) for k, v in by_batch[1].items()}


def test_preference_scores_and_sft_shape():
    tokenizer = tiny_tokenizer()
    batch = collate_pairs(tokenize_preference_rows(ROWS, tokenizer, 256, "x").pairs, pad_id(tokenizer))
    model = lorafit_adapter_model()
    scores = preference_scores(model, batch)
    with torch.no_grad():
        chosen, rejected = split_pairs(batch_logps(model, batch))
    assert scores == {"correct": int((chosen > rejected).sum()), "margin_sum": float((chosen - rejected).sum()),
                      "pairs": 3}
    chosen_only = {k: v[:3] for k, v in batch.items()}
    loss, metrics = sft_objective(model, chosen_only)
    assert_close_by_rule(loss, -chosen.sum() / answer_tokens(chosen_only["labels"]).sum(),
                         reduction=reduction_through(model, 64))
    assert set(metrics) == {"loss"}


# ---------------------------------------------------------------------------------------------- TRL oracles


@pytest.fixture(scope="module")
def trl_dpo(tmp_path_factory):
    """``make(rows, model=None, peft_config=None)`` -> a DPOTrainer (sigmoid loss, β 0.1) built offline on the
    tiny tokenizer: rows are only for its dataset (tokenized by TRL); tests feed their own batches."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    folder = tmp_path_factory.mktemp("trl")

    def make(rows, model=None, peft_config=None):
        tokenizer = tiny_tokenizer()
        tokenizer.pad_token = tokenizer.eos_token
        args = DPOConfig(output_dir=str(folder), report_to=[], beta=0.1, loss_type=["sigmoid"], max_length=None,
                         per_device_train_batch_size=2, use_cpu=True, bf16=False, fp16=False,
                         dataset_num_proc=None, disable_tqdm=True)
        if model is None and peft_config is None:  # a plain model would need a reference model loaded by name
            from peft import LoraConfig

            peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return DPOTrainer(model=model if model is not None else tiny_model(), args=args,
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                              peft_config=peft_config)

    return make


def trl_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """collate_pairs' batch as TRL's DataCollatorForPreference writes it (the layout is the same; TRL marks the
    answer with completion_mask instead of labels)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "completion_mask": (batch["labels"] != IGNORE_INDEX).long()}


def trl_metrics(trainer) -> dict[str, float]:
    return {k: v[-1] for k, v in trainer._metrics["train"].items()}


DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def assert_dpo_equal(ours_model, objective, trainer, pairs, tokenizer):
    batch = collate_pairs(pairs, pad_id(tokenizer))
    assert all(torch.equal(trainer.data_collator(pairs)[k], v) for k, v in trl_inputs(batch).items())
    loss, metrics = objective(**batch)
    loss.backward()
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, trl_inputs(batch))
    trl_loss.backward()
    theirs = trl_metrics(trainer)

    reduction = reduction_through(ours_model, tokens=int(batch["attention_mask"].sum()))
    assert_close_by_rule(loss.detach(), trl_loss.detach(), reduction=reduction, msg="loss")
    # Rewards are β · a difference of two summed log-probs (~60 in size): the error follows the terms.
    for name in DPO_METRICS:
        scale = 0.1 * abs(theirs["logps/chosen"]) if name.startswith("rewards") else None
        assert_close_by_rule(metrics[name], theirs[name], reduction=reduction, scale=scale, msg=name)
    assert float(metrics["rewards/accuracies"]) == theirs["rewards/accuracies"]
    assert float(metrics["rewards/margins"]) != 0.0  # the perturbation makes policy and reference differ
    grads, trl_grads = lorafit_grads(ours_model), peft_grads(trainer.model)
    assert grads.keys() == trl_grads.keys()
    for name, grad in grads.items():
        assert grad is not None and float(grad.abs().max()) > 0, name
        assert_close_by_rule(grad, trl_grads[name], reduction=reduction, msg=name)


@pytest.mark.numerics
def test_dpo_equals_trl_with_a_fresh_adapter(trl_dpo):
    """Reference = the base (lorafit: adapter layers switched off; TRL: PEFT's disable_adapter). The adapter's B is
    random, as after some training steps, so policy and reference differ."""
    tokenizer = tiny_tokenizer()
    pairs = tokenize_preference_rows(ROWS, tokenizer, 256, "x").pairs
    ours = lorafit_adapter_model()
    trainer = trl_dpo(ROWS)  # a fresh PEFT LoRA (r 4, alpha 8, all-linear); reference = adapter disabled
    copy_into_peft(ours, trainer.model)
    objective = DPOObjective(ours, beta=0.1, reference_logps=reference_under(ours, lambda: adapters_off(ours)))
    assert_dpo_equal(ours, objective, trainer, pairs, tokenizer)


@pytest.mark.numerics
def test_dpo_equals_trl_when_starting_from_an_adapter(trl_dpo, tmp_path):
    """SFT, then DPO: the reference is base + the starting adapter, frozen (TRL copies it as adapter "ref");
    the policy has moved away from it (B re-drawn)."""
    from peft import PeftModel

    from lorafit.adapter_io import save_adapter

    tokenizer = tiny_tokenizer()
    pairs = tokenize_preference_rows(ROWS, tokenizer, 256, "x").pairs
    start = lorafit_adapter_model(seed=3)
    save_adapter(start, tmp_path / "start")
    peft_model = PeftModel.from_pretrained(tiny_model(), tmp_path / "start", is_trainable=True)
    trainer = trl_dpo(ROWS, model=peft_model)
    assert "ref" in trainer.model.peft_config
    ours = lorafit_adapter_model(seed=4)  # the policy, moved away from the starting adapter
    copy_into_peft(ours, trainer.model)
    for param in start.parameters():
        param.requires_grad_(False)
    objective = DPOObjective(ours, beta=0.1, reference_logps=lambda batch: split_pairs(batch_logps(start, batch)))
    assert_dpo_equal(ours, objective, trainer, pairs, tokenizer)


@pytest.fixture(scope="module")
def trl_orpo(tmp_path_factory):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    folder = tmp_path_factory.mktemp("trl-orpo")

    def make(model):
        tokenizer = tiny_tokenizer()
        tokenizer.pad_token = tokenizer.eos_token
        args = ORPOConfig(output_dir=str(folder), report_to=[], beta=0.25, max_length=256, use_cpu=True,
                          per_device_train_batch_size=2, bf16=False, fp16=False, disable_tqdm=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ORPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(ROWS),
                               processing_class=tokenizer)

    return make


def orpo_trl_batch(pairs, pad: int) -> dict[str, torch.Tensor]:
    """The pairs as ORPOTrainer's collator writes them: chosen_* and rejected_* tensors, labels -100 on the prompt."""
    batch = collate_pairs(pairs, pad)
    chosen, rejected = ({k: v.chunk(2)[i] for k, v in batch.items()} for i in (0, 1))
    return {f"{side}_{key}": value for side, part in (("chosen", chosen), ("rejected", rejected))
            for key, value in (("input_ids", part["input_ids"]), ("attention_mask", part["attention_mask"]),
                               ("labels", part["labels"]))}


@pytest.mark.numerics
@pytest.mark.parametrize("prompt", ["one token", "chat template"])
def test_orpo_equals_trl(trl_orpo, tmp_path, prompt):
    """Log-probs averaged per token, the odds-ratio term, rewards and every metric equal TRL's ORPOTrainer.

    TRL's NLL term counts the prompt tokens too, lorafit's only the answer; with a one-token prompt (position 0
    is never a target) the two are the same, and there the whole loss and every adapter gradient equal TRL's.
    With real prompts the loss is compared without the NLL term."""
    from peft import PeftModel

    from lorafit.adapter_io import save_adapter

    tokenizer = tiny_tokenizer()
    pairs = tokenize_preference_rows(ROWS, tokenizer, 256, "x").pairs
    if prompt == "one token":
        pairs = [{**pair, "prompt_ids": pair["prompt_ids"][:1]} for pair in pairs]
    ours = lorafit_adapter_model()
    save_adapter(ours, tmp_path / "adapter")
    trainer = trl_orpo(PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter", is_trainable=True))
    trainer.model.train()

    batch = collate_pairs(pairs, pad_id(tokenizer))
    loss, metrics = ORPOObjective(ours, lam=0.25)(**batch)
    trl_loss, theirs = trainer.get_batch_loss_metrics(trainer.model, orpo_trl_batch(pairs, pad_id(tokenizer)))
    reduction = reduction_through(ours, tokens=int(batch["attention_mask"].sum()))
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                 "log_odds_ratio", "log_odds_chosen"):
        assert_close_by_rule(metrics[name], theirs[name], reduction=reduction, msg=name)
    assert float(metrics["rewards/accuracies"]) == theirs["rewards/accuracies"]
    assert_close_by_rule(loss.detach() - metrics["nll_loss"], trl_loss.detach() - theirs["nll_loss"],
                         reduction=reduction, msg="odds-ratio term")
    if prompt == "one token":
        assert_close_by_rule(loss.detach(), trl_loss.detach(), reduction=reduction, msg="loss")
        assert_close_by_rule(metrics["nll_loss"], theirs["nll_loss"], reduction=reduction, msg="nll_loss")
        loss.backward()
        trl_loss.backward()
        grads, trl_grads = lorafit_grads(ours), peft_grads(trainer.model)
        assert grads.keys() == trl_grads.keys()
        for name, grad in grads.items():
            assert_close_by_rule(grad, trl_grads[name], reduction=reduction, msg=name)
    else:  # lorafit's NLL: the answer tokens only
        chosen_sum, _ = split_pairs(batch_logps(ours, batch).detach())
        chosen_tokens, _ = split_pairs(answer_tokens(batch["labels"]))
        assert_close_by_rule(metrics["nll_loss"], -chosen_sum.sum() / chosen_tokens.sum(), reduction=reduction)


def test_orpo_odds_ratio_is_the_formula():
    chosen, rejected = torch.tensor([-0.5, -2.0]), torch.tensor([-1.0, -0.1])
    ratio, log_odds = orpo_odds_ratio(chosen, rejected)
    odds = lambda x: x.double().exp() / (1 - x.double().exp())  # noqa: E731
    expected = torch.log(odds(chosen) / odds(rejected))
    assert_close_by_rule(log_odds, expected, reduction=4)
    assert_close_by_rule(ratio, F.logsigmoid(expected), reduction=4)
