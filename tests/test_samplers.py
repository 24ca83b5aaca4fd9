"""Samplers: drawn distributions (chi-square), determinism, dual branch pairing, sharding under accelerate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from torch.utils.data import DataLoader, TensorDataset

from pih2t_hub.data import (
    ClassBalancedSampler,
    ClassPowerSampler,
    DualBranchDataset,
    DualBranchSampler,
    InstanceSampler,
    ProgressiveSampler,
    SquareRootSampler,
)

COUNTS = np.array([400, 200, 100, 50, 25, 12, 6, 3])  # a long-tailed toy training set, 8 classes
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(len(COUNTS)), COUNTS))
DRAWS = 40_000


def class_histogram(indices) -> np.ndarray:
    return np.bincount(LABELS[np.asarray(indices)], minlength=len(COUNTS))


def fits(observed: np.ndarray, probabilities: np.ndarray) -> float:
    """p-value of a chi-square goodness of fit (seeded draws: deterministic, not flaky)."""
    expected = probabilities / probabilities.sum() * observed.sum()
    return chisquare(observed, expected).pvalue


def test_class_balanced_is_uniform_over_classes():
    draws = list(ClassBalancedSampler(LABELS, num_samples=DRAWS, seed=1))
    hist = class_histogram(draws)
    assert fits(hist, np.ones(8)) > 1e-3
    assert fits(hist, COUNTS.astype(float)) < 1e-12  # the test can tell balanced from instance-wise
    tail_rows = np.flatnonzero(LABELS == 7)  # within a class, instances are uniform
    within = np.array([np.sum(np.asarray(draws) == r) for r in tail_rows])
    assert fits(within, np.ones(len(tail_rows))) > 1e-3


def test_default_epoch_length_is_dataset_size():
    assert len(ClassBalancedSampler(LABELS)) == len(LABELS) == len(list(ClassBalancedSampler(LABELS)))


def test_square_root_is_proportional_to_sqrt_counts():
    hist = class_histogram(list(SquareRootSampler(LABELS, num_samples=DRAWS, seed=2)))
    assert fits(hist, np.sqrt(COUNTS)) > 1e-3
    assert fits(hist, np.ones(8)) < 1e-12
    assert fits(hist, COUNTS.astype(float)) < 1e-12


def test_class_power_one_matches_instance_frequencies():
    hist = class_histogram(list(ClassPowerSampler(LABELS, power=1.0, num_samples=DRAWS, seed=3)))
    assert fits(hist, COUNTS.astype(float)) > 1e-3


def test_progressive_moves_from_instance_to_balanced():
    total = 4
    sampler = ProgressiveSampler(LABELS, total_epochs=total, num_samples=DRAWS, seed=4)
    tail_share = []
    for epoch in range(total):
        sampler.set_epoch(epoch)
        hist = class_histogram(list(sampler))
        t = epoch / total
        expected = (1 - t) * COUNTS / COUNTS.sum() + t / len(COUNTS)  # Kang et al. 2020, eq. for p^PB
        assert fits(hist, expected) > 1e-3, epoch
        tail_share.append(hist[4:].sum() / DRAWS)
    assert all(a < b for a, b in zip(tail_share, tail_share[1:]))
    sampler.set_epoch(0)
    assert fits(class_histogram(list(sampler)), COUNTS.astype(float)) > 1e-3


def test_instance_sampler_permutes_each_epoch():
    sampler = InstanceSampler(len(LABELS), seed=5)
    first = list(sampler)
    assert sorted(first) == list(range(len(LABELS)))
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(len(LABELS))) and second != first
    assert list(InstanceSampler(LABELS, num_samples=2 * len(LABELS) + 3)).count(0) in (2, 3)


@pytest.mark.parametrize("cls", [InstanceSampler, ClassBalancedSampler, SquareRootSampler])
def test_seed_and_epoch_determinism_without_global_rng(cls):
    arg = len(LABELS) if cls is InstanceSampler else LABELS
    state = torch.get_rng_state()
    a, b, c = cls(arg, seed=11), cls(arg, seed=11), cls(arg, seed=12)
    b.set_epoch(0)
    assert list(a) == list(b) and list(a) != list(c)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG was never touched


def test_dual_branch_pairs():
    sampler = DualBranchSampler(LABELS, seed=6)
    pairs = list(sampler)
    assert len(pairs) == len(LABELS)
    fused = [i for i, _ in pairs]
    fusing = [j for _, j in pairs]
    assert sorted(fusing) == list(range(len(LABELS)))  # instance-wise: one pass over the data
    big = DualBranchSampler(LABELS, num_samples=DRAWS, seed=7).indices()
    assert fits(class_histogram(big[:, 0]), np.ones(8)) > 1e-3  # fused branch is class-balanced
    assert fits(class_histogram(big[:, 1]), COUNTS.astype(float)) > 1e-3  # fusing branch follows the data
    assert len(set(fused)) < len(fused)  # with replacement


def test_dual_branch_dataset_on_cached_features():
    features = torch.arange(len(LABELS) * 3, dtype=torch.float32).reshape(-1, 3)
    labels = torch.as_tensor(LABELS)
    sampler = DualBranchSampler(LABELS, seed=8)
    loader = DataLoader(DualBranchDataset(TensorDataset(features, labels)), sampler=sampler, batch_size=16)
    batch = next(iter(loader))
    pairs = sampler.indices()[:16]
    assert torch.equal(batch["fused"][0], features[pairs[:, 0]])
    assert torch.equal(batch["fused"][1], labels[pairs[:, 0]])
    assert torch.equal(batch["fusing"][0], features[pairs[:, 1]])


def test_dual_branch_dataset_on_hf_dataset():
    from datasets import Dataset

    ds = Dataset.from_dict({"x": list(range(len(LABELS))), "labels": LABELS.tolist()})
    ds = ds.with_transform(
        lambda b: {"pixel_values": [torch.tensor([float(v)]) for v in b["x"]], "labels": b["labels"]}
    )
    sampler = DualBranchSampler(LABELS, seed=9)
    batch = next(iter(DataLoader(DualBranchDataset(ds), sampler=sampler, batch_size=8)))
    pairs = sampler.indices()[:8]
    assert batch["fused"]["pixel_values"].shape == (8, 1)
    assert batch["fused"]["pixel_values"][:, 0].long().tolist() == pairs[:, 0].tolist()
    assert batch["fusing"]["labels"].tolist() == LABELS[pairs[:, 1].numpy()].tolist()
    with pytest.raises(TypeError, match="pairs"):
        DualBranchDataset(ds)[3]


def test_bad_inputs():
    with pytest.raises(TypeError, match="integer"):
        ClassBalancedSampler([0.0, 1.0])
    with pytest.raises(ValueError, match="non-negative"):
        ClassBalancedSampler([0, -1])
    with pytest.raises(ValueError, match="empty"):
        ClassBalancedSampler([])
    with pytest.raises(ValueError, match="power"):
        ClassPowerSampler([0, 1], power=-1)
    with pytest.raises(ValueError, match="total_epochs"):
        ProgressiveSampler([0, 1], total_epochs=0)
    with pytest.raises(ValueError, match="num_samples"):
        InstanceSampler(10, num_samples=0)
    with pytest.raises(ValueError, match="seed"):
        InstanceSampler(10, seed=-1)


# ---------------------------------------------------------------------------------------------- accelerate


def _sharded_epochs(out_path: str) -> None:
    """Runs in each of 2 processes: iterate prepared loaders for 2 epochs and record what this rank saw."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # debug_launcher forks this pytest process: drop any single-process state an earlier test left behind
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    n = 64
    loaders = {
        "instance": DataLoader(TensorDataset(torch.arange(n)), sampler=InstanceSampler(n, seed=3), batch_size=4),
        "balanced": DataLoader(
            TensorDataset(torch.arange(n)), sampler=ClassBalancedSampler(LABELS[:n], seed=4), batch_size=4
        ),
    }
    dual = DataLoader(
        DualBranchDataset(TensorDataset(torch.arange(n))), sampler=DualBranchSampler(LABELS[:n], seed=5), batch_size=4
    )
    seen = {}
    for name, loader in loaders.items():
        prepared = accelerator.prepare(loader)
        for epoch in range(2):
            prepared.set_epoch(epoch)
            seen[f"{name}/{epoch}"] = [batch[0].tolist() for batch in prepared]
    prepared = accelerator.prepare(dual)
    seen["dual/0"] = [torch.stack([b["fused"][0], b["fusing"][0]], 1).tolist() for b in prepared]
    from accelerate.utils import gather_object

    # plain gather: gather_for_metrics would drop 'duplicate' tail samples using the last loader's remainder
    everything = gather_object([seen])
    if accelerator.is_main_process:
        with open(out_path, "w") as handle:
            json.dump(everything, handle)
    accelerator.wait_for_everyone()


def test_accelerate_two_processes_shard_disjoint_batches(tmp_path):
    from accelerate import debug_launcher

    out = tmp_path / "seen.json"
    debug_launcher(_sharded_epochs, args=(str(out),), num_processes=2)
    rank0, rank1 = json.loads(out.read_text())
    n = 64
    for epoch in range(2):
        a, b = rank0[f"instance/{epoch}"], rank1[f"instance/{epoch}"]
        assert len(a) == len(b) == n // 8  # 8 batches of 4 per rank
        flat_a = [i for batch in a for i in batch]
        flat_b = [i for batch in b for i in batch]
        assert not set(flat_a) & set(flat_b)  # disjoint ...
        assert sorted(flat_a + flat_b) == list(range(n))  # ... and together the whole epoch
        # rank r holds batches r, r+2, ... of the single-process sequence of that epoch
        sampler = InstanceSampler(n, seed=3)
        sampler.set_epoch(epoch)
        reference = [sampler.indices()[k : k + 4].tolist() for k in range(0, n, 4)]
        assert a == reference[0::2] and b == reference[1::2]

        balanced = ClassBalancedSampler(LABELS[:n], seed=4)
        balanced.set_epoch(epoch)
        reference = [balanced.indices()[k : k + 4].tolist() for k in range(0, n, 4)]
        assert rank0[f"balanced/{epoch}"] == reference[0::2]
        assert rank1[f"balanced/{epoch}"] == reference[1::2]
    assert rank0["instance/0"] != rank0["instance/1"]

    pairs = DualBranchSampler(LABELS[:n], seed=5).indices()
    reference = [pairs[k : k + 4].tolist() for k in range(0, n, 4)]
    assert rank0["dual/0"] == reference[0::2] and rank1["dual/0"] == reference[1::2]
    fusing = [pair[1] for batch in rank0["dual/0"] + rank1["dual/0"] for pair in batch]
    assert sorted(fusing) == list(range(n))  # the instance-wise branch covers the epoch once across ranks
