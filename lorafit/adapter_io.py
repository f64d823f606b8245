"""Adapters on disk in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.<module path>.<part>``; which parts, and which config fields, is each method's PEFT
record (lorafit/adapters/<method>.py). That is what ``peft.PeftModel.from_pretrained`` reads and what PEFT's
``save_pretrained`` writes. Writing asks each layer what it saves (``saved_tensors``, ``peft_config``); reading
asks the registry which method's record the config is (``peft_type`` and flags) and lets that method read the
tensors, so the adapters PEFT writes for linear layers in the registry's methods load here. This file owns
the fields every PEFT adapter has, the checks shared by all records, and the files. Safetensors only: no
pickle is ever read."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["KEY_PREFIX", "TOKENS_KEY", "SavedUpdate", "load_adapter", "read_adapter", "save_adapter"]

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorafit.adapters import PEFT_TYPES, REGISTRY, method_of_record
from lorafit.adapters.base import AdapterLayer, SavedUpdate, is_conv1d, layer_shape, wrap_module
from lorafit.adapters.experts import ParamLoRA, ParamTarget, named_in_config, saved_paths, target_path, wrap_parameter
from lorafit.adapters.lora import KEY_PREFIX
from lorafit.adapters.saved_modules import load_saved_modules, saved_modules, saved_tensors, split_saved
from lorafit.adapters.tokens import CONFIG_KEY as TOKENS_KEY
from lorafit.adapters.tokens import (
    check_token_config,
    load_tokens,
    owned_token_rows,
    split_tokens,
    token_config,
    token_tensors,
)
from lorafit.errors import LorafitError
from lorafit.files import atomic_dir
from lorafit.inject import lora_modules, set_trainable

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# PEFT options that change the math; an adapter using any of them is refused instead of loaded wrong.
_UNSUPPORTED = {
    "lora_bias": False,
    "layer_replication": None,
    "use_qalora": False,
}


def save_adapter(model: nn.Module, out_dir: str | Path, base_model_name: str | None = None,
                 tokenizer: Any = None) -> Path:
    """Write the model's LoRA weights and config to ``out_dir``, atomically (temp folder, then rename)."""
    return save_adapter_content(Path(out_dir), adapter_content(model, base_model_name), tokenizer)


def save_adapter_content(out_dir: Path, content: AdapterContent, tokenizer: Any = None) -> Path:
    with atomic_dir(out_dir, "the adapter") as tmp:
        write_adapter_content(tmp, content, tokenizer)
    return out_dir


AdapterContent = tuple[dict[str, torch.Tensor], dict[str, Any]]


def adapter_content(model: nn.Module, base_model_name: str | None = None) -> AdapterContent:
    """The adapter file's tensors (PEFT keys, whole tensors on CPU) and its adapter_config.json fields.
    When the layers are sharded over processes every process must call this: it gathers each tensor."""
    from lorafit.distributed import full

    modules = lora_modules(model)
    if not modules:
        raise ValueError("save_adapter: the model has no adapter layers")
    layer = type(next(iter(modules.values())))
    tensors = {
        f"{KEY_PREFIX}{name}.{part}": full(tensor).detach().contiguous().cpu()
        for name, module in modules.items()
        for part, tensor in module.saved_tensors().items()
    }
    tensors.update({key: t.detach().contiguous().cpu() for key, t in layer.shared_tensors(modules).items()})
    tensors.update({key: full(t).detach().contiguous().cpu() for key, t in saved_tensors(model).items()})
    tensors.update({key: full(t).detach().contiguous().cpu() for key, t in token_tensors(model).items()})
    config = {**adapter_config(modules, base_model_name), "modules_to_save": sorted(saved_modules(model)) or None}
    if (indices := token_config(model)) is not None:
        config[TOKENS_KEY] = indices
    return tensors, config


def write_adapter_files(model: nn.Module, folder: Path, base_model_name: str | None = None) -> None:
    write_adapter_content(folder, adapter_content(model, base_model_name))


def write_adapter_content(folder: Path, content: AdapterContent, tokenizer: Any = None) -> None:
    """The two adapter files, and ``tokenizer``'s files beside them when given (a run that added tokens: the
    adapter's ids mean something only with that tokenizer; eval, generate, merge and export then use it)."""
    tensors, config = content
    save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def adapter_config(modules: dict[str, AdapterLayer], base_model_name: str | None) -> dict[str, Any]:
    """The method's PEFT config fields plus those every PEFT adapter has."""
    layer = type(next(iter(modules.values())))
    # rank/alpha patterns and target_parameters name an expert parameter by its path, as PEFT matches them.
    named = {target_path(name, module): module for name, module in modules.items()}
    parameters = sorted(name for name, module in named.items() if isinstance(module, ParamLoRA))
    linear = sorted(name for name, module in modules.items() if not isinstance(module, ParamLoRA))
    return {
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "revision": None,
        "inference_mode": True,
        # Full module paths: exact for any targeting rule (suffixes, regex, layer subsets), and what
        # PEFT itself writes for all-linear. PEFT matches list entries by dotted suffix.
        "target_modules": linear or None,
        **({"target_parameters": parameters} if parameters else {}),  # MoE experts (lorafit/adapters/experts.py)
        # What lorafit never trains (biases, extra modules) and the weight layout it always uses.
        "bias": "none",
        "fan_in_fan_out": any(module.fan_in_fan_out for module in modules.values()),  # Conv1D bases (GPT-2)
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        **layer.peft_config(named),
    }


def load_adapter(model: nn.Module, adapter_dir: str | Path, trainable: bool = False) -> dict[str, AdapterLayer]:
    """Wrap ``model``'s layers with the adapter in ``adapter_dir`` (lorafit's or PEFT's).

    Everything is checked before the first layer is wrapped, so a bad adapter leaves the model untouched.
    """
    adapter_dir = Path(adapter_dir)
    if lora_modules(model):
        raise LorafitError("this model already carries LoRA layers; load the adapter into a fresh base model")
    parts = read_parts(adapter_dir, model)
    config, per_module = parts.config, parts.updates
    _check_fit(model, per_module, adapter_dir)
    # Trained token rows first: growing the vocabulary needs the plain embedding and head.
    load_tokens(model, config, parts.rows, adapter_dir)
    dropout = float(config.get("lora_dropout", config.get("vera_dropout")) or 0.0)
    # Expert parameters first, in the order their modules register them: the order their wrappers nest in.
    experts = [name for name, found in per_module.items() if getattr(found, "parameter", None) is not None]
    for name in sorted(experts, key=list(_saved_parameter_paths(model, config)).index):
        found = per_module[name]
        wrap_parameter(model, found.parameter, **found.kwargs)  # no dropout on a weight update
    for name, found in per_module.items():
        if name not in experts:
            wrap_module(model, name, found.method.layer, **found.kwargs, dropout=dropout)
    wrapped = lora_modules(model)
    for name, found in per_module.items():
        wrapped[name].load_saved(found.tensors)
    load_saved_modules(model, parts.copies, adapter_dir)
    if trainable:
        set_trainable(model)
    else:
        model.requires_grad_(False)
    return wrapped


def read_adapter(adapter_dir: str | Path, model: nn.Module | None = None) -> dict[str, SavedUpdate]:
    """Module path -> its saved update, from an adapter folder (lorafit's or PEFT's). Without a model, except for
    adapters of MoE expert parameters: which parameter a saved path updates depends on the model's layout."""
    return read_parts(adapter_dir, model).updates


@dataclass
class AdapterParts:
    """An adapter folder, read once: its config, the method's update per module, and what trains beside it."""

    config: dict[str, Any]
    updates: dict[str, SavedUpdate]
    copies: dict[str, dict[str, torch.Tensor]]  # lora.modules_to_save: module path -> its saved state dict
    rows: dict[str, torch.Tensor]  # data.add_special_tokens: layer path -> its trained token rows
    method_tensors: dict[str, torch.Tensor]  # the file's tensors of the method itself (VeRA's shared ones too)


def read_parts(adapter_dir: str | Path, model: nn.Module | None = None) -> AdapterParts:
    """Everything an adapter folder holds (``read_adapter`` says when ``model`` may be None)."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    tensors = _read_weights(adapter_dir)
    if config.get("target_parameters") and model is None:
        raise LorafitError(f"{adapter_dir}: this adapter updates MoE expert parameters (target_parameters in "
                           f"{CONFIG_NAME}); lorafit reads it together with its base model (merge, eval, generate "
                           "do), not on its own")
    copies, tensors = split_saved(tensors, config.get("modules_to_save"))
    rows, tensors = split_tokens(tensors)
    updates = method_of_record(config).read(tensors, config, adapter_dir / WEIGHTS_NAME,
                                            _saved_parameter_paths(model, config))
    return AdapterParts(config, updates, copies, rows, tensors)


def read_saved_modules(adapter_dir: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """The adapter's modules_to_save: module path -> its saved state dict (empty without any)."""
    adapter_dir = Path(adapter_dir)
    return split_saved(_read_weights(adapter_dir), read_adapter_config(adapter_dir).get("modules_to_save"))[0]


def _saved_parameter_paths(model: nn.Module | None, config: dict[str, Any]) -> dict[str, ParamTarget]:
    """PEFT's saved path of each expert parameter the config targets (none without target_parameters)."""
    if model is None or not config.get("target_parameters"):
        return {}
    return saved_paths(named_in_config(model, config["target_parameters"]))


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / CONFIG_NAME
    if not path.is_file():
        raise LorafitError(f"{adapter_dir}: no {CONFIG_NAME} here, so this is not an adapter folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LorafitError(f"{path}: could not be read as JSON ({err})") from None
    if not isinstance(config, dict):
        raise LorafitError(f"{path}: expected a JSON object of PEFT config fields, found a JSON "
                           f"{type(config).__name__}; re-save the adapter with lorafit or PEFT")
    if config.get("peft_type", "LORA") not in PEFT_TYPES:
        kind = config.get("peft_type")
        raise LorafitError(f"{path}: peft_type {kind!r} is not supported; lorafit loads {', '.join(PEFT_TYPES)} "
                           f"adapters (methods: {', '.join(REGISTRY)})")
    method_of_record(config).check_config(config, path)
    if config.get(TOKENS_KEY):
        check_token_config(config[TOKENS_KEY], path)
    for key, plain in _UNSUPPORTED.items():
        if config.get(key, plain) not in (plain, [], {}):
            raise LorafitError(f"{path}: {key}={config[key]!r} is not supported by lorafit (only plain LoRA is)")
    if config.get("bias", "none") != "none":
        raise LorafitError(f"{path}: bias={config['bias']!r} is not supported; lorafit adapters train no biases")
    _check_field_types(config, path)
    return config


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Fields whose values lorafit computes with, and what each must be; a wrong type gets one message.
_FIELD_CHECKS: dict[str, tuple[str, Any]] = {
    "r": ("a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "init_r": ("a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "target_r": ("a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "lora_alpha": ("a number", _is_number),
    "lora_dropout": ("a number in [0, 1)", lambda v: v is None or (_is_number(v) and 0 <= v < 1)),
    "vera_dropout": ("a number in [0, 1)", lambda v: v is None or (_is_number(v) and 0 <= v < 1)),
    "d_initial": ("a number", _is_number),
    "use_rslora": ("true or false", lambda v: isinstance(v, bool)),
    "use_dora": ("true or false", lambda v: isinstance(v, bool)),
    "rank_pattern": ("a mapping of module patterns", lambda v: v is None or isinstance(v, dict)),
    "alpha_pattern": ("a mapping of module patterns to numbers",
                      lambda v: v is None or (isinstance(v, dict) and all(map(_is_number, v.values())))),
}


def _check_field_types(config: dict[str, Any], path: Path) -> None:
    for key, (expected, valid) in _FIELD_CHECKS.items():
        if key in config and not valid(config[key]):
            raise LorafitError(f"{path}: {key} must be {expected}, got {config[key]!r}; fix the value (or re-save "
                               "the adapter with the tool that trained it)")
    pattern = config.get("rank_pattern") or {}
    bad = next((k for k, v in pattern.items() if not (
        (isinstance(v, int) and not isinstance(v, bool) and v >= 1)  # LoRA: a rank
        or (isinstance(v, list) and all(isinstance(b, bool) for b in v)))), None)  # AdaLoRA: a mask
    if bad is not None:
        raise LorafitError(f"{path}: rank_pattern[{bad!r}] must be a positive rank (or, for AdaLoRA, a list of "
                           f"true/false), got {pattern[bad]!r}")


def _read_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    path = adapter_dir / WEIGHTS_NAME
    if not path.is_file():
        pickled = " (found adapter_model.bin: re-save it as safetensors; lorafit never loads pickle)" \
            if (adapter_dir / "adapter_model.bin").exists() else ""
        raise LorafitError(f"{adapter_dir}: no {WEIGHTS_NAME}{pickled}")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise LorafitError(f"{path}: not a readable safetensors file ({err})") from None


def _check_fit(model: nn.Module, per_module: dict[str, SavedUpdate], adapter_dir: Path) -> None:
    problems = []
    for name, found in per_module.items():
        if getattr(found, "parameter", None) is not None:  # found in the model by its saved path already
            layout = found.parameter.layout
            if problem := found.misfit(layout.out_features, layout.in_features):
                problems.append(f"parameter {found.parameter.path}: {problem}")
            continue
        try:
            base = model.get_submodule(name)
        except AttributeError:
            problems.append(f"module {name} does not exist in the base model")
            continue
        if not isinstance(base, nn.Linear) and not is_conv1d(base):
            problems.append(f"module {name} is a {type(base).__name__}, not a linear layer")
            continue
        problem = found.misfit(*layer_shape(base))
        if problem:
            problems.append(f"module {name}: {problem}")
    if problems:
        raise misfit_error(adapter_dir, problems)


def misfit_error(adapter_dir: Path, problems: list[str]) -> LorafitError:
    """One error listing (up to ten of) the modules whose shapes do not fit the base."""
    shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
    return LorafitError(
        f"adapter {adapter_dir} does not fit this base model (was it trained on another base?):\n"
        + "\n".join(f"  {p}" for p in shown)
    )


def restore_adapter_weights(model: nn.Module, folder: Path) -> None:
    """Copy saved adapter weights into a model already injected with the same recipe (used by --resume)."""
    tensors = _read_weights(folder)
    for name, module in lora_modules(model).items():
        saved = {}
        for part, expected in module.saved_tensors().items():
            key = f"{KEY_PREFIX}{name}.{part}"
            if key not in tensors or tensors[key].shape != expected.shape:
                raise LorafitError(f"{folder}: checkpoint does not match this recipe's adapter layers ({key}); "
                                   "resume with the recipe that wrote it")
            saved[part] = tensors[key]
        module.load_saved(saved)
    for name, module in saved_modules(model).items():  # lora.modules_to_save's copies
        module.trained.load_state_dict(split_saved(tensors, [name])[0][name])
    rows = split_tokens(tensors)[0]
    for name, module in owned_token_rows(model).items():  # data.add_special_tokens's rows
        if name not in rows or rows[name].shape != module.trainable_tokens_delta.shape:
            raise LorafitError(f"{folder}: checkpoint does not match this recipe's token rows ({name}); resume "
                               "with the recipe that wrote it")
        with torch.no_grad():
            module.trainable_tokens_delta.copy_(rows[name])


def start_from_adapter(model: nn.Module, folder: str | Path) -> None:
    """``lora.init_from``: copy a saved adapter's weights (lorafit's or PEFT's) into the layers the recipe injected,
    once the recipe is seen to describe that adapter — same method, modules, ranks, scaling and shared tensors —
    so that training continues exactly from it. Anything else is one error listing what differs."""
    folder = Path(folder)
    parts = read_parts(folder, model)
    config, updates, layers = parts.config, parts.updates, lora_modules(model)
    problems = [f"module {name}: the recipe adapts it, the adapter does not" for name in layers if name not in updates]
    problems += [f"module {name}: the adapter adapts it, the recipe does not" for name in updates if name not in layers]
    for name in layers.keys() & updates.keys():
        problems += _start_misfits(name, layers[name], updates[name])
    rows, owned, copies, wrapped = parts.rows, owned_token_rows(model), parts.copies, saved_modules(model)
    problems += _token_misfits(rows, owned, config.get(TOKENS_KEY), token_config(model))
    problems += _copy_misfits(copies, wrapped)
    if not problems:
        layer = type(next(iter(layers.values())))
        problems += [f"{key} differs from the recipe's (VeRA: lora.vera.projection_prng_key)"
                     for key, tensor in layer.shared_tensors(layers).items()
                     if key not in parts.method_tensors or not torch.equal(parts.method_tensors[key],
                                                                          tensor.detach().cpu())]
    if problems:
        shown = sorted(problems)[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise LorafitError(f"lora.init_from: adapter {folder} (peft_type {config.get('peft_type', 'LORA')}) is not "
                           "the adapter this recipe's lora block describes; set lora.variant, r, alpha, "
                           "target_modules (and layers, patterns) as that adapter was trained:\n"
                           + "\n".join(f"  {p}" for p in shown))
    for name, layer in layers.items():
        layer.load_saved(updates[name].tensors)
    with torch.no_grad():
        for name, module in owned.items():  # data.add_special_tokens: the rows the adapter trained
            module.trainable_tokens_delta.copy_(rows[name])
    for name, module in wrapped.items():  # lora.modules_to_save: the copies the adapter trained
        module.trained.load_state_dict(copies[name])


def _copy_misfits(copies: dict[str, dict[str, torch.Tensor]], wrapped: dict[str, Any]) -> list[str]:
    """What differs between the adapter's modules_to_save copies and the recipe's lora.modules_to_save."""
    if set(copies) != set(wrapped):
        return [f"lora.modules_to_save: the adapter trained copies of {sorted(copies) or 'no module'}, the recipe "
                f"of {sorted(wrapped) or 'no module'}; list the modules the adapter was trained with"]
    return [f"lora.modules_to_save {name}: the adapter's copy holds other tensors or shapes than the recipe's"
            for name, module in wrapped.items()
            if {k: v.shape for k, v in module.trained.state_dict().items()} != {k: v.shape for k, v in
                                                                               copies[name].items()}]


def _token_misfits(rows: dict[str, torch.Tensor], owned: dict[str, Any], saved_ids: Any, recipe_ids: Any) -> list[str]:
    """What differs between the adapter's trained token rows and those data.add_special_tokens gives the recipe."""
    if set(rows) != set(owned):
        return [f"trained token rows (data.add_special_tokens): the adapter has them in {sorted(rows) or 'no layer'}, "
                f"the recipe in {sorted(owned) or 'no layer'}; list the tokens the adapter was trained with"]
    if rows and saved_ids != recipe_ids:
        return [f"trained token rows: ids {saved_ids} in the adapter, {recipe_ids} in the recipe; list the same tokens "
                "in the same order in data.add_special_tokens"]
    return [f"{name}: trained token rows of shape {tuple(rows[name].shape)} in the adapter, "
            f"{tuple(m.trainable_tokens_delta.shape)} in the recipe" for name, m in owned.items()
            if rows[name].shape != m.trainable_tokens_delta.shape]


def _start_misfits(name: str, ours: AdapterLayer, found: SavedUpdate) -> list[str]:
    if type(ours) is not found.method.layer:
        return [f"module {name}: the adapter is {found.method.name}, the recipe's lora.variant builds "
                f"{type(ours).__name__}"]
    problems = [f"module {name}: {key} is {found.kwargs[key]} in the adapter, {getattr(ours, key)} in the recipe"
                for key in ("r", "alpha", "use_rslora", "d_initial")
                if key in found.kwargs and hasattr(ours, key) and float(found.kwargs[key]) != float(getattr(ours, key))]
    shapes = {part: tuple(t.shape) for part, t in ours.saved_tensors().items()}
    theirs = {part: tuple(t.shape) for part, t in found.tensors.items()}
    if not problems and shapes != theirs:
        problems.append(f"module {name}: tensors {theirs} in the adapter, {shapes} in the recipe")
    return problems
