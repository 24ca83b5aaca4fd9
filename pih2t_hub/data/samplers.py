"""Samplers for long-tailed training: instance, class-balanced, square-root, progressive, and H2T's dual branch.

Design rules, and why:

* **No rank logic.** ``accelerate.prepare`` wraps the DataLoader's batch sampler in a ``BatchSamplerShard`` that
  hands batch ``k`` to rank ``k % world_size``. A sampler that also split by rank would be sharded twice. Every
  rank therefore iterates the *same* sequence, which is why each sampler owns a local ``torch.Generator``
  seeded from ``(seed, epoch)`` and never touches the global RNG.
* **Epochs by** ``set_epoch(e)``: the sequence of epoch ``e`` is a pure function of ``(seed, e)``, so a resumed
  run replays the same epochs. accelerate's prepared loaders call ``set_epoch`` with their own iteration count
  at every ``iter()``, i.e. the epoch number when the loader is iterated once per epoch.
* **Class-aware draws** (balanced, square-root, progressive) draw a class ``c`` with probability ``p_c`` and then
  an instance of ``c`` uniformly, with replacement; the default epoch length is ``N`` (the dataset size), so an
  epoch has as many steps as an instance-wise one (the convention of the decoupling / MiSLAS / H2T codes).
  Only classes that occur in ``labels`` can be drawn.
* Each sampler exposes ``indices()`` (the epoch as one tensor) for vectorised use on cached features, and
  ``class_probabilities`` (the distribution it draws classes from, by class id).

H2T's dual branch (docs/methods.md): :class:`DualBranchSampler` yields ``(fused, fusing)`` index pairs — the fused
index is class-balanced, the fusing one walks a shuffled permutation of the data (instance-wise) — and
:class:`DualBranchDataset` turns a pair into ``{"fused": base[fused], "fusing": base[fusing]}``. The same two
objects serve an image dataset (online path, with augmentation in the base dataset's transform) and a
``TensorDataset`` of cached features. Pairing is positional and random; the fusing labels are returned but
must be ignored by the loss.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Sized

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .row_batches import GatheredBatch

__all__ = [
    "ClassBalancedSampler",
    "ClassPowerSampler",
    "DualBranchDataset",
    "DualBranchSampler",
    "InstanceSampler",
    "ProgressiveSampler",
    "SquareRootSampler",
    "epoch_generator",
]

LabelsLike = Sequence[int] | np.ndarray | torch.Tensor


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A fresh CPU ``torch.Generator`` whose state depends only on ``(seed, epoch)``.

    ``SeedSequence`` mixes the pair so that neighbouring seeds/epochs give unrelated streams (``seed + epoch``
    would make seed 0 epoch 1 equal seed 1 epoch 0).
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    state = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def _as_labels(labels: LabelsLike) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    if t.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError("labels is empty")
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"labels must be integer class ids, got dtype {t.dtype}")
    t = t.to(torch.int64)
    if int(t.min()) < 0:
        raise ValueError("labels must be non-negative class ids")
    return t


def _check_length(num_samples: int | None, default: int) -> int:
    if num_samples is None:
        return default
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    return num_samples


class _EpochSampler(Sampler):
    """Base: a seeded, epoch-indexed sequence of length ``num_samples``."""

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose sequence the next ``iter()`` yields (deterministic in ``(seed, epoch)``)."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self.epoch = int(epoch)

    def indices(self) -> torch.Tensor:
        """The current epoch's indices as one int64 tensor."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_samples


class InstanceSampler(_EpochSampler):
    """Instance-wise sampling: a fresh permutation of the ``N`` rows each epoch (a seeded ``RandomSampler``).

    ``num_samples`` larger than ``N`` concatenates several permutations, so every row appears equally often.
    """

    def __init__(self, data: int | Sized, num_samples: int | None = None, seed: int = 0) -> None:
        size = data if isinstance(data, int) else len(data)
        if size < 1:
            raise ValueError(f"need at least one row, got {size}")
        self.size = size
        super().__init__(_check_length(num_samples, size), seed)

    def indices(self) -> torch.Tensor:
        gen = epoch_generator(self.seed, self.epoch)
        reps = -(-self.num_samples // self.size)
        return torch.cat([torch.randperm(self.size, generator=gen) for _ in range(reps)])[: self.num_samples]


class _ClassAwareSampler(_EpochSampler):
    """Draw a class from ``class_probabilities`` then one of its rows uniformly, with replacement."""

    def __init__(self, labels: LabelsLike, num_samples: int | None = None, seed: int = 0) -> None:
        self.labels = _as_labels(labels)
        self.num_classes = int(self.labels.max()) + 1
        self.class_sizes = torch.bincount(self.labels, minlength=self.num_classes)
        # rows grouped by class; class c's rows are rows_by_class[starts[c] : starts[c] + class_sizes[c]]
        self.rows_by_class = torch.argsort(self.labels, stable=True)
        self.starts = torch.cumsum(self.class_sizes, 0) - self.class_sizes
        super().__init__(_check_length(num_samples, self.labels.numel()), seed)

    @property
    def class_probabilities(self) -> torch.Tensor:
        """Probability of drawing each class id in the current epoch (float64, sums to 1)."""
        raise NotImplementedError

    def _draw(self, n: int, gen: torch.Generator) -> torch.Tensor:
        classes = torch.multinomial(self.class_probabilities, n, replacement=True, generator=gen)
        sizes = self.class_sizes[classes]
        offsets = (torch.rand(n, generator=gen, dtype=torch.float64) * sizes).long()
        offsets = torch.minimum(offsets, sizes - 1)  # guard the measure-zero u -> 1 rounding case
        return self.rows_by_class[self.starts[classes] + offsets]

    def indices(self) -> torch.Tensor:
        return self._draw(self.num_samples, epoch_generator(self.seed, self.epoch))


class ClassPowerSampler(_ClassAwareSampler):
    """Class probability proportional to ``n_c ** power``: 1 is instance-wise (in distribution), 0 is
    class-balanced, 0.5 square-root sampling (Mahajan et al. 2018, used by Kang et al. 2020)."""

    def __init__(
        self, labels: LabelsLike, power: float, num_samples: int | None = None, seed: int = 0
    ) -> None:
        if not np.isfinite(power) or power < 0:
            raise ValueError(f"power must be finite and >= 0, got {power}")
        self.power = float(power)
        super().__init__(labels, num_samples, seed)

    @property
    def class_probabilities(self) -> torch.Tensor:
        sizes = self.class_sizes.to(torch.float64)
        weights = torch.where(sizes > 0, sizes.pow(self.power), torch.zeros_like(sizes))
        return weights / weights.sum()


class ClassBalancedSampler(ClassPowerSampler):
    """Each present class with probability 1/C, then an instance uniformly within the class."""

    def __init__(self, labels: LabelsLike, num_samples: int | None = None, seed: int = 0) -> None:
        super().__init__(labels, 0.0, num_samples, seed)


class SquareRootSampler(ClassPowerSampler):
    """Class probability proportional to sqrt(n_c)."""

    def __init__(self, labels: LabelsLike, num_samples: int | None = None, seed: int = 0) -> None:
        super().__init__(labels, 0.5, num_samples, seed)


class ProgressiveSampler(_ClassAwareSampler):
    """Progressively-balanced sampling (Kang et al., ICLR 2020):
    ``p_c(t) = (1 - t/T) * n_c / N + (t/T) * 1/C`` at epoch ``t`` of ``T`` (``t/T`` capped at 1), so epoch 0 is
    instance-wise and the distribution moves linearly to class-balanced. Follow the paper's ``t/T``: the last
    epoch (``t = T - 1``) is not yet fully balanced."""

    def __init__(
        self, labels: LabelsLike, total_epochs: int, num_samples: int | None = None, seed: int = 0
    ) -> None:
        if isinstance(total_epochs, bool) or not isinstance(total_epochs, int) or total_epochs < 1:
            raise ValueError(f"total_epochs must be a positive integer, got {total_epochs!r}")
        self.total_epochs = total_epochs
        super().__init__(labels, num_samples, seed)

    @property
    def class_probabilities(self) -> torch.Tensor:
        alpha = min(self.epoch / self.total_epochs, 1.0)
        sizes = self.class_sizes.to(torch.float64)
        instance = sizes / sizes.sum()
        present = (sizes > 0).to(torch.float64)
        balanced = present / present.sum()
        return (1.0 - alpha) * instance + alpha * balanced


class DualBranchSampler(_ClassAwareSampler):
    """H2T's two branches, paired by position: yields ``(fused, fusing)`` row pairs.

    ``fused`` rows are drawn with class probability ``∝ n_c ** fused_power`` (0 = class-balanced, H2T's
    setting); ``fusing`` rows walk a fresh permutation of all rows (instance-wise, like the ordinary shuffled
    loader of the official code). Use with :class:`DualBranchDataset`; a batch of ``B`` pairs means ``2B``
    backbone inputs in the online path.
    """

    def __init__(
        self, labels: LabelsLike, num_samples: int | None = None, seed: int = 0, fused_power: float = 0.0
    ) -> None:
        if not np.isfinite(fused_power) or fused_power < 0:
            raise ValueError(f"fused_power must be finite and >= 0, got {fused_power}")
        self.fused_power = float(fused_power)
        super().__init__(labels, num_samples, seed)

    @property
    def class_probabilities(self) -> torch.Tensor:
        """Class distribution of the *fused* branch."""
        sizes = self.class_sizes.to(torch.float64)
        weights = torch.where(sizes > 0, sizes.pow(self.fused_power), torch.zeros_like(sizes))
        return weights / weights.sum()

    def indices(self) -> torch.Tensor:
        """The epoch as an ``(num_samples, 2)`` tensor: column 0 fused rows, column 1 fusing rows."""
        gen = epoch_generator(self.seed, self.epoch)
        size = self.labels.numel()
        reps = -(-self.num_samples // size)
        fusing = torch.cat([torch.randperm(size, generator=gen) for _ in range(reps)])[: self.num_samples]
        fused = self._draw(self.num_samples, gen)
        return torch.stack([fused, fusing], dim=1)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # yield in chunks: a list of 10^6 Python tuples alone costs ~250 MB of RSS on a large cache
        for chunk in self.indices().split(65536):
            yield from map(tuple, chunk.tolist())


class DualBranchDataset(Dataset):
    """Wrap any map-style dataset so that index ``(i, j)`` returns ``{"fused": base[i], "fusing": base[j]}``.

    The default collate keeps the structure: a batch is ``{"fused": <batch of base items>, "fusing": ...}``
    (e.g. ``{"fused": {"pixel_values": ..., "labels": ...}, ...}`` for an image dataset with
    ``with_transform``, ``{"fused": [features, labels], ...}`` for a ``TensorDataset``). When the base dataset
    fetches batches natively (``__getitems__``, as ``datasets.Dataset`` does) the two branches are fetched as two
    batched reads, so each branch's transform runs once per batch with independent random augmentation draws;
    over :class:`~pih2t_hub.data.row_batches.TensorRows` the two gathered branches are the batch itself.
    """

    def __init__(self, base) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    @staticmethod
    def _pair(index) -> tuple[int, int]:
        if not isinstance(index, (tuple, list)) or len(index) != 2:
            raise TypeError(
                f"DualBranchDataset expects (fused, fusing) index pairs from DualBranchSampler, got {index!r}"
            )
        return int(index[0]), int(index[1])

    def __getitem__(self, index) -> dict:
        i, j = self._pair(index)
        return {"fused": self.base[i], "fusing": self.base[j]}

    def __getitems__(self, indices: list) -> list[dict] | GatheredBatch:
        pairs = [self._pair(index) for index in indices]
        fused_rows = [i for i, _ in pairs]
        fusing_rows = [j for _, j in pairs]
        if hasattr(self.base, "__getitems__"):
            fused = self.base.__getitems__(fused_rows)
            fusing = self.base.__getitems__(fusing_rows)
            if isinstance(fused, GatheredBatch):  # already collated columns: the batch is the two of them
                return GatheredBatch({"fused": fused.batch, "fusing": fusing.batch})
        else:
            fused = [self.base[i] for i in fused_rows]
            fusing = [self.base[j] for j in fusing_rows]
        return [{"fused": f, "fusing": g} for f, g in zip(fused, fusing)]
