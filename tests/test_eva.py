"""EVA rank allocation: the PCA against an eigendecomposition, the allocation against PEFT's own EVA and a
planted signal, and a training run that uses it (files PEFT loads, exact resume)."""

import json

import pytest
import torch
from torch import nn

from lorafit.config import DataConfig, LoRAConfig, RankAllocationConfig
from lorafit.data import collate, tokenize_rows
from lorafit.errors import LorafitError
from lorafit.eva import IncrementalPCA, RankAllocation, allocate_eva, allocate_ranks
from lorafit.inject import inject_lora, lora_modules
from lorafit.targets import find_targets
from lorafit.train import train as run_training

from .conftest import ctrl_c_after_step, losses, recipe_at, tiny_model, tiny_tokenizer
from .tolerance import assert_close_by_rule, reduction_through

ROWS = [{"prompt": f"Convert {m} {d}, {1990 + d}", "completion": f"{1990 + d}-{m:02d}-{d:02d} and {m * d}"}
        for m in range(1, 13) for d in range(1, 29)]


def loader(rows=ROWS, size: int = 8) -> list[dict[str, torch.Tensor]]:
    examples = tokenize_rows(rows, DataConfig(train="x.jsonl"), tiny_tokenizer(), "x.jsonl").examples
    return [collate(examples[i : i + size], pad_id=0) for i in range(0, len(examples), size)]


@pytest.mark.numerics
def test_incremental_pca_with_all_components_is_the_eigendecomposition():
    """Keeping every component, the incremental PCA is exact: ratios = eigenvalues / trace of the pooled
    covariance (to rounding: tests/tolerance.py), components = eigenvectors up to sign (|cos| >= 1 - 1e-6)."""
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(8, 8, generator=generator) * torch.linspace(3, 0.1, 8)
    batches = [torch.randn(20, 8, generator=generator) @ mixing + 5 for _ in range(5)]
    pca = IncrementalPCA(8)
    for batch in batches:
        pca.partial_fit(batch)
    rows = torch.cat(batches).double()
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(rows.T, correction=0))
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    # The first batch's SVD runs in fp32 (its rows are fp32); variances sum over the 100 rows and 8 features.
    assert_close_by_rule(pca.explained_variance_ratio_, eigenvalues / eigenvalues.sum(), reduction=100 + 8,
                         dtype=torch.float32)
    cosines = (pca.components_.double() @ eigenvectors).diagonal().abs()
    assert (cosines >= 1 - 1e-6).all()


@pytest.mark.numerics
def test_allocation_matches_peft_eva():
    """PEFT's get_eva_state_dict on the same model, batches, rho and tau, told to use lorafit's positions
    (those whose next token is trained): the same rank for every module and the same A to rounding.

    lorafit's randomized_svd is its own copy of torch.svd_lowrank, not the same code, so A is compared by the
    rule (tests/README.md), not bit for bit; it sums over every trained position seen and through the model.
    The ranks are discrete: they hold because no two pooled ratios at the budget's edge lie within rounding
    of each other here (measured: the same ranks under MKL's other code paths, tests/README.md)."""
    from peft import LoraConfig
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import get_eva_state_dict

    def next_token_trained(model_input, config):
        mask = torch.zeros_like(model_input["labels"], dtype=torch.bool)
        mask[:, :-1] = model_input["labels"][:, 1:] != -100
        return mask.nonzero()

    batches = loader()
    model = tiny_model(hidden_size=64, intermediate_size=128, num_hidden_layers=3)
    targets = find_targets(model, "all-linear")
    ours = allocate_eva(model, targets, dict.fromkeys(targets, 4), lambda i: batches[i % len(batches)],
                        rho=2.0, tau=0.99, max_batches=1000)
    config = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"], eva_config=EvaConfig(rho=2.0, tau=0.99))
    theirs = get_eva_state_dict(model, batches, peft_config=config, prepare_model_inputs_fn=next_token_trained,
                                show_progress_bar=False)
    assert ours.ranks == {name: u.shape[0] for name, u in theirs.items()}
    assert len(set(ours.ranks.values())) > 1  # the allocation is not trivially uniform here
    assert sum(ours.ranks.values()) == 4 * len(targets) and not ours.unconverged
    rows = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in batches[: ours.batches])  # positions fed
    reduction = reduction_through(model, tokens=rows)
    for name, components in ours.components.items():
        assert_close_by_rule(components, theirs[name].float(), reduction=reduction, msg=name)


class _TwoStreams(nn.Module):
    """Layer ``rich`` reads inputs whose variance is spread over 8 strong directions of 16; ``flat`` reads
    inputs of equal variance in all 16. The inputs are Gaussian noise seeded by the batch's tokens. EVA
    should spend the whole budget on ``rich``: its top 8 ratios are ~1/8 each, ``flat``'s ~1/16."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("spread", torch.cat([torch.ones(8), torch.full((8,), 0.05)]))
        self.rich, self.flat = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        generator = torch.Generator().manual_seed(int(input_ids.sum()))
        hidden = torch.randn(*input_ids.shape, 16, generator=generator)
        return self.rich(hidden * self.spread) + self.flat(hidden)


def test_ranks_follow_a_planted_signal_and_sum_to_the_budget():
    batches = loader()
    allocation = allocate_eva(_TwoStreams(), ["rich", "flat"], {"rich": 4, "flat": 4},
                              lambda i: batches[i % len(batches)], rho=2.0, tau=0.99, max_batches=200)
    assert allocation.ranks == {"rich": 8, "flat": 0}
    assert not allocation.unconverged


def test_batch_cap_is_honoured_and_unconverged_layers_are_reported():
    batches = loader()
    model = tiny_model()
    targets = find_targets(model, "all-linear")
    allocation = allocate_eva(model, targets, dict.fromkeys(targets, 4), lambda i: batches[i % len(batches)],
                              rho=2.0, tau=0.999999, max_batches=3)
    assert allocation.batches == 3
    assert allocation.unconverged == targets
    assert sum(allocation.ranks.values()) == 4 * len(targets)


def test_layers_are_built_with_allocated_ranks_alpha_and_components():
    """Allocated rank, alpha scaled with it (alpha/r kept; alpha/sqrt(r) kept with rsLoRA), A = the
    components, B = 0, and no layer at all where the rank is 0."""
    model = tiny_model()
    targets = find_targets(model, ["q_proj", "v_proj"])
    ranks = dict(zip(targets, [8, 0, 2, 6], strict=True))
    components = {name: torch.randn(r, 32) for name, r in ranks.items() if r}
    allocation = RankAllocation(ranks=ranks, budget=16, components=components)
    for rslora in (False, True):
        model = tiny_model()
        inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=rslora),
                    allocation)
        wrapped = lora_modules(model)
        assert sorted(wrapped) == sorted(name for name, r in ranks.items() if r)
        for name, module in wrapped.items():
            assert module.r == ranks[name]
            assert module.scaling == pytest.approx(8 / 2 if rslora else 8 / 4)
            assert torch.equal(module.lora_A.weight, components[name])  # a copy: bit-exact
            assert not module.lora_B.weight.any()


def test_recipe_allocation_uses_rank_pattern_budgets():
    batches = loader()
    lora = LoRAConfig(r=4, target_modules=["q_proj", "o_proj"], rank_pattern={"o_proj": 2},
                      rank_allocation=RankAllocationConfig(rho=1.0))
    allocation = allocate_ranks(tiny_model(), lora, lambda i: batches[i % len(batches)])
    assert allocation.budget == 2 * 4 + 2 * 2
    # rho = 1: no layer may exceed its own r, so spending the whole budget leaves every layer at its r.
    # (q/k/v read one tensor and share one cap, the largest of theirs, as in PEFT: hence o_proj here.)
    assert allocation.ranks == {name: 2 if "o_proj" in name else 4 for name in allocation.ranks}


def test_a_run_with_eva_writes_its_ranks_loads_in_peft_and_resumes_exactly(run_dir, monkeypatch):  # noqa: F811
    from peft import PeftModel

    settings = ("lora.rank_allocation={rho: 2.0, max_batches: 20}", "train.max_steps=4", "train.save_every=1")
    summary = run_training(recipe_at(run_dir, *settings, out="straight"))
    out = run_dir / "straight"
    record = json.loads((out / "rank_allocation.json").read_text())
    assert record["method"] == "eva" and record["rho"] == 2.0 and sum(record["ranks"].values()) == record["budget"]
    assert summary.ranks == record["ranks"] and (out / "ranks.png").stat().st_size > 1000
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    first = config["r"]
    assert config["rank_pattern"] == {k: r for k, r in record["ranks"].items() if r and r != first}
    assert sorted(config["target_modules"]) == sorted(k for k, r in record["ranks"].items() if r)

    peft_model = PeftModel.from_pretrained(tiny_model(), out / "adapter").eval()
    ours = tiny_model()
    from lorafit.adapter_io import load_adapter

    load_adapter(ours, out / "adapter")
    input_ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    assert_close_by_rule(ours(input_ids).logits, peft_model(input_ids).logits,
                         reduction=reduction_through(ours, tokens=input_ids.numel()))

    with ctrl_c_after_step(monkeypatch, 2), pytest.raises(LorafitError, match="interrupted after step 2"):
        run_training(recipe_at(run_dir, *settings, out="resumed"))
    run_training(recipe_at(run_dir, *settings, out="resumed"), resume="latest")
    assert losses(run_dir / "resumed") == losses(out)  # same code, same inputs, same device: bit-exact


def test_rank_allocation_settings_are_checked():
    with pytest.raises(ValueError, match="rho"):
        LoRAConfig(rank_allocation={"rho": 0.5})
    with pytest.raises(ValueError, match="method"):
        LoRAConfig(rank_allocation={"method": "svd"})
