"""LoRA: h = W0·x + scaling · B·A·dropout(x), with W0 frozen; its PEFT record (``peft_type: LORA``,
``use_dora: false``) read and written here, and the wrapping of planned targets (MoE expert parameters too,
through lorafit/adapters/experts.py).

Parts are named ``lora_A`` / ``lora_B`` exactly as PEFT names them, so saving is a key prefix away: keys
``base_model.model.<module path>.lora_A.weight`` ([r, in]) and ``...lora_B.weight`` ([out, r]).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lorafit import quant
from lorafit.adapters import init as base_init
from lorafit.adapters.base import (
    ROUNDED_ONCE,
    AdapterLayer,
    Method,
    SavedUpdate,
    TargetSpec,
    config_dropout,
    pattern_value,
    rounded_once,
    wrap_module,
)
from lorafit.errors import LorafitError

if TYPE_CHECKING:
    from lorafit.config import LoRAConfig

InitKind = str  # lora.init: one of lorafit/adapters/recipes.py's INIT_NAMES (from the base: lorafit/adapters/init.py)
KEY_PREFIX = "base_model.model."
PARTS = ("lora_A.weight", "lora_B.weight")


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """alpha/r (LoRA paper), or alpha/sqrt(r) (rsLoRA), which keeps updates stable at large r."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling · B @ A as an fp32 [out, in] matrix, so a bf16 merge rounds once, not at every step.
    lora_A: [r, in], lora_B: [out, r]."""
    return (lora_B.float() @ lora_A.float()) * scaling


class LoRALinear(AdapterLayer):
    """A frozen linear ``base_layer`` plus a trainable low-rank update.

    Shapes, for a base layer ``in_features -> out_features`` and rank ``r``:
        x: (..., in)  ->  lora_A: (..., r)  ->  lora_B: (..., out)
        lora_A.weight: [r, in]     lora_B.weight: [out, r]     delta_weight(): [out, in]
    B starts at zero, so a freshly wrapped model computes exactly what the base model computes.
    """

    num_experts = 1  # experts.py: one (A, B) pair per expert, stacked along the rank dimension

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        init: InitKind = "kaiming",
        use_rslora: bool = False,
        init_iter: int | None = None,
        original: torch.Tensor | None = None,
    ) -> None:
        super().__init__(base_layer, dropout)
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        device, dtype = self.base_weight.device, self.adapter_dtype
        rows = r * self.num_experts
        self.lora_A = nn.Linear(self.in_features, rows, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rows, self.out_features, bias=False, device=device, dtype=dtype)
        # PiSSA / OLoRA: the initial factors A0 [r, in], B0 [out, r] (fp32), for saving against the original base.
        self.register_buffer("initial_A", None, persistent=False)
        self.register_buffer("initial_B", None, persistent=False)
        if init in base_init.BASE_INITS:
            base_init.initialise_from_base(self, init, init_iter, original)
        else:
            self.reset_lora_parameters(init)

    def reset_lora_parameters(self, init: InitKind = "kaiming") -> None:
        """A random, B zero: the product B·A is zero, but gradients reach B through A at once."""
        if init == "kaiming":
            # Same as nn.Linear's own init and PEFT's default (init_lora_weights=True).
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        elif init == "gaussian":
            # PEFT's init_lora_weights="gaussian".
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            raise ValueError(f"unknown LoRA init {init!r}: use 'kaiming' or 'gaussian'")
        nn.init.zeros_(self.lora_B.weight)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.base_layer) is nn.Linear:
            return self._fused_forward(x)
        if quant.trains_fused(self.base_layer):  # a 4-bit base: one GEMM pass, bf16 activations (lorafit/quant.py)
            return quant.lora_over_4bit(self.base_layer, x, self.lora_dropout, self.lora_A.weight,
                                        self.lora_B.weight, self.scaling)
        # Other bases (bitsandbytes 8-bit) may keep their output for backward: add out of place.
        result = self.base_layer(x)
        lora_in = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(lora_in)) * self.scaling  # (..., out)
        return result + update.to(result.dtype)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """One GEMM adds scaling·(x·Aᵀ)·Bᵀ straight into the base output (C += alpha·A·B): no (..., out)
        update tensor and no separate scale and add passes over it, forward or backward.

        The update is computed in the dtype the base computes in (its weight dtype, or autocast's): with a
        bf16 base and fp32 LoRA weights (the optimizer's master copy) A and B are cast per call, [r, in]
        and [out, r] (tiny), and their gradients come back to fp32 through the cast. Under autocast the
        input is cast once here rather than once by the base matmul and again for A.
        Working on 2-D tensors keeps the in-place add off a view, which autograd would have to copy back
        in backward. In place is safe: nn.Linear's backward does not keep its output.
        """
        flat = x.reshape(-1, self.in_features)  # (N, in)
        if torch.is_autocast_enabled(flat.device.type):
            flat = flat.to(torch.get_autocast_dtype(flat.device.type))
        weight = self.base_layer.weight
        dtype = flat.dtype if torch.is_autocast_enabled(flat.device.type) else weight.dtype
        down = F.linear(self.lora_dropout(flat).to(dtype), self.lora_A.weight.to(dtype))  # (N, r)
        if dtype in ROUNDED_ONCE and weight.dtype == dtype and flat.dtype == dtype:  # no cast copy of W to keep
            result = one_rounding_linear(flat, down, weight, self.lora_B.weight, self.scaling, self.base_layer.bias)
            return result.view(*x.shape[:-1], self.out_features)
        result = self.base_layer(flat)  # (N, out), a fresh tensor in the compute dtype
        result.addmm_(down, self.lora_B.weight.to(dtype).t(), alpha=self.scaling)
        return result.view(*x.shape[:-1], self.out_features)

    def delta_weight(self) -> torch.Tensor:
        """scaling · B @ A, fp32, [out, in]."""
        return lora_delta(self.lora_A.weight, self.lora_B.weight, self.scaling)

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A.weight.float(), self.lora_B.weight.float() * self.scaling

    def peft_fields(self) -> dict[str, Any]:
        """The LoraConfig fields that tell LoRA's variants apart (DoRA sets use_dora)."""
        return {"use_dora": False}

    @classmethod
    def peft_config(cls, modules: dict[str, AdapterLayer]) -> dict[str, Any]:
        """PEFT LoraConfig fields; per-module rank/alpha that differ from the first go to rank/alpha_pattern."""
        first = next(iter(modules.values()))
        record = {name: base_init.record_rank_alpha(m) for name, m in modules.items()}  # PiSSA, OLoRA: 2r
        first_r, first_alpha = next(iter(record.values()))
        return {
            "peft_type": "LORA",
            "r": first_r,
            "lora_alpha": first_alpha,
            "lora_dropout": config_dropout(modules),
            "use_rslora": first.use_rslora,
            **first.peft_fields(),
            "init_lora_weights": True,
            "rank_pattern": {name: r for name, (r, _) in record.items() if r != first_r},
            "alpha_pattern": {name: alpha for name, (_, alpha) in record.items() if alpha != first_alpha},
        }

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """A base-changing init (PiSSA, OLoRA) saves against the original base: rank 2r (lorafit/adapters/init.py)."""
        params = super().saved_tensors()
        return params if self.initial_A is None else base_init.against_original(self, params)

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_saved(tensors if self.initial_A is None else base_init.take_saved(self, tensors))

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


def group_by_module(tensors: dict[str, torch.Tensor], parts: tuple[str, ...], where: Any,
                    expected: str) -> dict[str, dict[str, torch.Tensor]]:
    """``base_model.model.<path>.<part>`` keys -> path -> part -> tensor; every module must have all ``parts``.
    ``expected`` says in the message what such a file holds."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        stripped = key.removeprefix(KEY_PREFIX)
        name, part = next(((stripped[: -len(p) - 1], p) for p in parts if stripped.endswith("." + p)), (None, None))
        if name is None or not key.startswith(KEY_PREFIX):
            raise LorafitError(f"{where}: unexpected tensor {key!r}; {expected}")
        grouped.setdefault(name, {})[part] = tensor
    if not grouped:
        raise LorafitError(f"{where}: holds no adapter tensors; {expected}")
    for name, found in grouped.items():
        if set(found) != set(parts):
            raise LorafitError(f"{where}: module {name} has {sorted(found)} but needs {list(parts)}")
    return grouped


class LoRAMethod(Method):
    name, layer, peft_type = "lora", LoRALinear, "LORA"
    parts: tuple[str, ...] = PARTS

    def owns(self, config: dict[str, Any]) -> bool:
        return super().owns(config) and not config.get("use_dora", False)

    def read(self, tensors: dict[str, torch.Tensor], config: dict[str, Any], where: Any,
             parameters: dict[str, Any]) -> dict[str, SavedUpdate]:
        """Per module: A, B, and r / alpha / rsLoRA from the config. An expert parameter's (``parameters``) rank
        and alpha follow the patterns by the parameter's path."""
        expected = (f"a {self.name} adapter holds base_model.model.<module>.{' / '.join(self.parts)}")
        updates = {}
        for name, found in group_by_module(tensors, self.parts, where, expected).items():
            parameter = parameters.get(name)
            config_name = parameter.path if parameter else name
            rank = int(pattern_value(config.get("rank_pattern") or {}, config_name, config.get("r", 8)))
            alpha = float(pattern_value(config.get("alpha_pattern") or {}, config_name, config.get("lora_alpha", 8)))
            self.check_ranks(found, rank, parameter.layout.experts if parameter else 1, f"{where}: module {name}")
            kwargs = {"r": rank, "alpha": alpha, "use_rslora": bool(config.get("use_rslora", False))}
            updates[name] = SavedUpdate(self, found, kwargs, parameter)
        return updates

    def check_ranks(self, found: dict[str, torch.Tensor], rank: int, experts: int, where: str) -> None:
        A, B = found["lora_A.weight"], found["lora_B.weight"]
        if A.ndim != 2 or B.shape[1:] != (rank * experts,) or A.shape[0] != rank * experts:
            per_expert = f" for each of {experts} experts" if experts > 1 else ""
            raise LorafitError(f"{where} has lora_A {list(A.shape)} and lora_B {list(B.shape)}, which do not agree "
                               f"with r={rank}{per_expert} from adapter_config.json")

    def misfit(self, update: SavedUpdate, out_features: int, in_features: int) -> str | None:
        experts = update.parameter.layout.experts if update.parameter is not None else 1
        rows = update.kwargs["r"] * experts
        want_a, want_b = (rows, in_features), (out_features, rows)
        got_a, got_b = (tuple(update.tensors[p].shape) for p in PARTS)
        if (got_a, got_b) == (want_a, want_b):
            return None
        per_expert = f" x {experts} experts" if experts > 1 else ""
        return (f"adapter has lora_A {list(got_a)}, lora_B {list(got_b)}, but the base layer is "
                f"[{out_features}, {in_features}] (out, in){per_expert} with r={update.kwargs['r']}, which needs "
                f"lora_A {list(want_a)}, lora_B {list(want_b)}")

    def low_rank(self, update: SavedUpdate, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if update.parameter is not None:
            raise LorafitError(f"{update.parameter.path} is an MoE expert parameter: an A/B-only file format cannot "
                               "hold per-expert updates; export the full model instead")
        return super().low_rank(update, shape)

    def wrap(self, model: nn.Module, specs: dict[str, TargetSpec], lora: LoRAConfig) -> None:
        """One layer per target module, with its planned r / alpha (MoE parameters: experts.wrap_parameters)."""
        originals = base_init.base_weights_from_files(model, list(specs)) if lora.init == "loftq" else {}
        for name, spec in specs.items():
            layer = wrap_module(model, name, self.layer, r=spec.r, alpha=spec.alpha, dropout=lora.dropout,
                                init="kaiming" if spec.init == "eva" else spec.init, use_rslora=lora.use_rslora,
                                init_iter=lora.init_iter, original=originals.get(name))
            if spec.start is not None:  # EVA: A starts from the layer's principal directions [r, in]
                with torch.no_grad():
                    layer.lora_A.weight.copy_(spec.start)


METHOD = LoRAMethod()


def one_rounding_linear(x: torch.Tensor, down: torch.Tensor, weight: torch.Tensor, lora_B: torch.Tensor,
                        scaling: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """W·x (+ bias) + s·B·down as one 16-bit GEMM, [x | down] @ [W | s·B]ᵀ: the update joins the base output
    inside the GEMM's fp32 accumulator and the sum is rounded once.

    Why (measured, README "Why bf16 LoRA learns slower"): a bf16 base output is a value on the bf16 grid, and
    adding the small update to it then rounding again drops every update below half the grid's spacing, every
    time; rounded once, the update moves the output across rounding boundaries in proportion to its size, so
    it survives on average. SmolLM2 bf16, step-2 loss: 0.4417 rounded twice, 0.3242 once, 0.3256 in fp32
    (Intel AMX, 2026-12-06, before the fp32 attention kernel; with it 0.3257).

    x: (N, in), down = dropout(x)·Aᵀ: (N, r), weight: (out, in) frozen, all in the compute dtype; lora_B:
    (out, r), any float dtype (its gradient returns in its dtype). Returns (N, out) in the compute dtype.
    """
    scaled_B = (lora_B * scaling).to(x.dtype)  # the gradient to B flows back through this product and cast
    return _OneRounding.apply(x, down, weight, scaled_B, None if bias is None else bias.to(x.dtype))


class _OneRounding(torch.autograd.Function):
    """[x | down] @ [W | s·B]ᵀ (+ bias); backward keeps down (N, r) and refers to W and s·B, as the two-GEMM
    form does. The base weight and bias are frozen: no gradient for them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, down: torch.Tensor, weight: torch.Tensor, scaled_B: torch.Tensor,
                bias: torch.Tensor | None):
        ctx.save_for_backward(down, weight, scaled_B)
        return rounded_once(x, down, weight, scaled_B, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        down, weight, scaled_B = ctx.saved_tensors
        needs_x, needs_down, _, needs_B, _ = ctx.needs_input_grad
        grad_x = grad @ weight if needs_x else None  # (N, in)
        grad_down = grad @ scaled_B if needs_down else None  # (N, r)
        grad_B = grad.t() @ down if needs_B else None  # (out, r), for s·B
        return grad_x, grad_down, None, grad_B, None
