"""Batched row fetching gives exactly the batches torch's per-row fetch and default collate give."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pih2t_hub.data.row_batches import GatheredBatch, TensorRows, batch_fetching, collate_rows
from pih2t_hub.data.samplers import ClassBalancedSampler, DualBranchDataset, DualBranchSampler, InstanceSampler


def _columns(n: int = 103, dim: int = 7, dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, dim, generator=g).to(dtype), torch.randint(0, 5, (n,), generator=g),
            torch.rand(n, generator=g))


def _assert_same(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("sampler", [lambda y: InstanceSampler(len(y), seed=3),
                                     lambda y: ClassBalancedSampler(y, seed=3)])
def test_single_branch_batches_equal_per_row_fetch(sampler) -> None:
    cols = _columns()
    reference = DataLoader(TensorDataset(*cols), batch_size=16, sampler=sampler(cols[1]))
    batched = DataLoader(batch_fetching(TensorDataset(*cols)), batch_size=16, sampler=sampler(cols[1]),
                         collate_fn=collate_rows)
    ref, got = list(reference), list(batched)
    assert len(ref) == len(got) == -(-103 // 16)
    for a, b in zip(ref, got):
        _assert_same(a, b)


def test_dual_branch_batches_equal_per_row_fetch() -> None:
    cols = _columns()
    reference = DataLoader(DualBranchDataset(TensorDataset(*cols)), batch_size=10,
                           sampler=DualBranchSampler(cols[1], seed=1))
    batched = DataLoader(DualBranchDataset(batch_fetching(TensorDataset(*cols))), batch_size=10,
                         sampler=DualBranchSampler(cols[1], seed=1), collate_fn=collate_rows)
    ref, got = list(reference), list(batched)
    assert len(ref) == len(got) == 11
    for a, b in zip(ref, got):
        _assert_same(a, b)
    # the fused branch really is gathered at the sampler's first-column rows
    pairs = DualBranchSampler(cols[1], seed=1).indices()[:10]
    assert torch.equal(got[0]["fused"][0], cols[0][pairs[:, 0]])
    assert torch.equal(got[0]["fusing"][1], cols[1][pairs[:, 1]])


def test_tensor_rows_keeps_the_tensor_dataset_interface() -> None:
    cols = _columns(n=9)
    rows = TensorRows(*cols)
    assert len(rows) == 9 and rows.tensors[0] is cols[0]
    assert all(torch.equal(a, b) for a, b in zip(rows[4], TensorDataset(*cols)[4]))
    gathered = rows.__getitems__([8, 0, 8])
    assert isinstance(gathered, GatheredBatch)
    assert torch.equal(gathered.batch[0], torch.stack([cols[0][8], cols[0][0], cols[0][8]]))


def test_other_datasets_and_plain_batches_take_the_default_path() -> None:
    wrapped = DualBranchDataset(TensorDataset(torch.arange(4)))
    assert batch_fetching(wrapped) is wrapped
    assert torch.equal(collate_rows([torch.tensor(1), torch.tensor(2)]), torch.tensor([1, 2]))


def test_columns_of_unequal_length_are_refused() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        TensorRows(torch.zeros(3, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="at least one"):
        TensorRows()
