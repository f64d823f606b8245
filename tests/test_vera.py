"""VeRA: projections bit-identical to PEFT's, the formula by hand, a 4-bit base, a run. PEFT both ways and merge:
test_adapters_conformance.py."""


import pytest
import torch
from peft import VeraConfig, get_peft_model

from lorafit.adapter_io import load_adapter
from lorafit.config import LoRAConfig, load_recipe
from lorafit.errors import LorafitError
from lorafit.inject import inject_lora, lora_modules
from lorafit.train import train as run_training

from .conftest import ctrl_c_after_step, day_run, four_bit_tiny, tiny_model, train_losses
from .tolerance import assert_close_by_rule

TARGETS = ["q_proj", "v_proj", "down_proj"]  # out/in differ: 32x32, 16x32, 32x64 -> projections for [32, 64]


def perturb_lambdas(model, seed: int = 3) -> None:
    """λ_b starts at zero (ΔW = 0); give both vectors values so the update matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.vera_lambda_b.copy_(torch.randn(module.vera_lambda_b.shape, generator=generator))
            module.vera_lambda_d.add_(torch.randn(module.vera_lambda_d.shape, generator=generator))


def peft_vera(model, **settings):
    return get_peft_model(model, VeraConfig(r=4, target_modules=TARGETS, **settings))


def ours_vera(**settings):
    model = tiny_model()
    inject_lora(model, LoRAConfig(r=4, target_modules=TARGETS, variant="vera", **settings))
    return model


def test_projections_are_bit_identical_to_peft_for_the_same_key():
    # Bit-exact by the rule: both draw the same numbers from the same seeded generator and scale them by the
    # same bound; no sum is involved, so no kernel can round them differently.
    for key in (0, 1234):
        theirs = peft_vera(tiny_model(), projection_prng_key=key)
        ours = ours_vera(vera={"projection_prng_key": key})
        projections = next(iter(lora_modules(ours).values())).projections
        assert torch.equal(projections.vera_A, theirs.base_model.vera_A["default"])
        assert torch.equal(projections.vera_B, theirs.base_model.vera_B["default"])
        assert projections.vera_A.shape == (4, 64) and projections.vera_B.shape == (32, 4)
    modules = list(lora_modules(ours).values())
    assert all(m.projections is modules[0].projections for m in modules)  # one shared object


@pytest.mark.numerics
def test_forward_is_the_formula_and_starts_as_the_base(input_ids):
    model = ours_vera()
    base = tiny_model()
    # λ_b = 0: the same base kernels on the same inputs plus an exact zero, so bit-exact.
    torch.testing.assert_close(model(input_ids).logits, base(input_ids).logits, atol=0, rtol=0)
    layer = lora_modules(model)["model.layers.0.mlp.down_proj"]
    assert torch.equal(layer.vera_lambda_d, torch.full((4,), 0.1)) and not layer.vera_lambda_b.any()
    perturb_lambdas(model)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    A = layer.projections.vera_A[:, :64].double()
    B = layer.projections.vera_B[:32].double()
    by_hand = x.double() @ layer.base_layer.weight.double().T + \
        layer.vera_lambda_b.double() * ((layer.vera_lambda_d.double() * (x.double() @ A.T)) @ B.T)
    # fp32 against fp64: the base's sum over in (64) and the update's two (64, then r = 4) add in quadrature.
    # (1505ed4 held this at atol 1e-6 = 2 ulp of values near 6.4; MKL's AVX-512 path lands 1.25e-6 away.)
    assert_close_by_rule(layer(x), by_hand, reduction=64 + 64 + 4)
    merged = layer(x)
    layer.merge()
    assert_close_by_rule(layer(x), merged, reduction=64 + 64 + 4)  # merge == unmerged output
    layer.unmerge()
    assert sum(p.numel() for p in layer.adapter_params().values()) == 4 + 32  # r + out


def test_adapter_without_projections_is_refused_with_the_fix(tmp_path):
    peft_vera(tiny_model(), save_projection=False).save_pretrained(tmp_path / "peft")
    with pytest.raises(LorafitError, match="save_projection=True"):
        load_adapter(tiny_model(), tmp_path / "peft")


def test_vera_over_a_4bit_base(tmp_path, input_ids):
    pytest.importorskip("bitsandbytes")
    model = four_bit_tiny(tmp_path, LoRAConfig(r=4, variant="vera"))
    perturb_lambdas(model)
    model.train()
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert torch.isfinite(loss) and grads and all("vera_lambda" in n for n in grads)


def test_settings_that_vera_would_ignore_are_errors():
    with pytest.raises(ValueError, match="lora.alpha does not apply to variant: vera"):
        LoRAConfig(variant="vera", alpha=8)
    with pytest.raises(ValueError, match="lora.vera sets options of variant vera"):
        LoRAConfig(vera={"d_initial": 0.5})


def test_train_with_variant_vera_learns_and_resumes_exactly(tmp_path, tiny_model_dir, monkeypatch):
    recipe = day_run(tmp_path, tiny_model_dir, "r: 16, variant: vera", max_steps=6, lr=5.0e-2)

    def losses(out):
        return train_losses(tmp_path / out)

    summary = run_training(recipe("straight"))
    assert losses("straight")[-1] < losses("straight")[0]
    # 14 layers: r + out each (q, o: 32; k, v: 16; gate, up: 64; down: 32), per decoder layer x 2
    assert summary.report.trainable == 2 * (7 * 16 + 32 + 16 + 16 + 32 + 64 + 64 + 32)
    assert load_recipe(tmp_path / "straight" / "recipe.yaml").lora.variant == "vera"
    with ctrl_c_after_step(monkeypatch, 4), pytest.raises(LorafitError, match="interrupted after step 4"):
        run_training(recipe("resumed"))
    run_training(recipe("resumed"), resume="latest")
    assert losses("resumed") == losses("straight")  # same code, same inputs, same device: bit-exact
