"""lora.init: pissa | olora | loftq (lorafit/adapters/init.py) against PEFT's init_lora_weights of the same name:
A, B and the modified base weight; the adapter saved against the original base, as PEFT's
``path_initial_model_for_weight_conversion`` writes it; training and an exact resume; the refusals."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from lorafit.adapter_io import save_adapter
from lorafit.adapters import init as base_init
from lorafit.config import LoRAConfig, load_recipe
from lorafit.errors import LorafitError
from lorafit.inject import inject_lora, lora_modules
from lorafit.merge import merge_adapter
from lorafit.train import train as run_training

from .conftest import ctrl_c_after_step, day_run, tiny_model, train_losses, write_recipe
from .tolerance import assert_close_by_rule, reduction_through

PEFT_NAMES = {"pissa": "pissa", "pissa_niter_4": "pissa", "olora": "olora"}  # PEFT's name -> lora.init


def ours(peft_name: str, seed: int = 0, **lora) -> torch.nn.Module:
    model = tiny_model()
    torch.manual_seed(seed)  # pissa_niter draws its sketch from the global generator, in both
    iters = {"init_iter": int(peft_name.rsplit("_", 1)[-1])} if "niter" in peft_name else {}
    inject_lora(model, LoRAConfig(r=4, alpha=8, init=PEFT_NAMES[peft_name], **iters, **lora))
    return model


def theirs(peft_name: str, seed: int = 0, **config) -> PeftModel:
    model = tiny_model()
    torch.manual_seed(seed)
    return get_peft_model(model, PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                       init_lora_weights=peft_name, **config))


def aligned(ours_A, ours_B, peft_A, peft_B):
    """SVD / QR factors are unique up to the sign of each rank-1 part (A's row i with B's column i): flip ours to
    PEFT's, so a sign choice that differs between two LAPACK builds is not a difference in the init."""
    signs = torch.sign((ours_A * peft_A).sum(dim=1))
    signs[signs == 0] = 1
    return ours_A * signs[:, None], ours_B * signs[None, :]


@pytest.mark.numerics
@pytest.mark.parametrize("peft_name", list(PEFT_NAMES))
def test_init_equals_peft_a_b_and_the_modified_base(peft_name):
    model, peft_model = ours(peft_name), theirs(peft_name)
    peft_modules = {name.removeprefix("base_model.model."): m for name, m in peft_model.named_modules()
                    if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    modules = lora_modules(model)
    assert set(modules) == set(peft_modules) and len(modules) == 14
    for name, layer in modules.items():
        peft_layer = peft_modules[name]
        peft_A, peft_B = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
        A, B = aligned(layer.lora_A.weight, layer.lora_B.weight, peft_A, peft_B)
        out_features, in_features = layer.base_weight.shape
        reduction = out_features * in_features  # an SVD / QR touches the whole matrix
        assert_close_by_rule(A, peft_A, reduction=reduction, msg=f"{name} A")
        assert_close_by_rule(B, peft_B, reduction=reduction, msg=f"{name} B")
        assert_close_by_rule(layer.base_weight, peft_layer.base_layer.weight, reduction=reduction,
                             scale=float(layer.base_weight.detach().abs().max()), msg=f"{name} W'")


@pytest.mark.numerics
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_the_start_computes_what_the_base_computes(init, input_ids):
    model = ours(init).eval()
    expected = tiny_model().eval()(input_ids).logits
    assert_close_by_rule(model(input_ids).logits, expected, reduction=reduction_through(model, input_ids.numel()))


def trained(model: torch.nn.Module, seed: int = 3) -> None:
    """Stand-in for training: move every A and B away from its start."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            for param in layer.adapter_params().values():
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)


@pytest.mark.numerics
@pytest.mark.parametrize("peft_name", list(PEFT_NAMES))
def test_saved_adapter_is_peft_conversion_and_applies_to_the_original_base(peft_name, tmp_path, input_ids,
                                                                           tiny_model_dir):
    """PEFT loads the saved adapter over the untouched base with the trained model's logits; ``lorafit merge``
    into the untouched base gives them too."""
    from transformers import AutoModelForCausalLM

    model = ours(peft_name).eval()
    trained(model)
    save_adapter(model, tmp_path / "ours")
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (ours_config["r"], ours_config["lora_alpha"], ours_config["init_lora_weights"]) == (8, 16, True)

    expected = model(input_ids).logits
    reduction = reduction_through(model, tokens=input_ids.numel())
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "ours").eval()
    assert_close_by_rule(loaded(input_ids).logits, expected, reduction=reduction)
    merge_adapter(str(tiny_model_dir), tmp_path / "ours", tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert_close_by_rule(merged(input_ids).logits, expected, reduction=reduction)


@pytest.mark.numerics
def test_files_equal_peft_path_initial_model_for_weight_conversion(tmp_path):
    """PEFT's save_pretrained with the initial adapter: the same keys, shapes, r, alpha and tensors."""
    peft_model = theirs("pissa")
    # PEFT's documented recipe: save the initial adapter with init_lora_weights=True, then convert at the end.
    peft_model.peft_config["default"].init_lora_weights = True
    peft_model.save_pretrained(tmp_path / "initial")
    peft_model.peft_config["default"].init_lora_weights = "pissa"
    model = ours("pissa")
    for name, layer in lora_modules(model).items():  # start from PEFT's factors exactly, then train both alike
        peft_layer = peft_model.base_model.model.get_submodule(name)
        layer.initial_A.copy_(peft_layer.lora_A["default"].weight)
        layer.initial_B.copy_(peft_layer.lora_B["default"].weight)
        layer.lora_A.weight.data.copy_(peft_layer.lora_A["default"].weight)
        layer.lora_B.weight.data.copy_(peft_layer.lora_B["default"].weight)
    trained(model)
    for name, layer in lora_modules(model).items():
        peft_layer = peft_model.base_model.model.get_submodule(name)
        peft_layer.lora_A["default"].weight.data.copy_(layer.lora_A.weight)
        peft_layer.lora_B["default"].weight.data.copy_(layer.lora_B.weight)
    peft_model.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    save_adapter(model, tmp_path / "ours")
    theirs_tensors, ours_tensors = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    assert theirs_tensors.keys() == ours_tensors.keys()
    for key, tensor in theirs_tensors.items():
        assert torch.equal(ours_tensors[key], tensor), key  # the same values concatenated: copies
    theirs_config, ours_config = (json.loads((tmp_path / d / "adapter_config.json").read_text())
                                  for d in ("peft", "ours"))
    for key in ("r", "lora_alpha", "init_lora_weights", "use_rslora", "rank_pattern", "alpha_pattern"):
        assert ours_config[key] == theirs_config[key], key


def test_rslora_and_patterns_keep_each_module_scaling_in_the_saved_record(tmp_path, input_ids):
    """PEFT refuses this conversion (rsLoRA with patterns); lorafit writes alpha·sqrt 2 for every alpha."""
    model = ours("pissa", use_rslora=True, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 4.0}).eval()
    trained(model)
    save_adapter(model, tmp_path / "ours")
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "ours").eval()
    assert_close_by_rule(loaded(input_ids).logits, model(input_ids).logits,
                         reduction=reduction_through(model, tokens=input_ids.numel()))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_train_learns_and_resumes_exactly(init, tmp_path, tiny_model_dir, monkeypatch, input_ids):
    recipe = day_run(tmp_path, tiny_model_dir, f"r: 4, alpha: 8, init: {init}", max_steps=6, lr=1.0e-2)
    run_training(recipe("straight"))
    losses = train_losses(tmp_path / "straight")
    assert losses[-1] < losses[0]
    with ctrl_c_after_step(monkeypatch, 4), pytest.raises(LorafitError, match="interrupted after step 4"):
        run_training(recipe("resumed"))
    run_training(recipe("resumed"), resume="latest")
    assert train_losses(tmp_path / "resumed") == losses  # same code, same inputs, same device: bit-exact
    straight, resumed = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors")
                         for d in ("straight", "resumed"))
    assert all(torch.equal(resumed[key], tensor) for key, tensor in straight.items())


def test_resume_over_other_initial_factors_moves_the_base_to_the_saved_ones(tmp_path, input_ids):
    """A checkpoint whose A0, B0 were computed elsewhere (another SVD): W' follows them, so the model that goes on
    training is the one the file describes over the original base."""
    model, other = ours("pissa").eval(), ours("pissa").eval()
    for layer in lora_modules(other).values():
        layer.initial_A.mul_(1.01)  # as if that machine's SVD had rounded differently
    trained(other)
    save_adapter(other, tmp_path / "checkpoint")
    saved = load_file(tmp_path / "checkpoint" / "adapter_model.safetensors")
    for name, layer in lora_modules(model).items():
        layer.load_saved({part: saved[f"base_model.model.{name}.{part}"] for part in layer.saved_tensors()})
        assert torch.equal(layer.initial_A, lora_modules(other)[name].initial_A)
    expected = PeftModel.from_pretrained(tiny_model(), tmp_path / "checkpoint").eval()(input_ids).logits
    assert_close_by_rule(model(input_ids).logits, expected, reduction=reduction_through(model, input_ids.numel()))


def peft_loftq_on_cpu():
    """PEFT's loftq_init, which quantizes on "cuda" (or "xpu") only, run as written on the CPU."""
    from peft.utils import loftq_utils

    source = inspect.getsource(loftq_utils.loftq_init.__wrapped__ if hasattr(loftq_utils.loftq_init, "__wrapped__")
                               else loftq_utils.loftq_init)
    source = source.replace('compute_device = "xpu" if is_xpu_available() else "cuda"', 'compute_device = "cpu"')
    assert 'compute_device = "cpu"' in source
    namespace = dict(vars(loftq_utils))
    exec(compile(source, loftq_utils.__file__, "exec"), namespace)  # noqa: S102 (PEFT's own code, one edit)
    return namespace["loftq_init"]


@pytest.mark.numerics
@pytest.mark.parametrize("iters", [1, 2])
def test_loftq_equals_peft_loftq_init(iters):
    pytest.importorskip("bitsandbytes")
    weight = tiny_model().model.layers[0].mlp.down_proj.weight.detach()
    peft_W, peft_A, peft_B = peft_loftq_on_cpu()(weight, num_bits=4, reduced_rank=4, num_iter=iters)
    A, B, W = base_init.loftq(weight, 4, iters)
    A, B = aligned(A, B, peft_A, peft_B)
    reduction = weight.numel()
    assert_close_by_rule(A, peft_A, reduction=reduction)
    assert_close_by_rule(B, peft_B, reduction=reduction)
    assert_close_by_rule(W, peft_W, reduction=reduction)


def test_loftq_over_a_4bit_base_fits_the_residual_of_the_loaded_weights(tmp_path, tiny_model_dir, input_ids):
    pytest.importorskip("bitsandbytes")
    from lorafit.config import ModelConfig
    from lorafit.model import load_base_model

    model = load_base_model(ModelConfig(base=str(tiny_model_dir), dtype="float32", quantize="4bit",
                                        double_quant=False))
    inject_lora(model, LoRAConfig(r=4, alpha=4, init="loftq"))  # alpha = r: LoftQ's start is W's approximation
    original = tiny_model()
    for name, layer in lora_modules(model).items():
        weight = original.get_submodule(name).weight.detach()
        A, B, _ = base_init.loftq(weight, 4, 1)  # PEFT's loftq_init (test above) quantizes as the loader did
        A_ours, B_ours = aligned(layer.lora_A.weight, layer.lora_B.weight, A, B)
        assert_close_by_rule(A_ours, A, reduction=weight.numel(), msg=name)
        assert_close_by_rule(B_ours, B, reduction=weight.numel(), msg=name)
    # the start is nearer the full-precision model than the 4-bit base alone
    full = original.eval()(input_ids).logits
    plain = load_base_model(ModelConfig(base=str(tiny_model_dir), dtype="float32", quantize="4bit",
                                        double_quant=False))
    assert (model.eval()(input_ids).logits - full).abs().mean() < (plain(input_ids).logits - full).abs().mean()


@pytest.mark.parametrize(("lora", "model", "message"), [
    ("variant: vera, init: pissa", "", "lora.init does not apply to variant: vera"),
    ("variant: adalora, init: olora", "", "lora.init does not apply to variant: adalora"),
    ("variant: dora, init: pissa", "", "does not combine with variant: dora"),
    ("init: pissa, rank_allocation: {rho: 1.0}", "", "choose one"),
    ("init: gaussian, init_iter: 4", "", "init_iter applies to init pissa"),
    ("init: loftq", "", "set model.quantize: 4bit"),
    ("init: pissa", "quantize: 4bit", "Remove model.quantize, or use init: loftq"),
    ("init: olora", "quantize: 8bit", "quantizing it twice"),
])
def test_refused_with_the_fix(lora, model, message, tmp_path):
    text = f"model: {{base: x, {model}}}\nlora: {{{lora}}}\ndata: {{train: t.jsonl}}\n"
    with pytest.raises(LorafitError, match=message):
        load_recipe(write_recipe(tmp_path / "r.yaml", text))


def test_plan_line_names_the_init():
    from lorafit.adapters import REGISTRY

    line = REGISTRY["lora"].describe(LoRAConfig(r=4, alpha=8, init="pissa", init_iter=4))
    assert "init=pissa (fast SVD, 4 iterations)" in line and "rank-2r LoRA of the original base" in line
    assert "init" not in REGISTRY["lora"].describe(LoRAConfig(r=4, alpha=8))


@pytest.mark.numerics
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_conv1d_bases_start_at_the_base_and_save_against_it(init, tmp_path, input_ids):
    """GPT-2's Conv1D stores W as [in, out]: the init works on the [out, in] view (PEFT's olora_init factors the
    stored [in, out] matrix, giving A, B of the wrong shapes, so here the check is the invariant, not PEFT's init),
    and PEFT loads the saved adapter over the untouched GPT-2 with the trained model's logits."""
    from .test_conv1d import tiny_gpt2

    model = tiny_gpt2()
    inject_lora(model, LoRAConfig(r=4, alpha=8, init=init))
    reduction = reduction_through(model, tokens=input_ids.numel())
    assert_close_by_rule(model(input_ids).logits, tiny_gpt2()(input_ids).logits, reduction=reduction)
    trained(model)
    save_adapter(model, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "adapter").eval()
    assert_close_by_rule(loaded(input_ids).logits, model(input_ids).logits, reduction=reduction)


def test_moe_expert_parameters_refuse_a_base_init():
    from .test_moe import tiny_moe

    with pytest.raises(LorafitError, match="lora.init: pissa does not apply to MoE expert parameters"):
        inject_lora(tiny_moe("mixtral"), LoRAConfig(r=4, init="pissa"))
    inject_lora(tiny_moe("mixtral"), LoRAConfig(r=4, init="pissa", target_modules=["q_proj", "v_proj"]))
