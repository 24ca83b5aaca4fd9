"""Cached feature columns fetched a batch at a time.

A ``TensorDataset`` hands the DataLoader one tuple of row views per sample, which the default collate then
stacks: on cached features that per-row Python work, not the head's matmul, is most of a stage-2 step on the CPU.
:class:`TensorRows` answers ``__getitems__`` with one gather per column and marks the result
:class:`GatheredBatch`, which :func:`collate_rows` passes through; any other batch goes to torch's
``default_collate``. The sampler, its order and the values of every batch are unchanged (a gather and a stack of
the same rows are the same tensor), so a run gives the same numbers either way, only sooner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset
from torch.utils.data._utils.collate import default_collate


@dataclass(frozen=True)
class GatheredBatch:
    """A batch its dataset already assembled (columns gathered by index): collation has nothing left to do."""

    batch: Any


class TensorRows(Dataset):
    """Tensor columns of equal length, ``TensorDataset``-compatible (``.tensors``, ``ds[i]``), fetched by batch."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        if not tensors:
            raise ValueError("TensorRows needs at least one tensor column")
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            raise ValueError(f"TensorRows columns differ in length: {[t.shape[0] for t in tensors]}")
        self.tensors = tuple(tensors)

    def __len__(self) -> int:
        return self.tensors[0].shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[index] for t in self.tensors)

    def __getitems__(self, indices: list) -> GatheredBatch:
        rows = torch.as_tensor(indices, dtype=torch.long)
        # a list, as default_collate makes of a batch of tuples, so the steps see the same structure
        return GatheredBatch([t[rows] for t in self.tensors])


def batch_fetching(dataset: Dataset) -> Dataset:
    """``dataset`` as :class:`TensorRows` when it is a plain ``TensorDataset`` (same columns, no copy), else as is."""
    if type(dataset) is TensorDataset:
        return TensorRows(*dataset.tensors)
    return dataset


def collate_rows(data: Any) -> Any:
    """The DataLoader's ``collate_fn``: a :class:`GatheredBatch` as it is, anything else by ``default_collate``."""
    if isinstance(data, GatheredBatch):
        return data.batch
    return default_collate(data)


__all__ = ["GatheredBatch", "TensorRows", "batch_fetching", "collate_rows"]
