"""Adapters on disk in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

LoRA keys are ``base_model.model.<module path>.lora_A.weight`` ([r, in]) and ``...lora_B.weight``
([out, r]) (DoRA adds ``...lora_magnitude_vector``); VeRA and AdaLoRA use PEFT's VERA and ADALORA layouts
(see lorafit/vera.py, lorafit/adalora.py). That is what ``peft.PeftModel.from_pretrained`` reads and
what PEFT's ``save_pretrained`` writes. Each variant's layer says what it saves (``saved_tensors``,
``peft_config``); reading trusts the tensors (module paths and shapes) and takes scaling and the variant
from the config, so the adapters PEFT writes for linear layers in these four variants load here.
Safetensors only: no pickle is ever read."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorafit.adalora import RANKNUM_EPS, AdaLoRASettings, adalora_delta
from lorafit.dora import dora_merged_weight
from lorafit.errors import LorafitError
from lorafit.experts import ParamLoRA, ParamTarget, named_in_config, saved_paths, target_path, wrap_parameter
from lorafit.files import atomic_dir
from lorafit.inject import lora_modules, pattern_value, set_trainable, wrap_module
from lorafit.lora import AdapterLayer, is_conv1d, layer_shape, lora_delta, lora_scaling, merged_weight
from lorafit.vera import PROJECTION_KEYS, VeRAProjections, vera_delta

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_PARTS = ("lora_A.weight", "lora_B.weight")
MAGNITUDE = "lora_magnitude_vector"  # DoRA's [out] magnitude; PEFT saves it without ".weight"
# PEFT options that change the math; an adapter using any of them is refused instead of loaded wrong.
_UNSUPPORTED = {
    "lora_bias": False,
    "modules_to_save": None,
    "layer_replication": None,
    "trainable_token_indices": None,
    "use_qalora": False,
}


@dataclass
class ModuleAdapter:
    """One module's saved LoRA update: A [r, in], B [out, r], the scaling the config gives it, and for DoRA
    the magnitude [out]. Every saved update (this, VeRAUpdate, AdaLoRAUpdate) offers the same five members."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    r: int
    alpha: float
    use_rslora: bool = False
    magnitude: torch.Tensor | None = None
    parameter: ParamTarget | None = None  # an MoE expert parameter (lorafit/experts.py): A [E·r, in], B [out, r·E]
    experts: int = 1

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.use_rslora)

    @property
    def variant(self) -> str:
        return "lora" if self.magnitude is None else "dora"

    def layer_kwargs(self, dropout: float) -> dict[str, Any]:
        return {"r": self.r, "alpha": self.alpha, "dropout": dropout, "use_rslora": self.use_rslora}

    def copy_into(self, module: AdapterLayer) -> None:
        with torch.no_grad():
            module.lora_A.weight.copy_(self.lora_A)
            module.lora_B.weight.copy_(self.lora_B)
            if self.magnitude is not None:
                module.lora_magnitude_vector.copy_(self.magnitude)

    def misfit(self, out_features: int, in_features: int) -> str | None:
        """Why this update cannot apply to a base weight [out, in] (per expert), or None."""
        rows = self.r * self.experts
        want_a, want_b = (rows, in_features), (out_features, rows)
        got_a, got_b = tuple(self.lora_A.shape), tuple(self.lora_B.shape)
        if (got_a, got_b) == (want_a, want_b):
            return None
        experts = f" x {self.experts} experts" if self.experts > 1 else ""
        return (f"adapter has lora_A {list(got_a)}, lora_B {list(got_b)}, but the base layer is "
                f"[{out_features}, {in_features}] (out, in){experts} with r={self.r}, which needs lora_A "
                f"{list(want_a)}, lora_B {list(want_b)}")

    def low_rank(self, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The update of a base weight of ``shape`` as ΔW = B' @ A' (A' [k, in], B' [out, k], fp32, scaling
        folded into B'): what an A/B-only format such as llama.cpp's LoRA GGUF can hold."""
        if self.parameter is not None:
            raise LorafitError(f"{self.parameter.path} is an MoE expert parameter: an A/B-only file format cannot "
                               "hold per-expert updates; export the full model instead")
        if self.magnitude is not None:
            raise LorafitError("a DoRA adapter rescales each output row of W + ΔW by a learned magnitude, which is "
                               "not a low-rank update W + B·A: llama.cpp's --lora cannot apply it. Export the full "
                               "model instead (without --adapter-only)")
        return self.lora_A.float(), self.lora_B.float() * self.scaling

    def merged_weight(self, weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base weight with this update folded in (fp32 math), as the variant's layer merges it."""
        if self.magnitude is None:
            return merged_weight(weight, lora_delta(self.lora_A, self.lora_B, self.scaling), dtype)
        return dora_merged_weight(weight, self.lora_A, self.lora_B, self.scaling, self.magnitude, dtype)


@dataclass
class VeRAUpdate:
    """One module's saved VeRA update: λ_b [out], λ_d [r], and the projections all modules share."""

    lambda_b: torch.Tensor
    lambda_d: torch.Tensor
    projections: VeRAProjections
    d_initial: float = 0.1
    variant: str = "vera"

    def layer_kwargs(self, dropout: float) -> dict[str, Any]:
        return {"projections": self.projections, "dropout": dropout, "d_initial": self.d_initial}

    def copy_into(self, module: AdapterLayer) -> None:
        with torch.no_grad():
            module.vera_lambda_b.copy_(self.lambda_b)
            module.vera_lambda_d.copy_(self.lambda_d)

    def misfit(self, out_features: int, in_features: int) -> str | None:
        max_out, max_in = self.projections.vera_B.shape[0], self.projections.vera_A.shape[1]
        if self.lambda_b.shape[0] == out_features and in_features <= max_in and out_features <= max_out:
            return None
        return (f"adapter has vera_lambda_b [{self.lambda_b.shape[0]}] and projections for layers up to "
                f"[{max_out}, {max_in}], but the base layer is [{out_features}, {in_features}] (out, in)")

    def low_rank(self, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW = (λ_b ⊙ B-slice) @ (λ_d ⊙ A-slice) for a base weight of ``shape`` (out, in), as B' @ A' (fp32)."""
        out_features, in_features = shape
        scaled_A = self.lambda_d.float()[:, None] * self.projections.vera_A[:, :in_features].float()
        return scaled_A, self.lambda_b.float()[:, None] * self.projections.vera_B[:out_features].float()

    def merged_weight(self, weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        delta = vera_delta(self.projections.vera_A, self.projections.vera_B, self.lambda_b, self.lambda_d,
                           tuple(weight.shape))
        return merged_weight(weight, delta, dtype)


@dataclass
class AdaLoRAUpdate:
    """One module's saved AdaLoRA triplets: the kept rows of A [k, in], E [k, 1], B [out, k], which of the
    init_r triplets they are (``mask``), and the schedule the run used."""

    lora_A: torch.Tensor
    lora_E: torch.Tensor
    lora_B: torch.Tensor
    mask: torch.Tensor  # bool [init_r]
    alpha: float
    settings: AdaLoRASettings
    variant: str = "adalora"

    def layer_kwargs(self, dropout: float) -> dict[str, Any]:
        return {"r": self.mask.numel(), "alpha": self.alpha, "settings": self.settings, "dropout": dropout}

    def copy_into(self, module: AdapterLayer) -> None:
        module.set_mask(self.mask)
        module.load_saved({"lora_A": self.lora_A, "lora_E": self.lora_E, "lora_B": self.lora_B})

    def misfit(self, out_features: int, in_features: int) -> str | None:
        if self.lora_A.shape[1] == in_features and self.lora_B.shape[0] == out_features:
            return None
        return (f"adapter has lora_A {list(self.lora_A.shape)}, lora_B {list(self.lora_B.shape)}, but the base "
                f"layer is [{out_features}, {in_features}] (out, in)")

    def low_rank(self, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW = B · (A ⊙ E) · alpha / ranknum as B' @ A' (fp32) over the kept triplets (possibly none)."""
        scale = self.alpha / (float(self.mask.numel()) + RANKNUM_EPS)
        return self.lora_A.float() * self.lora_E.float(), self.lora_B.float() * scale

    def merged_weight(self, weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        delta = adalora_delta(self.lora_A, self.lora_E, self.lora_B, self.alpha, float(self.mask.numel()))
        return merged_weight(weight, delta, dtype)


SavedUpdate = ModuleAdapter | VeRAUpdate | AdaLoRAUpdate


def save_adapter(model: nn.Module, out_dir: str | Path, base_model_name: str | None = None) -> Path:
    """Write the model's LoRA weights and config to ``out_dir``, atomically (temp folder, then rename)."""
    return save_adapter_content(Path(out_dir), adapter_content(model, base_model_name))


def save_adapter_content(out_dir: Path, content: AdapterContent) -> Path:
    with atomic_dir(out_dir, "the adapter") as tmp:
        write_adapter_content(tmp, content)
    return out_dir


AdapterContent = tuple[dict[str, torch.Tensor], dict[str, Any]]


def adapter_content(model: nn.Module, base_model_name: str | None = None) -> AdapterContent:
    """The adapter file's tensors (PEFT keys, whole tensors on CPU) and its adapter_config.json fields.
    When the layers are sharded over processes every process must call this: it gathers each tensor."""
    from lorafit.distributed import full

    modules = lora_modules(model)
    if not modules:
        raise ValueError("save_adapter: the model has no adapter layers")
    variant = type(next(iter(modules.values())))
    tensors = {
        f"{KEY_PREFIX}{name}.{part}": full(tensor).detach().contiguous().cpu()
        for name, module in modules.items()
        for part, tensor in module.saved_tensors().items()
    }
    tensors.update({key: t.detach().contiguous().cpu() for key, t in variant.shared_tensors(modules).items()})
    return tensors, adapter_config(modules, base_model_name)


def write_adapter_files(model: nn.Module, folder: Path, base_model_name: str | None = None) -> None:
    write_adapter_content(folder, adapter_content(model, base_model_name))


def write_adapter_content(folder: Path, content: AdapterContent) -> None:
    tensors, config = content
    save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def adapter_config(modules: dict[str, AdapterLayer], base_model_name: str | None) -> dict[str, Any]:
    """The variant's PEFT config fields plus those every PEFT adapter has."""
    variant = type(next(iter(modules.values())))
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
        **({"target_parameters": parameters} if parameters else {}),  # MoE experts (lorafit/experts.py)
        # What lorafit never trains (biases, extra modules) and the weight layout it always uses.
        "bias": "none",
        "fan_in_fan_out": any(module.fan_in_fan_out for module in modules.values()),  # Conv1D bases (GPT-2)
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        **variant.peft_config(named),
    }


def load_adapter(model: nn.Module, adapter_dir: str | Path, trainable: bool = False) -> dict[str, AdapterLayer]:
    """Wrap ``model``'s layers with the adapter in ``adapter_dir`` (lorafit's or PEFT's).

    Everything is checked before the first layer is wrapped, so a bad adapter leaves the model untouched.
    """
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    if lora_modules(model):
        raise LorafitError("this model already carries LoRA layers; load the adapter into a fresh base model")
    per_module = read_adapter(adapter_dir, model)
    _check_fit(model, per_module, adapter_dir)
    dropout = float(config.get("lora_dropout", config.get("vera_dropout")) or 0.0)
    # Expert parameters first, in the order their modules register them: the order their wrappers nest in.
    experts = [name for name, found in per_module.items() if getattr(found, "parameter", None) is not None]
    for name in sorted(experts, key=list(_saved_parameter_paths(model, config)).index):
        found = per_module[name]
        wrap_parameter(model, found.parameter, **found.layer_kwargs(0.0))
    for name, found in per_module.items():
        if name not in experts:
            wrap_module(model, name, found.variant, **found.layer_kwargs(dropout))
    wrapped = lora_modules(model)
    for name, found in per_module.items():
        found.copy_into(wrapped[name])
    if trainable:
        set_trainable(model)
    else:
        model.requires_grad_(False)
    return wrapped


def read_adapter(adapter_dir: str | Path, model: nn.Module | None = None) -> dict[str, SavedUpdate]:
    """Module path -> its saved update, from an adapter folder (lorafit's or PEFT's). Without a model, except for
    adapters of MoE expert parameters: which parameter a saved path updates depends on the model's layout."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    tensors = _read_weights(adapter_dir)
    if config.get("peft_type") == "VERA":
        return _group_vera_tensors(tensors, config, adapter_dir)
    if config.get("peft_type") == "ADALORA":
        return _group_adalora_tensors(tensors, config, adapter_dir)
    if config.get("target_parameters") and model is None:
        raise LorafitError(f"{adapter_dir}: this adapter updates MoE expert parameters (target_parameters in "
                           f"{CONFIG_NAME}); lorafit reads it together with its base model (merge, eval, generate "
                           "do), not on its own")
    return _group_tensors(tensors, config, adapter_dir, _saved_parameter_paths(model, config))


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
    if config.get("peft_type", "LORA") not in ("LORA", "VERA", "ADALORA"):
        kind = config.get("peft_type")
        raise LorafitError(f"{path}: peft_type {kind!r} is not supported; lorafit loads LORA (incl. DoRA), "
                           "VERA and ADALORA adapters")
    if config.get("peft_type") == "VERA" and not config.get("save_projection", True):
        raise LorafitError(f"{path}: a VeRA adapter saved without its projections (save_projection: false); "
                           "lorafit reads VeRA adapters that carry them: re-save it with save_projection=True")
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


def _group_tensors(
    tensors: dict[str, torch.Tensor], config: dict[str, Any], adapter_dir: Path,
    parameters: dict[str, ParamTarget],
) -> dict[str, SavedUpdate]:
    """``base_model.model.<path>.lora_A.weight`` keys -> per-module A, B, r and alpha. An expert parameter's
    (``parameters``: saved path -> parameter) rank and alpha follow the patterns by the parameter's path."""
    known = (*_PARTS, MAGNITUDE) if config.get("use_dora", False) else _PARTS  # every module has exactly these
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        stripped = key.removeprefix(KEY_PREFIX)
        name, part = next(((stripped[: -len(p) - 1], p) for p in known if stripped.endswith("." + p)), (None, None))
        if name is None or not key.startswith(KEY_PREFIX):
            raise LorafitError(f"{adapter_dir / WEIGHTS_NAME}: unexpected tensor {key!r}; lorafit reads LoRA "
                               "tensors named base_model.model.<module>.lora_A.weight / lora_B.weight (and "
                               f".{MAGNITUDE} when {CONFIG_NAME} says use_dora: true)")
        parts.setdefault(name, {})[part] = tensor
    if not parts:
        raise LorafitError(f"{adapter_dir / WEIGHTS_NAME}: holds no LoRA tensors")
    grouped = {}
    for name, pair in parts.items():
        if set(pair) != set(known):
            raise LorafitError(
                f"{adapter_dir / WEIGHTS_NAME}: module {name} has {sorted(pair)} but needs {list(known)}"
            )
        parameter = parameters.get(name)
        config_name = parameter.path if parameter else name
        rank = int(pattern_value(config.get("rank_pattern") or {}, config_name, config.get("r", 8)))
        experts = parameter.layout.experts if parameter else 1
        if pair["lora_A.weight"].ndim != 2 or pair["lora_B.weight"].shape[1:] != (rank * experts,) \
                or pair["lora_A.weight"].shape[0] != rank * experts:
            per_expert = f" for each of {experts} experts" if experts > 1 else ""
            raise LorafitError(
                f"{adapter_dir / WEIGHTS_NAME}: module {name} has lora_A {list(pair['lora_A.weight'].shape)} and "
                f"lora_B {list(pair['lora_B.weight'].shape)}, which do not agree with r={rank}{per_expert} from "
                f"{CONFIG_NAME}"
            )
        magnitude = pair.get(MAGNITUDE)
        if magnitude is not None and tuple(magnitude.shape) != (pair["lora_B.weight"].shape[0],):
            raise LorafitError(f"{adapter_dir / WEIGHTS_NAME}: module {name} has {MAGNITUDE} "
                               f"{list(magnitude.shape)}, which does not agree with lora_B "
                               f"{list(pair['lora_B.weight'].shape)} (one magnitude per output row)")
        grouped[name] = ModuleAdapter(
            pair["lora_A.weight"],
            pair["lora_B.weight"],
            r=rank,
            alpha=float(pattern_value(config.get("alpha_pattern") or {}, config_name, config.get("lora_alpha", 8))),
            use_rslora=bool(config.get("use_rslora", False)),
            magnitude=magnitude,
            parameter=parameter,
            experts=experts,
        )
    return grouped


def _group_vera_tensors(tensors: dict[str, torch.Tensor], config: dict[str, Any], adapter_dir: Path
                        ) -> dict[str, SavedUpdate]:
    """``base_model.model.<path>.vera_lambda_b`` / ``_d`` keys plus the shared ``base_model.vera_A`` / ``_B``."""
    where = adapter_dir / WEIGHTS_NAME
    missing = [key for key in PROJECTION_KEYS if key not in tensors]
    if missing:
        raise LorafitError(f"{where}: a VeRA adapter needs {', '.join(missing)} (the shared projections)")
    vera_A, vera_B = (tensors.pop(key) for key in PROJECTION_KEYS)
    if vera_A.ndim != 2 or vera_B.ndim != 2 or vera_A.shape[0] != vera_B.shape[1]:
        raise LorafitError(f"{where}: projections vera_A {list(vera_A.shape)} and vera_B {list(vera_B.shape)} "
                           "do not agree (need [r, in] and [out, r])")
    projections = VeRAProjections(vera_A, vera_B, config.get("projection_prng_key"))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, part = key.removeprefix(KEY_PREFIX).rpartition(".")
        if not key.startswith(KEY_PREFIX) or part not in ("vera_lambda_b", "vera_lambda_d"):
            raise LorafitError(f"{where}: unexpected tensor {key!r}; a VeRA adapter holds "
                               "base_model.model.<module>.vera_lambda_b / vera_lambda_d and the projections")
        parts.setdefault(name, {})[part] = tensor
    if not parts:
        raise LorafitError(f"{where}: holds no VeRA layers")
    updates = {}
    for name, pair in parts.items():
        if set(pair) != {"vera_lambda_b", "vera_lambda_d"} or pair["vera_lambda_d"].shape != (vera_A.shape[0],):
            raise LorafitError(f"{where}: module {name} needs vera_lambda_b [out] and vera_lambda_d "
                               f"[{vera_A.shape[0]}] (r from the projections)")
        updates[name] = VeRAUpdate(pair["vera_lambda_b"], pair["vera_lambda_d"], projections,
                                   float(config.get("d_initial", 0.1)))
    return updates


def _group_adalora_tensors(tensors: dict[str, torch.Tensor], config: dict[str, Any], adapter_dir: Path
                           ) -> dict[str, SavedUpdate]:
    """``base_model.model.<path>.lora_A`` / ``lora_E`` / ``lora_B`` keys (the kept triplets) and the config's
    ``rank_pattern`` (``<path>.lora_E`` -> a bool per initial triplet; absent: all kept)."""
    where = adapter_dir / WEIGHTS_NAME
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, part = key.removeprefix(KEY_PREFIX).rpartition(".")
        if not key.startswith(KEY_PREFIX) or part not in ("lora_A", "lora_E", "lora_B"):
            raise LorafitError(f"{where}: unexpected tensor {key!r}; an AdaLoRA adapter holds "
                               "base_model.model.<module>.lora_A / lora_E / lora_B")
        parts.setdefault(name, {})[part] = tensor
    if not parts:
        raise LorafitError(f"{where}: holds no AdaLoRA layers")
    init_r = int(config.get("init_r", 12))
    settings = AdaLoRASettings(target_r=int(config.get("target_r", 8)), tinit=config.get("tinit"),
                               tfinal=config.get("tfinal"), delta_t=int(config.get("deltaT", 1)),
                               beta1=float(config.get("beta1", 0.85)), beta2=float(config.get("beta2", 0.85)),
                               orth_reg_weight=float(config.get("orth_reg_weight", 0.5)),
                               total_step=config.get("total_step"))
    pattern = config.get("rank_pattern") or {}
    updates = {}
    for name, triplet in parts.items():
        mask = torch.tensor(pattern.get(f"{name}.lora_E", [True] * init_r), dtype=torch.bool)
        kept = int(mask.sum())
        if set(triplet) != {"lora_A", "lora_E", "lora_B"} or mask.numel() != init_r \
                or triplet["lora_A"].shape[0] != kept or triplet["lora_E"].shape != (kept, 1) \
                or triplet["lora_B"].ndim != 2 or triplet["lora_B"].shape[1] != kept:
            raise LorafitError(f"{where}: module {name} needs lora_A [k, in], lora_E [k, 1], lora_B [out, k] with "
                               f"k = {kept}, the triplets its rank_pattern keeps of init_r = {init_r}")
        updates[name] = AdaLoRAUpdate(triplet["lora_A"], triplet["lora_E"], triplet["lora_B"], mask,
                                      float(config.get("lora_alpha", 8)), settings)
    return updates


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
