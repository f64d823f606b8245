"""Layer-wise rank allocation from the data: EVA (Paischer et al. 2024, "One Initialization to Rule them
All: Fine-tuning via Explained Variance Adaptation"), computed as PEFT's ``tuners/lora/eva.py`` does.

Before training, forward passes without gradients feed each targeted layer's inputs — at the positions
whose next token is trained — into an incremental PCA. The explained-variance ratios of all layers are
pooled and ranked, and the rank budget (Σ r over the targeted layers) goes to the top components, each
layer taking at most round(ρ·r). A layer's LoRA A starts as its top principal directions ([rank, in]),
B at zero, and alpha is scaled with the rank so that the layer's scaling stays alpha/r. A layer given
no component is not adapted. Layers that read the same tensor (q/k/v; gate/up) share one PCA.

Differences from PEFT, all deliberate: a hard cap on forward passes (``max_batches``; PEFT cycles the
data until every layer converges, however long that takes), positions chosen by the next token's label
(the positions whose outputs the loss reads; PEFT takes the position's own label), a stable tie-break
(the earlier layer wins), and with rsLoRA alpha scaled by sqrt(rank/r) so that alpha/sqrt(r) stays.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.adapters.base import layer_shape
from lorafit.config import LoRAConfig
from lorafit.data import IGNORE_INDEX
from lorafit.errors import LorafitError
from lorafit.targets import TargetSpec, plan_targets

PCA_SEED = 42  # torch.svd_lowrank draws a random test matrix; fixed as PEFT fixes it


@dataclass
class RankAllocation:
    """Per targeted module: its rank (0 = not adapted) and, until the layers are built, A's start value."""

    ranks: dict[str, int]
    budget: int
    batches: int = 0  # forward passes that fed the PCA
    unconverged: list[str] = field(default_factory=list)  # layers whose ranked components were still moving
    components: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # name -> [rank, in] fp32

    def settings(self, name: str, r: int, alpha: float, use_rslora: bool) -> tuple[int, float]:
        """(rank, alpha) for module ``name`` whose recipe gives (r, alpha): alpha follows the rank so the
        scaling (alpha/r, or alpha/sqrt(r) with rsLoRA) is the one the recipe asked for."""
        rank = self.ranks[name]
        ratio = rank / r
        return rank, alpha * (math.sqrt(ratio) if use_rslora else ratio)

    def refine(self, specs: dict[str, TargetSpec], use_rslora: bool) -> dict[str, TargetSpec]:
        """The planned specs with the allocated ranks (rank 0: not adapted), alpha following the rank (see
        ``settings``), and A's start values."""
        refined = {}
        for name, spec in specs.items():
            if self.ranks[name]:
                rank, alpha = self.settings(name, spec.r, spec.alpha, use_rslora)
                refined[name] = replace(spec, r=rank, alpha=alpha, init="eva", start=self.components.get(name))
        return refined

    def to_json(self, method_settings: dict[str, Any]) -> dict[str, Any]:
        return {**method_settings, "budget": self.budget, "batches": self.batches,
                "unconverged": self.unconverged, "ranks": self.ranks}

    @staticmethod
    def from_json(record: dict[str, Any]) -> RankAllocation:
        """The ranks of a run being resumed (its A and B come from the checkpoint)."""
        return RankAllocation(ranks={k: int(v) for k, v in record["ranks"].items()}, budget=int(record["budget"]),
                              batches=int(record["batches"]), unconverged=list(record["unconverged"]))


class IncrementalPCA:
    """Top principal components of a stream of row batches (sklearn's IncrementalPCA, Ross et al. 2008).

    Each ``partial_fit`` takes x: [N, in] and updates components_ [k, in], singular_values_ [k] and
    explained_variance_ratio_ [k] (share of the total variance of all rows seen). Mean and variance are
    accumulated in fp64; from the second batch on the stacked matrix holds an fp64 mean-correction row,
    so the SVD runs in fp64, as in sklearn and PEFT. The SVD is randomized (``randomized_svd``: q = 2k,
    4 power iterations, seed 42) as PEFT's torch.svd_lowrank call is, so that both compute the same numbers.
    """

    def __init__(self, n_components: int) -> None:
        self.k = n_components
        self.seen = 0
        self.mean: torch.Tensor | None = None  # [in] fp64
        self.var: torch.Tensor | None = None  # [in] fp64
        self.components_: torch.Tensor | None = None
        self.singular_values_: torch.Tensor | None = None
        self.explained_variance_ratio_: torch.Tensor | None = None
        self.similarity = torch.zeros(n_components)  # cosine of each component with its previous value

    def partial_fit(self, x: torch.Tensor) -> None:
        previous = self.components_
        count = self.seen + x.shape[0]
        mean, var = self._update_moments(x, count)
        if previous is None:
            stacked = (x - mean).to(x.dtype)  # centred in fp64, kept in x's dtype
        else:
            batch_mean = x.mean(dim=0)
            correction = math.sqrt(self.seen / count * x.shape[0]) * (self.mean - batch_mean)  # [in] fp64
            stacked = torch.vstack((self.singular_values_[:, None] * self.components_, x - batch_mean, correction))
        singular, vt = self._svd(stacked)
        self.seen, self.mean, self.var = count, mean, var
        self.components_ = vt[: self.k]
        self.singular_values_ = singular[: self.k]
        self.explained_variance_ratio_ = singular[: self.k] ** 2 / (var * count).sum()
        if previous is not None:
            self.similarity = F.cosine_similarity(self.components_, previous).cpu()

    def _update_moments(self, x: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Running mean and (biased) variance per feature over all rows seen, in fp64 (Chan et al.)."""
        n = x.shape[0]
        batch_sum = x.sum(dim=0, dtype=torch.float64)
        centred = x - batch_sum / n
        batch_ssd = centred.square().sum(dim=0) - centred.sum(dim=0).square() / n  # centred is fp64
        if self.mean is None:
            return batch_sum / count, batch_ssd / count
        last_sum = self.mean * self.seen
        ratio = self.seen / n
        ssd = self.var * self.seen + batch_ssd + ratio / count * (last_sum / ratio - batch_sum).square()
        return (last_sum + batch_sum) / count, ssd / count

    def _svd(self, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S [q], Vᵀ [q, in]) of ``matrix``, each row of Vᵀ signed so its largest entry is positive."""
        singular, v = randomized_svd(matrix, q=min(2 * self.k, *matrix.shape), niter=4, seed=PCA_SEED)
        vt = v.mH
        signs = torch.sign(vt[torch.arange(vt.shape[0]), vt.abs().argmax(dim=1)])
        return singular, vt * signs[:, None]


def randomized_svd(matrix: torch.Tensor, q: int, niter: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(S [q], V [in, q]) of matrix [m, in] ≈ U·diag(S)·Vᴴ: Halko et al. 2009, Algorithm 5.1, step for step
    as torch.svd_lowrank computes it, but drawing its test matrix from its own seeded generator (the same
    numbers torch.manual_seed(seed) would give) instead of reseeding the global one on every call."""
    wide = matrix.shape[0] < matrix.shape[1]
    a = matrix.mH if wide else matrix  # tall: [rows, cols], rows >= cols
    generator = torch.Generator(a.device).manual_seed(seed)
    test = torch.randn(a.shape[1], q, dtype=a.dtype, device=a.device, generator=generator)
    basis = torch.linalg.qr(a @ test).Q  # [rows, q]
    for _ in range(niter):
        basis = torch.linalg.qr(a.mH @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    u, singular, vh = torch.linalg.svd(basis.mH @ a, full_matrices=False)
    return singular, basis @ u if wide else vh.mH


def allocate_ranks(model: nn.Module, lora: LoRAConfig, batch_at: Callable[[int], dict[str, torch.Tensor]]
                   ) -> RankAllocation:
    """The recipe's ``lora.rank_allocation`` run over its planned targets, before any layer is wrapped."""
    ranks = {name: spec.r for name, spec in plan_targets(model, lora).items()}
    settings = lora.rank_allocation
    return allocate_eva(model, list(ranks), ranks, batch_at, settings.rho, settings.tau, settings.max_batches)


@torch.no_grad()
def allocate_eva(
    model: nn.Module,
    targets: list[str],
    ranks: dict[str, int],
    batch_at: Callable[[int], dict[str, torch.Tensor]],
    rho: float,
    tau: float,
    max_batches: int,
) -> RankAllocation:
    """EVA ranks and A inits for ``targets`` (module paths) whose recipe ranks are ``ranks``.

    ``batch_at(i)`` is the i-th training micro-batch (input_ids, attention_mask, labels). Batch 0 is
    read once more first, to find layers that read the same tensor.
    """
    device = next(model.parameters()).device
    modules = {name: model.get_submodule(name) for name in targets}
    cap = {name: min(round(ranks[name] * rho), layer_shape(modules[name])[1]) for name in targets}
    groups = shared_inputs(model, modules, batch_at(0), device)  # first reader -> all readers
    for members in groups.values():
        widest = max(cap[name] for name in members)
        cap.update(dict.fromkeys(members, widest))
    pcas = {leader: IncrementalPCA(cap[leader]) for leader in groups}
    budget = sum(ranks.values())
    allocated = dict(cap)
    done = dict.fromkeys(groups, False)
    used = 0
    while used < max_batches and not all(done.values()):
        feeding = [leader for leader, finished in done.items() if not finished]
        _fit_batch(model, {leader: modules[leader] for leader in feeding}, pcas, batch_at(used), device)
        used += 1
        if all(pca.components_ is not None for pca in pcas.values()):
            allocated = distribute(pcas, groups, cap, budget)
        for leader, members in groups.items():
            needed = max(allocated[name] for name in members)
            done[leader] = bool((pcas[leader].similarity[:needed] >= tau).all())
    if any(pca.components_ is None for pca in pcas.values()):
        raise LorafitError(f"lora.rank_allocation: no training batch has as many trained tokens as the "
                           f"{max(cap.values())} components EVA needs per layer; raise train.micro_batch_size, or "
                           "lower lora.r or rank_allocation.rho")
    leader_of = {name: leader for leader, members in groups.items() for name in members}
    return RankAllocation(
        ranks=allocated, budget=budget, batches=used,
        unconverged=[name for name in targets if not done[leader_of[name]]],
        components={name: pcas[leader_of[name]].components_[:rank].float()
                    for name, rank in allocated.items() if rank},
    )


def distribute(pcas: dict[str, IncrementalPCA], groups: dict[str, list[str]], cap: dict[str, int],
               budget: int) -> dict[str, int]:
    """Give the ``budget`` largest explained-variance ratios, pooled over all layers (each layer offering
    at most ``cap`` of its own), to their layers. Ties go to the layer earlier in the model."""
    leader_of = {name: leader for leader, members in groups.items() for name in members}
    names = list(leader_of)  # model order
    owners, ratios = [], []
    for index, name in enumerate(names):
        values = pcas[leader_of[name]].explained_variance_ratio_[: cap[name]]
        owners += [index] * len(values)
        ratios.append(values.cpu())
    order = torch.cat(ratios).argsort(descending=True, stable=True)[:budget]
    counts = torch.bincount(torch.tensor(owners)[order], minlength=len(names))
    return dict(zip(names, counts.tolist(), strict=True))


def shared_inputs(model: nn.Module, modules: dict[str, nn.Module], batch: dict[str, torch.Tensor],
                  device: torch.device) -> dict[str, list[str]]:
    """Group modules whose inputs are equal on one batch; keyed by the first of each group (model order).

    Equality is decided on a fingerprint (shape, sum and a position-weighted sum in fp64): equal tensors
    give equal fingerprints exactly, and two different activations colliding on all three is not a
    practical concern. No input is kept, so this costs no memory.
    """
    prints: dict[str, tuple] = {}

    def fingerprint(name: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).double()
        weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64).remainder_(997)
        prints[name] = (tuple(x.shape), flat.sum().item(), (flat * weights).sum().item())

    inputs, _ = _model_inputs(batch, device)
    with _hooks(modules, fingerprint):
        _forward(model, inputs)
    groups: dict[tuple, list[str]] = {}
    for name in modules:
        groups.setdefault(prints[name], []).append(name)
    return {members[0]: members for members in groups.values()}


def _fit_batch(model: nn.Module, modules: dict[str, nn.Module], pcas: dict[str, IncrementalPCA],
               batch: dict[str, torch.Tensor], device: torch.device) -> None:
    """One forward pass that feeds each module's PCA with its inputs at the trained positions."""
    inputs, mask = _model_inputs(batch, device)
    with _hooks(modules, lambda name, x: _feed(pcas[name], x[mask])):
        _forward(model, inputs)


def _feed(pca: IncrementalPCA, rows: torch.Tensor) -> None:
    # A batch with fewer trained positions than components cannot update the PCA (PEFT skips it too).
    if rows.shape[0] >= pca.k:
        pca.partial_fit(rows.float())


def _model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The forward's inputs and the (B, T) mask of positions whose next token is trained."""
    labels = batch["labels"]
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    return inputs, mask.to(device)


def _forward(model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    model.eval()
    # Only the layers' inputs are wanted: where the model allows, ask for one position's logits, not
    # [B, T, vocab].
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        inputs = {**inputs, "logits_to_keep": 1}
    model(**inputs, use_cache=False)


class _hooks:
    """Forward hooks calling ``fn(name, input)`` on each of ``modules`` (input: (B, T, in)), removed on exit."""

    def __init__(self, modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]) -> None:
        self.modules, self.fn, self.handles = modules, fn, []

    def __enter__(self) -> None:
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_hook(lambda _, args, __, name=name: self.fn(name, args[0])))

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
