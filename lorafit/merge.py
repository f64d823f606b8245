"""``lorafit merge``: fold an adapter into full base weights, shard by shard, and check the result.

Works on the checkpoint files, not on a loaded model: each input shard is read, its targeted weights
get the adapter folded in (``W + scaling · B @ A``, or DoRA's rescaled form; in fp32, then cast), and
tensors stream into output shards. Peak memory is about one input shard plus one output shard, not the
model twice. Everything is written into a temp folder that replaces OUT only after the verification
passed, so a failure leaves no half-written OUT.
"""

from __future__ import annotations

import glob
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorafit.adapter_io import (
    TOKENS_KEY,
    SavedUpdate,
    misfit_error,
    read_adapter,
    read_adapter_config,
    read_saved_modules,
)
from lorafit.config import ModelConfig
from lorafit.errors import LorafitError
from lorafit.files import atomic_dir, local_paths, refuse_overlap, replace_lock, tidy_after_kill, write_failure
from lorafit.model import DTYPES, adapter_tokenizer, local_source

INDEX_NAME = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclass
class MergeResult:
    out: Path
    shards: int
    merged_modules: int
    max_logit_diff: float | None
    rounding_floor: float | None


def merge_adapter(
    base: str,
    adapter_dir: str | Path,
    out: str | Path,
    dtype: str = "bfloat16",
    max_shard_size: str = "2GB",
    overwrite: bool = False,
    verify: bool = True,
    trust_remote_code: bool = False,
) -> MergeResult:
    out, adapter_dir = Path(out), Path(adapter_dir)
    if dtype not in DTYPES:
        raise LorafitError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    shard_bytes = parse_size(max_shard_size)
    inputs = {"ADAPTER": adapter_dir, **local_paths({"BASE": base})}
    refuse_overlap(out, "OUT", inputs)  # even with --overwrite: replacing OUT would delete an input
    with write_failure(out.parent, "the folder for OUT"):
        out.parent.mkdir(parents=True, exist_ok=True)
    with replace_lock(out, "OUT"):  # one merge at a time into OUT
        # A merge killed mid-replace left the previous OUT aside (put back) or a half-written temp (deleted).
        tidy_after_kill(out.parent, glob.escape(out.name))
        return _merge_locked(base, adapter_dir, out, dtype, shard_bytes, overwrite, verify, trust_remote_code)


def _merge_locked(base: str, adapter_dir: Path, out: Path, dtype: str, shard_bytes: int, overwrite: bool,
                  verify: bool, trust_remote_code: bool) -> MergeResult:
    if out.exists() and not out.is_dir():
        raise LorafitError(f"OUT {out} is a file; give a folder path for the merged model")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LorafitError(f"{out} exists and is not empty; pass --overwrite to replace it, or choose another OUT")
    config = read_adapter_config(adapter_dir)
    if config.get("target_parameters") or config.get(TOKENS_KEY):
        return _merge_loaded(base, adapter_dir, out, dtype, shard_bytes, verify, trust_remote_code)
    updates, folder, weight_files, transposed = adapter_and_base(base, adapter_dir, out)
    refuse_remote_code(folder, base, trust_remote_code)

    target_dtype = DTYPES[dtype]
    # lora.modules_to_save: these base tensors are replaced by the adapter's trained copies.
    replaced = {f"{path}.{k}": v for path, state in read_saved_modules(adapter_dir).items() for k, v in state.items()}
    with atomic_dir(out, "the merged model") as tmp:
        writer = ShardWriter(tmp, shard_bytes)
        for path in weight_files:
            for key, tensor in load_file(path).items():  # one input shard in memory at a time
                module = key.removesuffix(".weight")
                if key in replaced:
                    tensor = replaced.pop(key).to(target_dtype if tensor.is_floating_point() else tensor.dtype)
                elif key.endswith(".weight") and module in transposed:  # Conv1D: [in, out]
                    tensor = merged_or_refused(updates[module], tensor.T, target_dtype, module, adapter_dir).T
                elif key.endswith(".weight") and module in updates:
                    tensor = merged_or_refused(updates[module], tensor, target_dtype, module, adapter_dir)
                elif tensor.is_floating_point():
                    tensor = tensor.to(target_dtype)
                writer.add(key, tensor)
        if replaced:
            raise LorafitError(f"{adapter_dir}: modules_to_save tensors {sorted(replaced)[:3]} have no tensor of that "
                               "name in the base checkpoint (a tied head?); nothing was written")
        shards = writer.finish()
        copy_model_files(folder, tmp, dtype)
        diff, floor = (verify_merge(tmp, base, adapter_dir, target_dtype, trust_remote_code) if verify
                       else (None, None))
    return MergeResult(out, shards, len(updates), diff, floor)


def _merge_loaded(base: str, adapter_dir: Path, out: Path, dtype: str, shard_bytes: int, verify: bool,
                  trust_remote_code: bool) -> MergeResult:
    """Merge through a loaded model, for adapters of MoE expert parameters: transformers stores those experts
    per expert on disk (``experts.0.w1.weight``, ...) and fuses them on load, so the fused parameters exist only
    in the model, and saving splits them again. Also for adapters with trained token rows: the vocabulary grows
    (embedding, head and config.json), and the adapter's tokenizer replaces the base's. Peak memory: the whole
    model, in its checkpoint dtype (fp32 when merging to float32); each update is still added in fp32 and checked
    before anything is written."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit.adapter_io import load_adapter
    from lorafit.inject import lora_modules, remove_lora

    folder = base_folder(base)
    refuse_overlap(out, "OUT", {"the base model's files": folder})
    refuse_remote_code(folder, base, trust_remote_code)
    target_dtype = DTYPES[dtype]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32 if dtype == "float32" else "auto",
                                                 trust_remote_code=trust_remote_code)
    modules = load_adapter(model, adapter_dir)
    for name, module in modules.items():
        try:
            module.merge()
        except ValueError as err:
            raise LorafitError(f"merging {adapter_dir} into {name} gives non-finite weights ({err}); nothing was "
                               "written. Check the adapter with lorafit eval") from None
    adapted = [module.base_weight for module in lora_modules(model).values()]
    remove_lora(model, unmerge=False)
    model.to(target_dtype)
    if not all(torch.isfinite(weight).all() for weight in adapted):
        raise LorafitError(f"merging {adapter_dir} gives weights that overflow {dtype}; nothing was written. Merge "
                           "with --dtype float32")
    vocab_size = model.get_input_embeddings().weight.shape[0]
    with atomic_dir(out, "the merged model") as tmp:
        model.save_pretrained(tmp, max_shard_size=shard_bytes)
        del model
        copy_model_files(folder, tmp, dtype, vocab_size)
        if (own := adapter_tokenizer([adapter_dir])) is not None:
            AutoTokenizer.from_pretrained(own, trust_remote_code=trust_remote_code).save_pretrained(tmp)
        diff, floor = (verify_merge(tmp, base, adapter_dir, target_dtype, trust_remote_code) if verify
                       else (None, None))
        shards = len(list(tmp.glob("*.safetensors")))
    return MergeResult(out, shards, len(modules), diff, floor)


def adapter_and_base(base: str, adapter_dir: Path,
                     out: Path) -> tuple[dict[str, SavedUpdate], Path, list[Path], set[str]]:
    """What merge and export read, checked: the adapter's updates, the base's local folder (OUT must not hold
    it) and weight files, and the modules whose weights are stored [in, out] (Conv1D). Reads headers only."""
    updates = read_adapter(adapter_dir)
    folder = base_folder(base)
    refuse_overlap(out, "OUT", {"the base model's files": folder})
    weight_files = checkpoint_files(folder)
    transposed = check_adapter_fits(updates, weight_files, adapter_dir,
                                    bool(read_adapter_config(adapter_dir).get("fan_in_fan_out")))
    return updates, folder, weight_files, transposed


def merged_or_refused(update: SavedUpdate, weight: torch.Tensor, dtype: torch.dtype, module: str,
                      adapter_dir: Path) -> torch.Tensor:
    """The merged weight; a non-finite one (inf/NaN in the adapter, or an overflow of ``dtype``) is refused,
    naming the module, before anything is written (every variant's merged_weight checks, as PEFT's safe_merge)."""
    try:
        return update.merged_weight(weight, dtype)
    except ValueError as err:
        raise LorafitError(f"merging {adapter_dir} into {module} gives non-finite weights ({err}: the adapter "
                           "holds inf/NaN, or the result overflows that dtype); nothing was written. Check the "
                           "adapter with lorafit eval, or merge with --dtype float32") from None


def refuse_remote_code(folder: Path, base: str, trust_remote_code: bool) -> None:
    """A base whose architecture is code shipped with the checkpoint (config.json ``auto_map``, a model type
    transformers does not know) runs that code when loaded; only with the user's explicit consent."""
    from transformers import CONFIG_MAPPING

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise LorafitError(f"BASE {base}: {folder / 'config.json'} is missing or not JSON ({err})") from None
    custom = "auto_map" in config and config.get("model_type") not in CONFIG_MAPPING
    if custom and not trust_remote_code:
        raise LorafitError(f"BASE {base}: its config.json asks to run code shipped with the model (auto_map, "
                           f"model_type {config.get('model_type')!r} unknown to transformers). Read that code, then "
                           "pass --trust-remote-code to merge it, or use a base transformers supports natively")


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000, '500MiB' -> 524_288_000 (the units transformers' max_shard_size accepts)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", text.upper())
    if not match:
        raise LorafitError(f"--max-shard-size {text!r}: expected a size like 2GB, 500MB or 1GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def base_folder(base: str) -> Path:
    """A local folder holding the base checkpoint: as given, converted from GGUF, or downloaded."""
    source = local_source(ModelConfig(base=base, dtype="float32"))
    folder = Path(source.location)
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
        return Path(snapshot_download(base, allow_patterns=patterns))
    except Exception as err:  # hub errors come in many types; all mean "could not fetch"
        raise LorafitError(f"BASE {base!r} is not a local model and could not be downloaded ({err})") from None


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise LorafitError(f"{folder}: no model.safetensors or {INDEX_NAME}; lorafit merges safetensors checkpoints "
                       "only (load the model in transformers and save_pretrained it to convert)")


def check_adapter_fits(updates: dict[str, SavedUpdate], weight_files: list[Path], adapter_dir: Path,
                       fan_in_fan_out: bool = False) -> set[str]:
    """Every adapted module must have a weight [out, in] matching B [out, r] @ A [r, in]; checked from headers.

    With ``fan_in_fan_out`` (PEFT's flag for transformers' Conv1D, GPT-2) weights are stored [in, out]: a
    weight that fits transposed is merged transposed. Returns the modules stored that way.
    """
    shapes = {}
    for path in weight_files:
        with safe_open(path, framework="pt") as f:
            shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    problems, transposed = [], set()
    for name, update in updates.items():
        shape = shapes.get(f"{name}.weight")
        if shape is None:
            problems.append(f"module {name}: no weight {name}.weight in the base checkpoint")
        elif len(shape) != 2:
            problems.append(f"module {name}: base weight is {list(shape)}")
        elif fan_in_fan_out and update.misfit(shape[1], shape[0]) is None:
            transposed.add(name)
        elif problem := update.misfit(*shape):
            problems.append(f"module {name}: {problem}")
    if problems:
        raise misfit_error(adapter_dir, problems)
    return transposed


class ShardWriter:
    """Collects tensors into files of at most ``max_bytes`` (a single larger tensor gets its own file)."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def finish(self) -> int:
        """Name the files as transformers expects and write the index when there is more than one."""
        if self.pending:
            self._flush()
        count = len(self.written)
        if count == 1:
            self.written[0][0].rename(self.folder / "model.safetensors")
            return 1
        weight_map = {}
        for number, (path, keys) in enumerate(self.written, start=1):
            name = f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(self.folder / name)
            weight_map.update({key: name for key in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return count

    def _flush(self) -> None:
        path = self.folder / f".part-{len(self.written):05d}.safetensors"
        save_file(self.pending, path, metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0


def copy_model_files(source: Path, target: Path, dtype: str, vocab_size: int | None = None) -> None:
    """config (with the new dtype, and ``vocab_size`` when the vocabulary grew), generation config, tokenizer
    and chat template: everything but weights."""
    for path in source.iterdir():
        if path.is_file() and not path.name.startswith(".") and path.name != INDEX_NAME \
                and not path.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(path, target / path.name)
    config_path = target / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    if vocab_size is not None:
        (config.get("text_config") if "vocab_size" not in config else config)["vocab_size"] = vocab_size
    config["torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"] = dtype
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def verify_merge(merged_dir: Path, base: str, adapter_dir: Path, dtype: torch.dtype,
                 trust_remote_code: bool = False) -> tuple[float, float]:
    """Max |logit difference| between the merged model and base + adapter (fp32) on a short text, and
    the same measure for the base model alone cast to ``dtype``: the rounding floor a correct merge
    cannot beat (0 for float32). A wrong merge shows up far above that floor."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit.adapter_io import load_adapter
    from lorafit.inject import remove_lora
    from lorafit.model import load_base_model

    remote = {"trust_remote_code": trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(merged_dir, **remote)
    ids = tokenizer("The quick brown fox jumps over the lazy dog on 3 March 2021.", return_tensors="pt").input_ids
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype, **remote).eval()
    merged_logits = merged(ids).logits.float()
    del merged
    reference = load_base_model(ModelConfig(base=base, dtype="float32", **remote)).eval()
    load_adapter(reference, adapter_dir)
    diff = float((reference(ids).logits - merged_logits).abs().max())
    if not math.isfinite(diff):
        raise LorafitError("verification failed: the merged model produces non-finite logits; nothing was written")
    remove_lora(reference)
    base_logits = reference(ids).logits
    if dtype == torch.float32:
        return diff, 0.0
    return diff, float((reference.to(dtype)(ids).logits.float() - base_logits).abs().max())
