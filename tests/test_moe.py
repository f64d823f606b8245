"""Mixture-of-Experts models, whose experts are fused 3-D parameters: LoRA per expert in PEFT's target_parameters
layout (lorafit/adapters/experts.py). Counts, files, logits and merges are checked against PEFT on tiny random Mixtral,
Qwen3-MoE and gpt-oss (whose experts are stored transposed, [experts, in, out])."""

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from lorafit.adapter_io import load_adapter, read_adapter, save_adapter
from lorafit.config import LoRAConfig, load_recipe
from lorafit.errors import LorafitError
from lorafit.inject import inject_lora, lora_modules, remove_lora
from lorafit.merge import merge_adapter
from lorafit.targets import find_targets
from lorafit.train import train as run_training

from .conftest import model_folder, randomize_lora_B, three_step_recipe, train_losses
from .tolerance import assert_close_by_rule, reduction_through, tolerance

SMALL = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             num_experts_per_tok=2, bos_token_id=1, eos_token_id=2)
BUILDERS = {
    "mixtral": lambda: MixtralForCausalLM(MixtralConfig(intermediate_size=64, num_local_experts=4, **SMALL)),
    "qwen3_moe": lambda: Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=32,
                                                            num_experts=4, head_dim=8, **SMALL)),
    "gpt_oss": lambda: GptOssForCausalLM(GptOssConfig(intermediate_size=48, num_local_experts=4, head_dim=8,
                                                      layer_types=["full_attention"] * 2, **SMALL)),
}
# Every projection PEFT's all-linear adapts on these models, named as lorafit's target_modules take them.
EVERY_PROJECTION = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj", "gate"]


def tiny_moe(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    return BUILDERS[kind]().eval()


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def peft_all_linear(kind: str):
    return get_peft_model(tiny_moe(kind), PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


@pytest.fixture(params=["mixtral", "qwen3_moe"])
def kind(request):
    return request.param


@pytest.fixture
def moe_dir(tmp_path, kind):
    folder = tmp_path / kind
    model_folder(tiny_moe(kind), folder)
    return folder


def test_all_linear_adapts_what_peft_adapts_except_the_router(kind):
    peft = peft_all_linear(kind)
    router = sum(p.numel() for name, p in peft.named_parameters() if p.requires_grad and ".gate.lora_" in name)
    report = inject_lora(tiny_moe(kind), LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    assert report.trainable == trainable(peft) - router  # 15,104 = 15,392 - 288 on Mixtral; 9,984 on Qwen3-MoE
    assert {"gate_up_proj", "down_proj"} <= set(report.kinds) and "gate" not in report.kinds
    assert report.kind_settings["gate_up_proj"] == {(8, 16)}  # gate and up fused: rank r for each, as in PEFT
    # naming the router as well adapts exactly PEFT's all-linear set, with the same tensors under the same keys
    model = tiny_moe(kind)
    report = inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=EVERY_PROJECTION))
    assert report.trainable == trainable(peft) == {"mixtral": 15_392, "qwen3_moe": 10_272}[kind]
    ours = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    theirs = {name.removeprefix("base_model.model.").replace(".default", ""): tuple(p.shape)
              for name, p in peft.named_parameters() if p.requires_grad}
    assert ours == theirs


@pytest.mark.numerics
@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_peft_loads_the_adapter_with_the_same_logits_and_lorafit_loads_peft_s(tmp_path, kind, input_ids):
    model = tiny_moe(kind)
    targets = EVERY_PROJECTION if kind != "gpt_oss" else ["q_proj", "gate_up_proj", "down_proj", "router"]
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=targets))
    randomize_lora_B(model)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"][0].endswith("layers.0.mlp.experts.down_proj")
    with torch.no_grad():
        ours = model(input_ids).logits
        assert (ours - tiny_moe(kind)(input_ids).logits).abs().max() > 0.01  # the experts' updates count
        peft = PeftModel.from_pretrained(tiny_moe(kind), tmp_path / "adapter").eval()
        # (the routers' top-k choice is discrete: it holds because no two experts' scores tie to rounding here)
        reduction = reduction_through(model, tokens=input_ids.numel())
        assert_close_by_rule(peft(input_ids).logits, ours, reduction=reduction)
        # and back: PEFT's own file into lorafit
        peft.save_pretrained(tmp_path / "peft")
        again = tiny_moe(kind)
        load_adapter(again, tmp_path / "peft")
        assert_close_by_rule(again(input_ids).logits, ours, reduction=reduction)
        # merged in place (every expert's weight) == the adapted forward; unmerged == the base again
        modules = lora_modules(model).values()
        for module in modules:
            module.merge()
        assert_close_by_rule(model(input_ids).logits, ours, reduction=reduction)
        remove_lora(model)
        assert_close_by_rule(model(input_ids).logits, tiny_moe(kind)(input_ids).logits, reduction=reduction)


@pytest.mark.numerics
def test_merge_equals_peft_merge_and_unload(tmp_path, kind, moe_dir, input_ids):
    peft = peft_all_linear(kind)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    peft.save_pretrained(tmp_path / "peft")
    result = merge_adapter(str(moe_dir), tmp_path / "peft", tmp_path / "merged", dtype="float32")
    assert result.merged_modules == 14  # 4 attention + 2 experts + router, x2
    # merge's own check (merged vs adapted logits), by the rule; logits of these tiny models stay below 1
    _, atol = tolerance(None, reduction=reduction_through(peft, tokens=input_ids.numel()), dtype=torch.float32,
                        scale=1.0)
    assert result.max_logit_diff < atol
    on_disk = load_file(tmp_path / "merged" / "model.safetensors")
    assert any(".experts.0." in key for key in on_disk)  # saved per expert, as transformers stores these models
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    reference = peft.merge_and_unload().state_dict()
    assert merged.keys() == reference.keys()
    for key in reference:  # W + s·B·A: a sum over r
        assert_close_by_rule(merged[key], reference[key], reduction=4, msg=key)


def test_three_training_steps_leave_the_router_frozen(tmp_path, kind, moe_dir):
    run_training(load_recipe(three_step_recipe(tmp_path, moe_dir)))
    losses = train_losses(tmp_path / "out")
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    adapter = tmp_path / "out" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert len(config["target_parameters"]) == 4 and not any(".gate." in p for p in config["target_parameters"])
    base = AutoModelForCausalLM.from_pretrained(moe_dir)
    updates = read_adapter(adapter, base)
    trained = [update.tensors["lora_B.weight"].abs().max() > 0 for update in updates.values()]
    assert all(trained)  # every expert update trained


@pytest.mark.parametrize("setting, named", [("variant: dora", "lora.variant 'dora'"),
                                            ("dropout: 0.1", "lora.dropout 0.1")])
def test_what_expert_parameters_cannot_do_is_refused(setting, named):
    key, value = setting.split(": ")
    lora = LoRAConfig(r=4, target_modules="all-linear", **{key: value})
    with pytest.raises(LorafitError, match=f"{named} does not apply to MoE expert parameters"):
        inject_lora(tiny_moe("mixtral"), lora)
    # the attention layers alone are fine
    inject_lora(tiny_moe("mixtral"), lora.model_copy(update={"target_modules": ["q_proj", "v_proj"]}))


def test_an_expert_adapter_is_read_with_its_base(tmp_path):
    model = tiny_moe("mixtral")
    inject_lora(model, LoRAConfig(r=4, target_modules=["down_proj"]))
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(LorafitError, match="updates MoE expert parameters"):
        read_adapter(tmp_path / "adapter")
    other = MixtralForCausalLM(MixtralConfig(intermediate_size=48, num_local_experts=4, **SMALL))
    misfit = r"(?s)does not fit this base model.*experts.down_proj: adapter has lora_A \[16, 64\]"
    with pytest.raises(LorafitError, match=misfit):
        load_adapter(other, tmp_path / "adapter")


@pytest.mark.parametrize("kind", ["mixtral"])
def test_plan_shows_experts_times_rank(tmp_path, moe_dir):
    from typer.testing import CliRunner

    from lorafit.cli import app

    recipe = three_step_recipe(tmp_path, moe_dir)
    result = CliRunner().invoke(app, ["plan", str(recipe)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 4}
    assert "8 x 4 experts" in rows["gate_up_proj"] and "4 x 4 experts" in rows["down_proj"]
    assert "gate" not in rows  # the router stays frozen under all-linear


def test_a_convolution_kernel_is_not_an_expert():
    model = tiny_moe("mixtral")
    model.model.layers[0].conv = torch.nn.Conv1d(32, 32, 3, groups=32)  # 3-D weight [32, 1, 3]
    targets = find_targets(model, "all-linear")
    assert not any("conv" in t for t in targets) and any(t.endswith("experts.gate_up_proj") for t in targets)
