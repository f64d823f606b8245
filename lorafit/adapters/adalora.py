"""AdaLoRA (adaptive budget allocation, Zhang et al. 2023), computed as PEFT's ``tuners/adalora`` computes it.

Each layer holds an SVD-shaped update of ``init_r`` triplets, A [r, in], E [r, 1], B [out, r]:

    ΔW = B · (A ⊙ E) · alpha / (init_r + 1e-5)         E starts at 0 (ΔW = 0); A, B ~ N(0, 0.02)

During training a rank allocator scores every triplet i of every layer by the EMA-smoothed sensitivity
|θ·∇θ| of its entries times that sensitivity's uncertainty (β1, β2), and keeps only the best ones: the
budget falls from init_r·n to target_r·n (n layers) on a cubic schedule between step ``tinit`` and
``total_step − tfinal``, masking (E_i = 0) every ``deltaT`` steps, then stays fixed. An orthogonality
penalty, orth_reg_weight · mean over A and B of ‖PPᵀ − I‖_F, joins the loss. Saved in PEFT's format:
``peft_type: ADALORA``, tensors ``…lora_A`` / ``…lora_E`` / ``…lora_B`` (no ``.weight``) sliced to the kept
triplets, and ``rank_pattern`` holding each layer's boolean mask over init_r.

Steps here count optimizer steps from 1, so the last step is ``total_step`` and, with tfinal = 0, the
final budget is enforced on it (PEFT's loop examples count from 0 and then never reach that point).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.adapters.base import (
    AdapterLayer,
    Method,
    SavedUpdate,
    TargetSpec,
    TrainingHooks,
    config_dropout,
    wrap_module,
)
from lorafit.adapters.lora import KEY_PREFIX, group_by_module
from lorafit.errors import LorafitError

if TYPE_CHECKING:
    from lorafit.config import LoRAConfig

RANKNUM_EPS = 1e-5  # PEFT divides by ranknum + 1e-5


@dataclass
class AdaLoRASettings:
    """The schedule every AdaLoRA layer of a model shares (one object). ``tinit`` / ``tfinal`` None: 10% /
    20% of the run's steps, filled in with ``total_step`` when training starts."""

    target_r: int
    tinit: int | None = None
    tfinal: int | None = None
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None

    def resolve(self, total_step: int) -> None:
        self.total_step = total_step
        self.tinit = total_step // 10 if self.tinit is None else self.tinit
        self.tfinal = total_step // 5 if self.tfinal is None else self.tfinal
        if self.tinit >= total_step - self.tfinal:
            raise LorafitError(f"lora.adalora: tinit={self.tinit} and tfinal={self.tfinal} leave no budgeting phase "
                               f"in {total_step} steps (need tinit < total steps - tfinal); lower them or train longer")


class AdaLoRALinear(AdapterLayer):
    """A frozen linear layer plus AdaLoRA's triplets; see the module docstring. ``r`` is the initial rank."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, settings: AdaLoRASettings,
                 dropout: float = 0.0, kept: torch.Tensor | None = None) -> None:
        super().__init__(base_layer, dropout)
        self.r, self.alpha, self.settings = r, alpha, settings
        device, dtype = base_layer.weight.device, self.adapter_dtype
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype).normal_(0, 0.02))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=dtype).normal_(0, 0.02))
        # The scaling divides by the initial rank for good, masked triplets or not (as PEFT's ranknum).
        self.ranknum = float(r)
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=device))  # kept triplets
        if kept is not None:  # a saved adapter's mask (bool [r])
            self.set_mask(kept.to(device))

    adaptive_rank = True

    @property
    def trained_rank(self) -> int:
        return int(self.rank_mask.sum())

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (..., out); a 4-bit base may keep it for backward: add out of place
        dtype = result.dtype
        down = F.linear(self.lora_dropout(x).to(dtype), (self.lora_A * self.lora_E).to(dtype))  # (..., r)
        # ·alpha then /(init_r + 1e-5), in PEFT's order, so outputs match its AdaLoRA bit for bit.
        return result + F.linear(down, self.lora_B.to(dtype)) * self.alpha / (self.ranknum + RANKNUM_EPS)

    def delta_weight(self) -> torch.Tensor:
        """B · (A ⊙ E) · alpha / (init_r + 1e-5), fp32, [out, in]."""
        return self.lora_B.float() @ (self.lora_A.float() * self.lora_E.float()) * self.alpha / (
            self.ranknum + RANKNUM_EPS)

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW over the kept triplets (possibly none): A' = (A ⊙ E)[kept] [k, in], B' = B[:, kept]·scale [out, k]."""
        keep, scale = self.rank_mask, self.alpha / (self.ranknum + RANKNUM_EPS)
        return (self.lora_A.float() * self.lora_E.float())[keep], self.lora_B.float()[:, keep] * scale

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_E": self.lora_E, "lora_B": self.lora_B}

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """The kept triplets only, as PEFT saves them: A [k, in], E [k, 1], B [out, k]."""
        keep = self.rank_mask
        return {"lora_A": self.lora_A[keep], "lora_E": self.lora_E[keep], "lora_B": self.lora_B[:, keep]}

    @torch.no_grad()
    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        """Kept triplets back into place; the others stay as they are (zero E: no contribution)."""
        keep = self.rank_mask
        self.lora_A[keep] = tensors["lora_A"].to(self.lora_A.dtype)
        self.lora_E[keep] = tensors["lora_E"].to(self.lora_E.dtype)
        self.lora_B[:, keep] = tensors["lora_B"].to(self.lora_B.dtype)

    @torch.no_grad()
    def set_mask(self, keep: torch.Tensor) -> None:
        """Keep only these triplets (bool [r]): the others' E becomes 0."""
        self.rank_mask.copy_(keep)
        self.lora_E.masked_fill_(~keep[:, None], 0.0)

    @classmethod
    def peft_config(cls, modules: dict[str, AdapterLayer]) -> dict[str, Any]:
        first = next(iter(modules.values()))
        settings = first.settings
        return {
            "peft_type": "ADALORA",
            "r": 8,  # PEFT ignores r for AdaLoRA (and warns when it is not its default)
            "init_r": first.r,
            "target_r": settings.target_r,
            "lora_alpha": first.alpha,
            "lora_dropout": config_dropout(modules),
            "tinit": settings.tinit,
            "tfinal": settings.tfinal,
            "deltaT": settings.delta_t,
            "beta1": settings.beta1,
            "beta2": settings.beta2,
            "orth_reg_weight": settings.orth_reg_weight,
            "total_step": settings.total_step,
            "rank_pattern": {f"{name}.lora_E": m.rank_mask.tolist() for name, m in modules.items()},
            "init_lora_weights": True,
            "use_rslora": False,
            "use_dora": False,
        }


class RankAllocator(TrainingHooks):
    """AdaLoRA's loop hooks: the orthogonality penalty, and after each optimizer step the importance
    scores and the budget schedule (PEFT's RankAllocator and AdaLoraModel.update_and_allocate)."""

    def __init__(self, modules: dict[str, AdapterLayer], total_steps: int) -> None:
        super().__init__(modules, total_steps)
        self.settings: AdaLoRASettings = next(iter(modules.values())).settings
        self.settings.resolve(total_steps)
        self.init_budget = sum(m.r for m in modules.values())
        self.target_budget = self.settings.target_r * len(modules)
        self.scores: dict[str, dict[str, torch.Tensor]] = {}  # "name.part" -> ipt, exp_avg_ipt, exp_avg_unc

    def regularization(self) -> torch.Tensor:
        """orth_reg_weight · mean over every A and B of ‖P·Pᵀ − I‖_F (A·Aᵀ, Bᵀ·B: [r, r])."""
        norms = []
        for module in self.modules.values():
            for gram in (module.lora_A @ module.lora_A.T, module.lora_B.T @ module.lora_B):
                eye = torch.eye(*gram.shape, dtype=gram.dtype, device=gram.device)
                norms.append(torch.linalg.matrix_norm(gram - eye))
        return self.settings.orth_reg_weight * torch.stack(norms).mean()

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, whether to mask now) after optimizer step ``step``: PEFT's cubic schedule."""
        s = self.settings
        if step <= s.tinit:
            return self.init_budget, False
        if step > s.total_step - s.tfinal:
            return self.target_budget, True
        remaining = 1 - (step - s.tinit) / (s.total_step - s.tfinal - s.tinit)
        budget = int((self.init_budget - self.target_budget) * (remaining**3) + self.target_budget)
        return budget, step % s.delta_t == 0

    @torch.no_grad()
    def on_step_end(self, step: int) -> None:
        final = self.settings.total_step - self.settings.tfinal
        if step < final:
            self._update_scores()
            budget, mask_now = self.budget_schedule(step)
            if mask_now:
                self._mask_to(budget)
        elif step == final:
            self._mask_to(self.budget_schedule(step)[0])
            self.scores = {}
        else:  # after the final allocation the masks are fixed; revived triplets are zeroed again
            for module in self.modules.values():
                module.set_mask(module.rank_mask.clone())

    def _update_scores(self) -> None:
        """Per entry: sensitivity |θ·∇θ|, its EMA (β1), and the EMA (β2) of its deviation from that EMA."""
        b1, b2 = self.settings.beta1, self.settings.beta2
        for name, module in self.modules.items():
            for part, param in module.adapter_params().items():
                state = self.scores.setdefault(f"{name}.{part}", {
                    key: torch.zeros_like(param) for key in ("ipt", "exp_avg_ipt", "exp_avg_unc")})
                ipt = (param * param.grad).abs()
                state["ipt"] = ipt
                state["exp_avg_ipt"] = b1 * state["exp_avg_ipt"] + (1 - b1) * ipt
                state["exp_avg_unc"] = b2 * state["exp_avg_unc"] + (1 - b2) * (ipt - state["exp_avg_ipt"]).abs()

    def _triplet_scores(self, name: str) -> torch.Tensor:
        """[r]: E's score plus the mean scores of A's row and B's column of each triplet."""
        def score(part: str) -> torch.Tensor:
            state = self.scores[f"{name}.{part}"]
            return state["exp_avg_ipt"] * state["exp_avg_unc"]

        from_a = score("lora_A").mean(dim=1, keepdim=True)  # [r, 1]
        from_b = score("lora_B").mean(dim=0).view(-1, 1)  # [r, 1]
        return score("lora_E").view(-1) + torch.cat([from_a, from_b], dim=1).sum(dim=1)

    def _mask_to(self, budget: int) -> None:
        """Keep the ``budget`` best-scoring triplets over all layers (ties at the threshold are dropped)."""
        if budget >= self.init_budget:
            return
        triplets = {name: self._triplet_scores(name) for name in self.modules}
        threshold = torch.kthvalue(torch.cat(list(triplets.values())), k=self.init_budget - budget)[0].item()
        for name, module in self.modules.items():
            module.set_mask(triplets[name] > threshold)

    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs that the saved adapter lacks: scores, masks, and the full
        A, E, B (the adapter keeps only the kept triplets; the others still train)."""
        return {"scores": self.scores,
                "layers": {name: {"mask": m.rank_mask.clone(), **{k: p.detach().clone()
                                                                    for k, p in m.adapter_params().items()}}
                           for name, m in self.modules.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scores = state["scores"]
        for name, module in self.modules.items():
            saved = state["layers"][name]
            module.rank_mask.copy_(saved["mask"])
            for part, param in module.adapter_params().items():
                param.copy_(saved[part])


AdaLoRALinear.training_hooks = RankAllocator
PARTS = ("lora_A", "lora_E", "lora_B")


class AdaLoRAMethod(Method):
    """PEFT's ADALORA record: the kept triplets per module, their masks in ``rank_pattern``, the schedule."""

    name, layer, peft_type = "adalora", AdaLoRALinear, "ADALORA"

    def read(self, tensors: dict[str, torch.Tensor], config: dict[str, Any], where: Any,
             parameters: dict[str, Any]) -> dict[str, SavedUpdate]:
        """``rank_pattern``: ``<path>.lora_E`` -> a bool per initial triplet (absent: all kept)."""
        expected = f"an AdaLoRA adapter holds {KEY_PREFIX}<module>.lora_A / lora_E / lora_B"
        parts = group_by_module(tensors, PARTS, where, expected)
        init_r, pattern = int(config.get("init_r", 12)), config.get("rank_pattern") or {}
        settings = settings_from(config)
        updates = {}
        for name, triplet in parts.items():
            mask = torch.tensor(pattern.get(f"{name}.lora_E", [True] * init_r), dtype=torch.bool)
            kept = int(mask.sum())
            if mask.numel() != init_r or triplet["lora_A"].shape[0] != kept or triplet["lora_E"].shape != (kept, 1) \
                    or triplet["lora_B"].ndim != 2 or triplet["lora_B"].shape[1] != kept:
                raise LorafitError(f"{where}: module {name} needs lora_A [k, in], lora_E [k, 1], lora_B [out, k] "
                                   f"with k = {kept}, the triplets its rank_pattern keeps of init_r = {init_r}")
            kwargs = {"r": init_r, "alpha": float(config.get("lora_alpha", 8)), "settings": settings, "kept": mask}
            updates[name] = SavedUpdate(self, triplet, kwargs)
        return updates

    def misfit(self, update: SavedUpdate, out_features: int, in_features: int) -> str | None:
        A, B = update.tensors["lora_A"], update.tensors["lora_B"]
        if A.shape[1] == in_features and B.shape[0] == out_features:
            return None
        return (f"adapter has lora_A {list(A.shape)}, lora_B {list(B.shape)}, but the base "
                f"layer is [{out_features}, {in_features}] (out, in)")

    def plan(self, spec: TargetSpec, lora: LoRAConfig) -> TargetSpec:
        """lora.r is the rank AdaLoRA prunes to; each layer starts at init_r triplets."""
        from lorafit.config import AdaLoRAConfig

        return replace(spec, r=(lora.adalora or AdaLoRAConfig()).initial_rank(lora.r))

    def wrap(self, model: nn.Module, specs: dict[str, TargetSpec], lora: LoRAConfig) -> None:
        """AdaLoRA layers start at init_r triplets and share one schedule, whose total_step the loop fills in."""
        from lorafit.config import AdaLoRAConfig

        options = lora.adalora or AdaLoRAConfig()
        settings = AdaLoRASettings(target_r=lora.r, tinit=options.tinit, tfinal=options.tfinal,
                                   delta_t=options.deltaT, beta1=options.beta1, beta2=options.beta2,
                                   orth_reg_weight=options.orth_reg_weight)
        for name, spec in specs.items():
            wrap_module(model, name, self.layer, r=spec.r, alpha=spec.alpha, settings=settings, dropout=lora.dropout)


def settings_from(config: dict[str, Any]) -> AdaLoRASettings:
    """The schedule an ADALORA adapter_config.json records."""
    return AdaLoRASettings(target_r=int(config.get("target_r", 8)), tinit=config.get("tinit"),
                           tfinal=config.get("tfinal"), delta_t=int(config.get("deltaT", 1)),
                           beta1=float(config.get("beta1", 0.85)), beta2=float(config.get("beta2", 0.85)),
                           orth_reg_weight=float(config.get("orth_reg_weight", 0.5)),
                           total_step=config.get("total_step"))


METHOD = AdaLoRAMethod()
