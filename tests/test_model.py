"""Base model / tokenizer loading from each form model.base accepts (offline forms only)."""

import pytest
import torch

from lorafit.config import LoRAConfig, ModelConfig, locate_package_file
from lorafit.errors import LorafitError
from lorafit.inject import inject_lora
from lorafit.model import BaseSource, compile_layers, load_base_model, load_tokenizer, resolve_base

from .conftest import tiny_model


def test_local_folder_loads_frozen_in_requested_dtype(tiny_model_dir, input_ids):
    model = load_base_model(ModelConfig(base=str(tiny_model_dir), dtype="float32"))
    assert not any(p.requires_grad for p in model.parameters())
    # the same weights through the same code on the same inputs: bit-exact
    torch.testing.assert_close(model(input_ids).logits, tiny_model()(input_ids).logits, atol=0, rtol=0)
    assert load_base_model(ModelConfig(base=str(tiny_model_dir), dtype="bfloat16")).dtype == torch.bfloat16


def test_tokenizer_without_pad_gets_unk_not_eos(tiny_model_dir):
    tokenizer = load_tokenizer(ModelConfig(base=str(tiny_model_dir)))
    assert tokenizer.pad_token == "<unk>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.chat_template


def test_resolve_forms(tmp_path, tiny_model_dir):
    assert resolve_base(str(tiny_model_dir)) == BaseSource(str(tiny_model_dir.resolve()))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert resolve_base(str(gguf)) == BaseSource(str(tmp_path.resolve()), "m.gguf")
    assert resolve_base("HuggingFaceTB/SmolLM2-135M-Instruct") == BaseSource("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_package_file_is_found_without_importing(tmp_path, monkeypatch):
    package = tmp_path / "fake_model_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (package / "weights.gguf").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert locate_package_file("pkg:fake_model_pkg/weights.gguf") == package / "weights.gguf"
    assert resolve_base("pkg:fake_model_pkg/weights.gguf") == BaseSource(str(package), "weights.gguf")
    with pytest.raises(LorafitError, match=r"no file 'other.gguf'.*weights.gguf"):
        locate_package_file("pkg:fake_model_pkg/other.gguf")
    with pytest.raises(LorafitError, match="expected pkg:PACKAGE/FILE"):
        locate_package_file("pkg:fake_model_pkg")


def test_unreachable_hub_id_is_a_clear_error():
    with pytest.raises(LorafitError, match="(?s)could not be loaded.*hub ids need network"):
        load_base_model(ModelConfig(base="no-such-org/no-such-model-xyz", dtype="float32"))


def test_compile_layers_compiles_each_decoder_layer_in_place():
    model = tiny_model()
    keys = list(model.state_dict())
    assert compile_layers(model, torch.device("cpu")) == 2
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert list(model.state_dict()) == keys  # checkpoints keep their key names


def test_every_compiled_layer_shares_one_graph_in_training():
    """The first layer's input (the frozen embedding's output) is made to ask for a gradient like every later
    layer's (LoRA outputs), so dynamo compiles the layer once, not again at layer 1 (a guard on requires_grad)."""
    from torch._dynamo.utils import counters

    model = tiny_model()
    inject_lora(model, LoRAConfig(r=4), for_training=True)
    compile_layers(model, torch.device("cpu"))
    torch._dynamo.reset()
    counters.clear()
    model(input_ids=torch.randint(0, 100, (2, 9)), use_cache=False).logits.sum().backward()
    assert counters["frames"]["ok"] == 1, dict(counters["frames"])
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_compile_without_a_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("lorafit.model.shutil.which", lambda name: None)
    with pytest.raises(LorafitError, match="needs a C\\+\\+ compiler"):
        compile_layers(tiny_model(), torch.device("cpu"))
