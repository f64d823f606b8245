"""PEFT-format adapter files, proven with PEFT itself (a test-only dependency)."""

import json
import re

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from lorafit.adapter_io import load_adapter, save_adapter
from lorafit.config import LoRAConfig
from lorafit.errors import LorafitError
from lorafit.inject import inject_lora, lora_modules

from .conftest import randomize_lora_B, tiny_model
from .tolerance import assert_close_by_rule, reduction_through

TARGETS = [
    "all-linear",
    ["q_proj", "v_proj"],
    {"regex": r"model\.layers\.1\.mlp\.(gate|up)_proj"},
]


@pytest.mark.numerics
@pytest.mark.parametrize("target_modules", TARGETS, ids=["all-linear", "q_v", "regex"])
def test_lorafit_adapter_loads_in_peft_with_same_logits(tmp_path, input_ids, target_modules):
    ours = tiny_model()
    inject_lora(ours, LoRAConfig(r=4, alpha=16, target_modules=target_modules))
    randomize_lora_B(ours)
    expected = ours(input_ids).logits
    save_adapter(ours, tmp_path / "adapter", base_model_name="tiny")

    peft_model = PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter").eval()
    assert_close_by_rule(peft_model(input_ids).logits, expected, reduction=reduction_through(ours, input_ids.numel()))
    assert not torch.allclose(tiny_model()(input_ids).logits, expected, atol=1e-3)  # the adapter matters


@pytest.mark.numerics
def test_layer_subset_adapter_loads_in_peft(tmp_path, input_ids):
    ours = tiny_model()
    inject_lora(ours, LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "down_proj"], layers=[1]))
    randomize_lora_B(ours)
    save_adapter(ours, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter").eval()
    assert_close_by_rule(peft_model(input_ids).logits, ours(input_ids).logits,
                         reduction=reduction_through(ours, input_ids.numel()))
    wrapped = [n for n, _ in peft_model.named_modules() if n.endswith(".lora_A")]
    assert len(wrapped) == 2


def test_file_format_keys_shapes_and_config(tmp_path):
    ours = tiny_model()
    inject_lora(ours, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    save_adapter(ours, tmp_path / "adapter", base_model_name="some/base")
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (32, 4)
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (16, 4)
    assert len(tensors) == 8
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["bias"]) == (4, 8.0, "none")
    assert config["base_model_name_or_path"] == "some/base"
    assert config["use_rslora"] is False and config["use_dora"] is False
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp folder left behind


@pytest.mark.numerics
@pytest.mark.parametrize(
    "peft_config",
    [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        dict(r=4, lora_alpha=8, target_modules="all-linear"),
        dict(r=4, lora_alpha=8, target_modules=["k_proj", "up_proj"], use_rslora=True,
             rank_pattern={"up_proj": 2}, alpha_pattern={"k_proj": 3}),
        dict(r=2, lora_alpha=4, target_modules=["o_proj"], layers_to_transform=[0], layers_pattern="layers"),
    ],
    ids=["q_v", "all-linear", "rslora-patterns", "layers"],
)
def test_peft_adapter_loads_in_lorafit_with_same_logits(tmp_path, input_ids, peft_config):
    peft_model = get_peft_model(tiny_model(), PeftLoraConfig(init_lora_weights=False, **peft_config)).eval()
    expected = peft_model(input_ids).logits
    peft_model.save_pretrained(tmp_path / "peft")

    ours = tiny_model()
    wrapped = load_adapter(ours, tmp_path / "peft")
    assert_close_by_rule(ours(input_ids).logits, expected, reduction=reduction_through(ours, input_ids.numel()))
    peft_wrapped = {n.removeprefix("base_model.model.").removesuffix(".lora_A") for n, _ in peft_model.named_modules()
                    if n.endswith(".lora_A")}
    assert set(wrapped) == peft_wrapped
    assert not any(p.requires_grad for p in ours.parameters())


def test_round_trip_through_lorafit_and_trainable_flag(tmp_path, input_ids):
    ours = tiny_model()
    inject_lora(ours, LoRAConfig(r=3, alpha=5, target_modules="all-linear"))
    randomize_lora_B(ours)
    save_adapter(ours, tmp_path / "a")
    again = tiny_model()
    load_adapter(again, tmp_path / "a", trainable=True)
    # the same code on the same weights and inputs: bit-exact
    torch.testing.assert_close(again(input_ids).logits, ours(input_ids).logits, atol=0, rtol=0)
    trainable = [n for n, p in again.named_parameters() if p.requires_grad]
    assert len(trainable) == 28 and all("lora_" in n for n in trainable)


def test_adapter_for_another_shape_names_module_and_both_shapes(tmp_path):
    bigger = tiny_model(hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    inject_lora(bigger, LoRAConfig(r=4, alpha=8, target_modules=["q_proj"]))
    save_adapter(bigger, tmp_path / "a")
    model = tiny_model()
    with pytest.raises(LorafitError) as err:
        load_adapter(model, tmp_path / "a")
    message = str(err.value)
    assert "model.layers.0.self_attn.q_proj" in message
    assert "lora_A [4, 48]" in message and "[32, 32]" in message and "lora_A [4, 32]" in message
    assert not lora_modules(model)  # nothing wrapped on failure


def test_adapter_with_unknown_module(tmp_path):
    deeper = tiny_model(num_hidden_layers=3)
    inject_lora(deeper, LoRAConfig(r=2, alpha=2, target_modules=["q_proj"], layers=[2]))
    save_adapter(deeper, tmp_path / "a")
    with pytest.raises(LorafitError, match=r"model\.layers\.2\.self_attn\.q_proj does not exist"):
        load_adapter(tiny_model(), tmp_path / "a")


def test_refuses_pickle_and_unsupported_features(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    (folder / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(LorafitError, match="never loads pickle"):
        load_adapter(tiny_model(), folder)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "lora_bias": True}))
    with pytest.raises(LorafitError, match="lora_bias"):
        load_adapter(tiny_model(), folder)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(LorafitError, match="IA3"):
        load_adapter(tiny_model(), folder)


def test_unexpected_tensor_names_are_refused(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    save_file({"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(2, 128)},
              folder / "adapter_model.safetensors")
    with pytest.raises(LorafitError, match="unexpected tensor"):
        load_adapter(tiny_model(), folder)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(LorafitError, match="no adapter_config.json"):
        load_adapter(tiny_model(), tmp_path / "nowhere")


PATTERNS = {"r": 4, "alpha": 8, "use_rslora": True,
            "rank_pattern": {"q_proj": 8, r"layers\.1\.mlp\.down_proj": 2, ".*_proj": 6},  # first match wins
            "alpha_pattern": {"v_proj": 4, r"layers\.0\..*": 16}}


@pytest.mark.numerics
def test_rslora_and_patterns_from_a_recipe_give_peft_identical_modules(tmp_path, input_ids):
    """The recipe's use_rslora / rank_pattern / alpha_pattern against PEFT's LoraConfig with the same
    values: same modules, same rank and scaling per module, and the saved adapter loads in PEFT."""
    ours = tiny_model()
    inject_lora(ours, LoRAConfig(**PATTERNS))
    theirs = get_peft_model(tiny_model(), PeftLoraConfig(
        r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear",
        rank_pattern=PATTERNS["rank_pattern"], alpha_pattern=PATTERNS["alpha_pattern"]))
    peft_layers = {name.removeprefix("base_model.model."): module for name, module in theirs.named_modules()
                   if hasattr(module, "scaling") and isinstance(module.scaling, dict) and "default" in module.scaling}
    ours_layers = lora_modules(ours)
    assert set(ours_layers) == set(peft_layers) and len(ours_layers) == 14
    for name, module in ours_layers.items():
        theirs_layer = peft_layers[name]
        assert (module.r, module.scaling) == (theirs_layer.r["default"], theirs_layer.scaling["default"]), name
    assert ours_layers["model.layers.1.self_attn.q_proj"].r == 8  # q_proj listed before the catch-all ".*_proj"
    assert ours_layers["model.layers.1.mlp.down_proj"].r == 2
    assert ours_layers["model.layers.0.mlp.down_proj"].r == 6
    assert ours_layers["model.layers.1.self_attn.v_proj"].scaling == 4 / 6**0.5  # alpha 4, rsLoRA

    randomize_lora_B(ours)
    save_adapter(ours, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter").eval()
    assert_close_by_rule(peft_model(input_ids).logits, ours(input_ids).logits,
                         reduction=reduction_through(ours, input_ids.numel()))


def test_a_pattern_that_matches_no_target_is_an_error():
    with pytest.raises(LorafitError, match=r"lora.rank_pattern key 'qproj' matches none of the 4 targeted"):
        inject_lora(tiny_model(), LoRAConfig(target_modules=["q_proj", "v_proj"], rank_pattern={"qproj": 8}))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("r", "four", "r must be a positive integer, got 'four'"),
    ("lora_alpha", None, "lora_alpha must be a number, got None"),
    ("rank_pattern", {"q_proj": "big"}, "rank_pattern['q_proj'] must be a positive rank"),
])
def test_adapter_config_values_of_the_wrong_type_are_one_clear_error(tmp_path, field, value, message):
    model = tiny_model()
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    save_adapter(model, tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config[field] = value
    config_path.write_text(json.dumps(config))
    with pytest.raises(LorafitError, match=re.escape(message)):
        load_adapter(tiny_model(), tmp_path / "adapter")
