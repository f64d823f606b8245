"""data.add_special_tokens (lorafit/adapters/tokens.py) against PEFT's ``trainable_token_indices``: the same
trainable rows, logits, loss and gradients, the same files both ways, and ``lorafit merge`` equal to PEFT's
``merge_and_unload`` — for a head tied to the embedding and an untied one — plus a run end to end."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from lorafit.adapter_io import load_adapter, save_adapter
from lorafit.adapters.tokens import add_tokens, grow_vocabulary, token_wrappers
from lorafit.config import LoRAConfig
from lorafit.errors import LorafitError
from lorafit.inject import inject_lora, remove_lora
from lorafit.merge import merge_adapter

from .conftest import model_folder, peft_grads, recipe_at, tiny_model, tiny_tokenizer, write_recipe
from .test_adapters_conformance import perturb
from .tolerance import assert_close_by_rule, reduction_through

TARGETS = ["q_proj", "v_proj"]
IDS = [128, 129]  # past the tiny model's 128 rows: the vocabulary grows to 130
INPUT = torch.tensor([[1, 5, 128, 7, 129, 3, 128, 40, 2, 129, 11, 6]])


def ours(tied: bool) -> torch.nn.Module:
    model = tiny_model(tie_word_embeddings=tied)
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=TARGETS), tokens=IDS)
    perturb(model)
    return model


def peft_indices(tied: bool) -> list[int] | dict[str, list[int]]:
    """What lorafit writes: one list when the head reads the embedding's rows, else both layers by path."""
    return IDS if tied else {"model.embed_tokens": IDS, "lm_head": IDS}


def grown(tied: bool) -> torch.nn.Module:
    """The tiny base grown to 130 rows as lorafit grows it (a PEFT user calls resize_token_embeddings)."""
    model = tiny_model(tie_word_embeddings=tied)
    grow_vocabulary(model, max(IDS) + 1)
    return model


def theirs(tied: bool) -> torch.nn.Module:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, trainable_token_indices=peft_indices(tied))
    model = get_peft_model(grown(tied), config)
    perturb(model)
    return model


def loss_of(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=INPUT, labels=INPUT).loss


@pytest.mark.numerics
@pytest.mark.parametrize("tied", [True, False])
def test_logits_loss_and_gradients_equal_peft(tied):
    model, peft_model = ours(tied), theirs(tied)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == [n.replace("token_adapter.", "") for n in peft_grads(peft_model)]  # same tensors, same order
    assert model.get_input_embeddings().weight.shape[0] == 130
    reduction = reduction_through(model, tokens=INPUT.numel())
    loss, peft_loss = loss_of(model), loss_of(peft_model)
    assert_close_by_rule(loss, peft_loss, reduction=reduction)
    loss.backward()
    peft_loss.backward()
    grads = {n.replace("token_adapter.", ""): g for n, g in peft_grads(peft_model).items()}
    rows = "model.embed_tokens.trainable_tokens_delta"
    assert grads[rows].abs().max() > 0  # the new tokens' rows do learn (input side, and the head when tied)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert_close_by_rule(param.grad, grads[name], reduction=reduction, msg=name)
    with torch.no_grad():
        assert_close_by_rule(model(INPUT).logits, peft_model(INPUT).logits, reduction=reduction)


@pytest.mark.parametrize("tied", [True, False])
def test_same_saved_keys_and_config_as_peft(tmp_path, tied):
    save_adapter(ours(tied), tmp_path / "ours")
    theirs(tied).save_pretrained(tmp_path / "peft")
    assert load_file(tmp_path / "ours" / "adapter_model.safetensors").keys() == \
        load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == peft_indices(tied)
    assert config["trainable_token_indices"] == \
        json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["trainable_token_indices"]


@pytest.mark.numerics
@pytest.mark.parametrize("tied", [True, False])
def test_lorafit_file_loads_in_peft_and_merges_like_merge_and_unload(tmp_path, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = ours(tied).eval()
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens([f"<new{i}>" for i in range(tokenizer.vocab_size, 130)], special_tokens=True)
    save_adapter(model, tmp_path / "adapter", tokenizer=tokenizer)
    peft_model = PeftModel.from_pretrained(grown(tied), tmp_path / "adapter").eval()
    reduction = reduction_through(model, tokens=INPUT.numel())
    expected = model(INPUT).logits.detach()
    assert_close_by_rule(peft_model(INPUT).logits, expected, reduction=reduction)
    base_dir = model_folder(tiny_model(tie_word_embeddings=tied), tmp_path / "base")  # 128 rows: not grown
    merge_adapter(str(base_dir), tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.vocab_size == 130 and merged.get_input_embeddings().weight.shape[0] == 130
    assert (merged.lm_head.weight is merged.model.embed_tokens.weight) == tied
    peft_merged = peft_model.merge_and_unload()
    assert_close_by_rule(merged(INPUT).logits, peft_merged(INPUT).logits, reduction=reduction)
    assert len(AutoTokenizer.from_pretrained(tmp_path / "merged")) == len(tokenizer)  # the grown tokenizer
    remove_lora(model)  # the originals back: the grown base again
    assert not token_wrappers(model)
    assert torch.equal(model(INPUT).logits, grown(tied)(INPUT).logits)


@pytest.mark.numerics
@pytest.mark.parametrize("tied", [True, False])
def test_peft_file_loads_in_lorafit_over_the_ungrown_base(tmp_path, tied):
    peft_model = theirs(tied).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    model = tiny_model(tie_word_embeddings=tied)  # 128 rows: load_adapter grows it to fit the ids
    load_adapter(model, tmp_path / "peft")
    reduction = reduction_through(model, tokens=INPUT.numel())
    assert_close_by_rule(model(INPUT).logits, peft_model(INPUT).logits, reduction=reduction)


def test_existing_tokens_keep_their_ids_and_new_ones_are_appended():
    tokenizer = tiny_tokenizer()
    size = len(tokenizer)
    ids = add_tokens(tokenizer, ["<|im_end|>", "<tool>", "</tool>"])
    assert ids == [tokenizer.convert_tokens_to_ids("<|im_end|>"), size, size + 1]
    assert tokenizer("a<tool>b", add_special_tokens=False).input_ids[1] == size  # never split
    assert add_tokens(tokenizer, None) == []


def test_rows_other_than_the_trained_ones_stay_the_base(tmp_path):
    model = ours(tied=True)
    before = model.get_input_embeddings().base_layer.weight.detach().clone()
    loss_of(model).backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    remove_lora(model, unmerge=False)  # merged: the trained rows written into the weight
    after = model.get_input_embeddings().weight
    assert torch.equal(after[:128], before[:128]) and not torch.equal(after[IDS], before[IDS])


@pytest.mark.parametrize(("lora", "message"), [
    ({"target_modules": TARGETS, "modules_to_save": ["lm_head"]}, "output head is a SavedModule"),
    ({"target_modules": TARGETS, "modules_to_save": ["embed_tokens"]}, "input embeddings are a SavedModule"),
])
def test_refused_with_the_fix(lora, message):
    with pytest.raises(LorafitError, match=message):
        inject_lora(tiny_model(), LoRAConfig(r=4, **lora), tokens=IDS)


def test_recipe_refusals_name_the_key(tmp_path):
    from .test_config import MINIMAL, recipe_error

    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    path = write_recipe(tmp_path / "r.yaml", MINIMAL.format(train=tmp_path / "train.jsonl"))
    assert "data.add_special_tokens" in (text := recipe_error(path, ["data.add_special_tokens=[<a>, <a>]"]))
    assert "lists '<a>' twice" in text
    assert "data.add_special_tokens" in recipe_error(path, ["data.add_special_tokens=['']"])
    assert "train.fsdp cannot shard a run with data.add_special_tokens" in recipe_error(
        path, ["data.add_special_tokens=[<a>]", "train.fsdp=true"])


def test_a_run_trains_the_new_rows_and_eval_generate_merge_use_its_tokenizer(run_dir):
    """The CLI end to end: a chat-marker token the tiny tokenizer lacks (it has spare rows, so nothing grows)."""
    from .test_cli import run

    recipe = recipe_at(run_dir, "data.add_special_tokens=[<|im_end|>, <sep>]", "train.save_every=3")
    (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    result = run("plan", str(run_dir / "recipe.yaml"))
    assert result.returncode == 0, result.stderr
    size = len(tiny_tokenizer())
    assert f"trainable token rows: ids [4, {size}] in model.embed_tokens, lm_head (128 parameters)" in \
        " ".join(result.stdout.split())
    result = run("train", str(run_dir / "recipe.yaml"))
    assert result.returncode == 0, result.stderr
    adapter = run_dir / "out" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"model.embed_tokens": [4, size], "lm_head": [4, size]}
    assert (adapter / "tokenizer_config.json").is_file()  # and in each checkpoint, for eval of a checkpoint
    assert (run_dir / "out" / "checkpoints" / "step-000003" / "tokenizer_config.json").is_file()
    base = tiny_model()
    load_adapter(base, adapter)
    embed, head, start = token_wrappers(base)["model.embed_tokens"], token_wrappers(base)["lm_head"], tiny_model()
    assert not torch.equal(embed.trainable_tokens_delta[0], start.model.embed_tokens.weight[4])  # <|im_end|> is read
    assert torch.equal(embed.trainable_tokens_delta[1], start.model.embed_tokens.weight[size])  # <sep> never is
    assert not torch.equal(head.trainable_tokens_delta[1], start.lm_head.weight[size])  # but is pushed down as output
    result = run("eval", str(run_dir / "recipe.yaml"), "--json", str(run_dir / "eval.json"))
    assert result.returncode == 0, result.stderr
    results = [r["loss"] for r in json.loads((run_dir / "eval.json").read_text())["results"]]
    logged = [json.loads(x)["eval_loss"] for x in (run_dir / "out" / "metrics.jsonl").read_text().splitlines()
              if '"eval"' in x]
    assert results == pytest.approx([logged[0], logged[-1]], rel=1e-5)  # eval's base is the run's step 0
    result = run("merge", str(run_dir / "tiny-llama"), str(adapter), str(run_dir / "merged"), "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(run_dir / "merged").convert_tokens_to_ids("<sep>") == size
    result = run("export", str(run_dir / "tiny-llama"), str(adapter), str(run_dir / "x.gguf"))
    assert result.returncode == 2 and "adds tokens (data.add_special_tokens" in result.stderr


def test_an_interrupted_run_resumes_to_the_same_rows(tmp_path, monkeypatch):
    """Rows past the base's (ids 128, 129: the vocabulary grows) and a tied head, resumed bit-exactly."""
    from lorafit.train import train as run_training

    from .conftest import ctrl_c_after_step, day_run

    base = model_folder(tiny_model(tie_word_embeddings=True), tmp_path / "base")
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens([f"<pad{i}>" for i in range(len(tokenizer), 128)], special_tokens=True)
    tokenizer.save_pretrained(base)  # 128 tokens: the two new ones need new rows
    recipe = day_run(tmp_path, base, "r: 4, alpha: 8", max_steps=6, lr=1.0e-2)
    setting = ["data.add_special_tokens=['<date>', '</date>']"]

    def ran(out: str, **kwargs) -> dict[str, torch.Tensor]:
        from lorafit.config import load_recipe

        run_training(load_recipe(tmp_path / f"{out}.yaml", setting), **kwargs)
        return load_file(tmp_path / out / "adapter" / "adapter_model.safetensors")

    recipe("straight"), recipe("resumed")  # writes both recipes
    straight = ran("straight")
    assert straight["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"].shape == (2, 32)
    with ctrl_c_after_step(monkeypatch, 4), pytest.raises(LorafitError, match="interrupted after step 4"):
        ran("resumed")
    resumed = ran("resumed", resume="latest")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize("tied", [True, False])
def test_init_from_an_adapter_with_token_rows_starts_from_them_and_a_recipe_without_them_is_refused(tmp_path, tied):
    from lorafit.adapter_io import start_from_adapter

    trained = ours(tied)
    save_adapter(trained, tmp_path / "sft")
    model = tiny_model(tie_word_embeddings=tied)
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=TARGETS), tokens=IDS)
    start_from_adapter(model, tmp_path / "sft")
    assert torch.equal(model(INPUT).logits, trained(INPUT).logits)  # the same code on the same weights
    plain = tiny_model(tie_word_embeddings=tied)
    inject_lora(plain, LoRAConfig(r=4, alpha=8, target_modules=TARGETS))
    with pytest.raises(LorafitError, match="trained token rows .data.add_special_tokens.: the adapter has them"):
        start_from_adapter(plain, tmp_path / "sft")
    other = tiny_model(tie_word_embeddings=tied)
    inject_lora(other, LoRAConfig(r=4, alpha=8, target_modules=TARGETS), tokens=[129, 128])
    with pytest.raises(LorafitError, match="list the same tokens in the same order"):
        start_from_adapter(other, tmp_path / "sft")
