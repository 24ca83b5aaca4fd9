"""Feature cache for frozen backbones: extract once, resume after an interruption, never reuse a stale cache.

Stage 2 with a frozen backbone in eval mode only needs the backbone's (pooled) features, so they are computed once
and read from disk afterwards. The cache directory holds:

* ``manifest.json``: what the features were computed from (the caller's manifest: backbone, weights, transform;
  plus the dataset fingerprint, dtype, number of views, shard size, seed) and, once complete, the feature shape.
  A request whose manifest differs from the stored one *rebuilds* the cache; it is never silently reused.
* while extracting, ``shard-NNNNN.npz``: ``shard_size`` consecutive samples each, written atomically (temp file +
  ``os.replace``). A re-run with the same manifest skips the shards that exist, so a killed extraction resumes.
* when done, ``features.npy`` and ``labels.npy``: one array each, opened memory-mapped with
  ``allow_pickle=False`` (nothing is ever unpickled). Shards are deleted after this consolidation.

Shapes: ``features`` is ``(N, *S)`` with ``S`` the per-sample shape ``encode`` returns (``(D,)`` for pooled
features, ``(C, H, W)`` for un-pooled maps), or ``(N, V, *S)`` with ``V = num_views > 1`` augmented views.

Determinism: samples are read in dataset order, and the global torch / Python ``random`` states are re-seeded
from ``(seed, shard, view)`` around each shard and restored afterwards, so random augmentations (torchvision and
timm draw from those global states) give the same views whether or not the run was interrupted. Storage dtypes
are float32 and float16 (NumPy has no bfloat16).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

__all__ = ["CacheRowReader", "FeatureCache", "extract_features", "load_or_extract"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
REQUIRED_KEYS = ("backbone", "weights", "transform")
_MANIFEST = "manifest.json"
_FEATURES = "features.npy"
_LABELS = "labels.npy"
_DTYPES = {"float32": np.float32, "float16": np.float16}


# ---------------------------------------------------------------------------------------------- small helpers


def _dtype_name(dtype) -> str:
    aliases = {
        torch.float32: "float32", torch.float16: "float16", "float32": "float32", "fp32": "float32",
        "float16": "float16", "fp16": "float16", "half": "float16", "float": "float32",
    }
    try:
        return aliases[dtype]
    except (KeyError, TypeError):
        raise ValueError(f"dtype must be float32 or float16 (NumPy has no bfloat16), got {dtype!r}") from None


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, mode) as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _normalise(manifest: Mapping) -> dict:
    try:
        return json.loads(json.dumps(dict(manifest), sort_keys=True))
    except (TypeError, ValueError) as err:
        raise TypeError(f"manifest must be JSON-serialisable: {err}") from None


def _read_manifest(cache_dir: Path) -> dict | None:
    path = cache_dir / _MANIFEST
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # corrupt: treated as stale
    return stored if isinstance(stored, dict) and "request" in stored else None


def _own_files(cache_dir: Path) -> Iterator[Path]:
    for pattern in (_MANIFEST, _FEATURES, _LABELS, "shard-*.npz", "*.tmp"):
        yield from cache_dir.glob(pattern)


def _shard_path(cache_dir: Path, shard: int) -> Path:
    return cache_dir / f"shard-{shard:05d}.npz"


def _mix(*values: int) -> int:
    return int(np.random.SeedSequence(list(values)).generate_state(1, dtype=np.uint32)[0])


@contextlib.contextmanager
def _seeded_global_rng(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG and Python's ``random`` (used by timm's transforms), restoring both on exit."""
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)


def _split_batch(batch, image_key: str, label_key: str) -> tuple[Any, torch.Tensor]:
    if isinstance(batch, Mapping):
        missing = [k for k in (image_key, label_key) if k not in batch]
        if missing:
            raise KeyError(f"batch has no {missing} (keys: {list(batch)}); set image_key / label_key")
        inputs, labels = batch[image_key], batch[label_key]
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        inputs, labels = batch[0], batch[1]
    else:
        raise TypeError(f"expected dict or (inputs, labels) batches, got {type(batch).__name__}")
    return inputs, torch.as_tensor(labels).to(torch.int64)


def _fingerprint(dataset, manifest: Mapping) -> str:
    if "dataset" in manifest:
        return str(manifest["dataset"])
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint is None:
        raise ValueError(
            "cannot fingerprint this dataset (not a datasets.Dataset); put a string identifying its exact "
            "content in manifest['dataset']"
        )
    return str(fingerprint)


# ---------------------------------------------------------------------------------------------- the cache


@dataclass
class FeatureCache:
    """A completed cache: memory-mapped ``features`` and ``labels`` arrays plus the stored ``manifest``.

    Arrays are opened copy-on-write (``mmap_mode="c"``): pages load lazily, the file is never modified, and
    ``torch.from_numpy`` accepts them without copying.
    """

    cache_dir: Path
    manifest: dict
    features: np.ndarray
    labels: np.ndarray

    @classmethod
    def open(cls, cache_dir: str | os.PathLike, manifest: Mapping | None = None) -> FeatureCache:
        """Open a completed cache; with ``manifest``, every given key must match the stored request."""
        cache_dir = Path(cache_dir)
        stored = _read_manifest(cache_dir)
        if stored is None or not stored.get("complete"):
            raise FileNotFoundError(f"no complete feature cache in {cache_dir}; run load_or_extract")
        if manifest is not None:
            wanted = _normalise(manifest)
            diff = {k: (stored["request"].get(k), v) for k, v in wanted.items() if stored["request"].get(k) != v}
            if diff:
                raise ValueError(f"feature cache {cache_dir} was built for a different request: {diff}")
        features = np.load(cache_dir / _FEATURES, mmap_mode="c", allow_pickle=False)
        labels = np.load(cache_dir / _LABELS, mmap_mode="c", allow_pickle=False)
        if len(features) != stored["request"]["num_samples"] or len(labels) != len(features):
            raise ValueError(f"feature cache {cache_dir} is inconsistent with its manifest; delete it")
        return cls(cache_dir=cache_dir, manifest=stored, features=features, labels=labels)

    def __len__(self) -> int:
        return len(self.features)

    @property
    def num_views(self) -> int:
        return int(self.manifest["request"]["num_views"])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Per-sample, per-view shape (``(D,)`` for pooled features)."""
        return tuple(self.manifest["feature_shape"])

    @property
    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels)

    def as_tensor_dataset(self, view: int | None = None) -> TensorDataset:
        """A ``TensorDataset(features, labels)`` over the memory map (no copy).

        With several views, ``view=k`` selects one; ``view=None`` flattens views into ``N * V`` samples
        (sample ``n``'s views at rows ``n*V ... n*V + V - 1``) with repeated labels.
        """
        features = torch.from_numpy(self.features)
        labels = torch.from_numpy(self.labels)
        if self.num_views == 1:
            if view not in (None, 0):
                raise ValueError(f"the cache has one view; got view={view}")
            return TensorDataset(features, labels)
        if view is not None:
            if not 0 <= view < self.num_views:
                raise ValueError(f"view must be in [0, {self.num_views}), got {view}")
            return TensorDataset(features[:, view], labels)
        flat = features.reshape(len(self) * self.num_views, *features.shape[2:])
        return TensorDataset(flat, labels.repeat_interleave(self.num_views))


# ---------------------------------------------------------------------------------------------- extraction


def _extract_shard(
    encode: Callable[[Any], torch.Tensor],
    dataset,
    rows: range,
    *,
    batch_size: int,
    num_views: int,
    dtype: np.dtype,
    seed: int,
    shard: int,
    image_key: str,
    label_key: str,
    collate_fn,
    num_workers: int,
    progress_bar,
) -> tuple[np.ndarray, np.ndarray]:
    views, labels = [], None
    for view in range(num_views):
        view_seed = _mix(seed, shard, view)
        loader = DataLoader(
            Subset(dataset, rows),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=collate_fn,
            generator=torch.Generator().manual_seed(view_seed),  # seeds the workers' RNGs deterministically
        )
        chunks, view_labels = [], []
        with _seeded_global_rng(view_seed), torch.inference_mode():
            for batch in loader:
                inputs, batch_labels = _split_batch(batch, image_key, label_key)
                out = encode(inputs)
                if not isinstance(out, torch.Tensor) or out.ndim < 1 or out.shape[0] != len(batch_labels):
                    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise ValueError(f"encode must return a (batch, ...) tensor; got {shape}")
                chunks.append(out.detach().to("cpu", torch.float32).numpy().astype(dtype, copy=False))
                view_labels.append(batch_labels.numpy())
                if progress_bar is not None:
                    progress_bar.update(1)
        view_labels = np.concatenate(view_labels)
        if labels is None:
            labels = view_labels
        elif not np.array_equal(labels, view_labels):
            raise ValueError("the dataset returned different labels for the same rows across views")
        views.append(np.concatenate(chunks))
    features = views[0] if num_views == 1 else np.stack(views, axis=1)
    return np.ascontiguousarray(features), labels.astype(np.int64)


def _consolidate(cache_dir: Path, num_shards: int, num_samples: int, dtype: np.dtype) -> tuple[int, ...]:
    first = np.load(_shard_path(cache_dir, 0), allow_pickle=False)
    sample_shape = first["features"].shape[1:]
    tmp = cache_dir / (_FEATURES + ".tmp")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(num_samples, *sample_shape))
    labels = np.empty(num_samples, dtype=np.int64)
    start = 0
    for shard in range(num_shards):
        with np.load(_shard_path(cache_dir, shard), allow_pickle=False) as data:
            feats = data["features"]
            if feats.shape[1:] != sample_shape or feats.dtype != dtype:
                raise ValueError(f"shard {shard} has shape {feats.shape} / {feats.dtype}, expected {sample_shape}")
            out[start : start + len(feats)] = feats
            labels[start : start + len(feats)] = data["labels"]
            start += len(feats)
    if start != num_samples:
        raise ValueError(f"shards hold {start} samples, expected {num_samples}")
    out.flush()
    del out
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, cache_dir / _FEATURES)
    _atomic_write(cache_dir / _LABELS, lambda h: np.save(h, labels, allow_pickle=False))
    return sample_shape


def load_or_extract(
    encode: Callable[[Any], torch.Tensor],
    dataset,
    cache_dir: str | os.PathLike,
    manifest: Mapping[str, Any],
    *,
    batch_size: int = 64,
    dtype: torch.dtype | str = torch.float32,
    num_views: int = 1,
    shard_size: int = 4096,
    seed: int = 0,
    image_key: str = "pixel_values",
    label_key: str = "labels",
    collate_fn: Callable | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> FeatureCache:
    """Return the cache of ``encode`` over ``dataset``, extracting (or finishing) it if needed.

    Args:
        encode: batch of inputs -> ``(batch, *S)`` features; runs under ``torch.inference_mode``. Moving inputs
            to a device and setting ``model.eval()`` are the caller's business.
        dataset: map-style dataset yielding ``{image_key: ..., label_key: ...}`` dicts (e.g. a
            ``datasets.Dataset`` after :func:`pih2t_hub.data.transforms.apply_transform`) or ``(x, y)`` tuples.
        cache_dir: directory of the cache (created); only the cache's own files in it are ever deleted.
        manifest: JSON-serialisable description with at least ``backbone``, ``weights`` and ``transform``
            (e.g. ``repr`` of the transform). ``dataset`` may be given to identify data that is not a
            ``datasets.Dataset`` (otherwise ``dataset._fingerprint`` is used).
        dtype: storage dtype, float32 or float16.
        num_views: ``V > 1`` stores ``V`` passes over the data (augmented views when the transform is random).
        shard_size: samples per resumable shard (part of the manifest: changing it rebuilds).
        seed: seeds the random augmentations of each (shard, view).

    Reuse rules: a complete cache with an equal manifest is opened without calling ``encode``; an incomplete
    one with an equal manifest is resumed; any difference rebuilds from scratch (logged as a warning).
    """
    if not callable(encode):
        raise TypeError("encode must be callable")
    for name, value in (("batch_size", batch_size), ("num_views", num_views), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(manifest, Mapping):
        raise TypeError(f"manifest must be a dict, got {type(manifest).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"manifest lacks {missing}; it must name the backbone, its weights and the transform")
    num_samples = len(dataset)
    if num_samples < 1:
        raise ValueError("the dataset is empty")
    dtype_name = _dtype_name(dtype)
    request = _normalise(
        {
            **manifest,
            "dataset": _fingerprint(dataset, manifest),
            "num_samples": num_samples,
            "dtype": dtype_name,
            "num_views": num_views,
            "shard_size": shard_size,
            "seed": seed,
            "format_version": FORMAT_VERSION,
        }
    )

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stored = _read_manifest(cache_dir)
    if stored is not None and stored["request"] == request:
        if stored.get("complete"):
            for leftover in cache_dir.glob("shard-*.npz"):  # killed after the final manifest was written
                leftover.unlink()
            return FeatureCache.open(cache_dir)
        for tmp in cache_dir.glob("*.tmp"):
            tmp.unlink()
    else:
        if stored is not None:
            old = stored["request"]
            changed = sorted(k for k in set(old) | set(request) if old.get(k) != request.get(k))
            logger.warning("feature cache %s is stale (changed: %s); rebuilding", cache_dir, changed)
        for path in _own_files(cache_dir):
            path.unlink()
        pending = json.dumps({"request": request, "complete": False}, indent=2)
        _atomic_write(cache_dir / _MANIFEST, lambda h: h.write(pending), "w")

    np_dtype = np.dtype(_DTYPES[dtype_name])
    num_shards = math.ceil(num_samples / shard_size)
    todo = [s for s in range(num_shards) if not _shard_path(cache_dir, s).exists()]
    batches = sum(
        math.ceil((min(num_samples, (s + 1) * shard_size) - s * shard_size) / batch_size) for s in todo
    ) * num_views
    progress_bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        progress_bar = tqdm(total=batches, desc=f"features -> {cache_dir.name}", unit="batch")
    try:
        for shard in todo:
            rows = range(shard * shard_size, min(num_samples, (shard + 1) * shard_size))
            features, labels = _extract_shard(
                encode, dataset, rows, batch_size=batch_size, num_views=num_views, dtype=np_dtype, seed=seed,
                shard=shard, image_key=image_key, label_key=label_key, collate_fn=collate_fn,
                num_workers=num_workers, progress_bar=progress_bar,
            )
            _atomic_write(
                _shard_path(cache_dir, shard),
                lambda h, f=features, y=labels: np.savez(h, features=f, labels=y),
            )
    finally:
        if progress_bar is not None:
            progress_bar.close()

    sample_shape = _consolidate(cache_dir, num_shards, num_samples, np_dtype)
    per_view = sample_shape[1:] if num_views > 1 else sample_shape
    final = {"request": request, "complete": True, "feature_shape": list(per_view)}
    _atomic_write(cache_dir / _MANIFEST, lambda h: h.write(json.dumps(final, indent=2)), "w")
    for shard in range(num_shards):
        _shard_path(cache_dir, shard).unlink()
    return FeatureCache.open(cache_dir)


#: The issue's name for :func:`load_or_extract` (it always reuses a valid cache and resumes a partial one).
extract_features = load_or_extract


# ---------------------------------------------------------------------------------------------- bounded reads


class CacheRowReader(torch.utils.data.Dataset):
    """A completed cache as a map-style dataset whose rows are read with ``os.pread``, not through a memory map.

    Why: a memory map is cheap to open but every page an epoch touches stays mapped and counts in the process's
    resident set (as file-backed RSS). A random-access stage-2 epoch touches every page, so training over a
    1,000,000 x 1,280 fp16 cache shows ~2.5 GB of RSS although nothing was copied, and a container memory limit
    or an RSS-based scheduler sees exactly that. Here each batch's rows are copied into a private buffer (sorted by
    file offset, one ``pread`` per row); the file's pages live only in the kernel's page cache, which is shared,
    reclaimable and in no process's RSS. Resident memory is then the batch, not the file.

    Items match :meth:`FeatureCache.as_tensor_dataset`: ``(features_row, label)`` tensors, with the same ``view``
    semantics for multi-view caches, so it drops into :class:`~pih2t_hub.data.samplers.DualBranchDataset` and the
    cached stage-2 step unchanged. ``__getitems__`` reads a whole batch at once (the DataLoader calls it).
    Labels (8 bytes a row) are held in memory. Safe with forked DataLoader workers: the file descriptor is
    reopened in each process.
    """

    def __init__(self, cache_dir: str | os.PathLike, view: int | None = None) -> None:
        cache = FeatureCache.open(cache_dir)  # validates completeness and shapes; the maps are dropped below
        self.cache_dir = Path(cache_dir)
        self.num_views = cache.num_views
        self.feature_shape = cache.feature_shape
        num_samples = len(cache)
        del cache
        path = self.cache_dir / _FEATURES
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(handle)
            self._data_offset = handle.tell()
        if fortran_order:
            raise ValueError(f"{path} is Fortran-ordered; rows are not contiguous (rebuild the cache)")
        self.dtype = np.dtype(dtype)
        labels = np.load(self.cache_dir / _LABELS, allow_pickle=False)  # small: read into memory
        self._row_shape = tuple(shape[2:]) if self.num_views > 1 else tuple(shape[1:])
        self._row_bytes = int(np.prod(self._row_shape, dtype=np.int64)) * self.dtype.itemsize
        if self.num_views == 1:
            if view not in (None, 0):
                raise ValueError(f"the cache has one view; got view={view}")
            self._stride, self._first = 1, 0
            self._labels = labels
        elif view is None:  # views flattened: sample n's views are rows n*V ... n*V+V-1, as in the file
            self._stride, self._first = 1, 0
            self._labels = np.repeat(labels, self.num_views)
        else:
            if not 0 <= view < self.num_views:
                raise ValueError(f"view must be in [0, {self.num_views}), got {view}")
            self._stride, self._first = self.num_views, int(view)
            self._labels = labels
        if len(labels) != num_samples:
            raise ValueError(f"feature cache {self.cache_dir} is inconsistent; delete it")
        self._fd: int | None = None
        self._pid: int | None = None

    # the descriptor is per process: reopened after a fork and never pickled
    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.cache_dir / _FEATURES, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def close(self) -> None:
        """Close the file descriptor (reopened on the next read)."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fd"] = state["_pid"] = None
        return state

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def labels(self) -> torch.Tensor:
        """All labels (int64), in row order: what a sampler needs."""
        return torch.from_numpy(self._labels)

    def _check(self, indices) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
            raise TypeError(f"row indices must be a 1-D sequence of integers, got {idx.dtype} of shape {idx.shape}")
        idx = idx.astype(np.int64)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"row index out of range for a cache of {n} rows")
        return np.where(idx < 0, idx + n, idx)

    def read(self, indices) -> np.ndarray:
        """Rows ``indices`` (any order, repeats allowed) as one ``(len(indices), *S)`` array in storage dtype."""
        idx = self._check(indices)
        fd = self._file()
        order = np.argsort(idx, kind="stable")  # ascending offsets: sequential-ish reads, kinder to readahead
        rows = idx[order] * self._stride + self._first
        size, base = self._row_bytes, self._data_offset
        chunks = []
        for row in rows.tolist():
            chunk = os.pread(fd, size, base + row * size)
            if len(chunk) != size:
                raise OSError(f"short read from {self.cache_dir / _FEATURES} at row {row}: truncated cache?")
            chunks.append(chunk)
        out = np.empty((len(idx), *self._row_shape), dtype=self.dtype)
        out[order] = np.frombuffer(b"".join(chunks), dtype=self.dtype).reshape(len(idx), *self._row_shape)
        return out

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
        idx = self._check(indices)
        features = torch.from_numpy(self.read(idx))
        labels = torch.from_numpy(self._labels[idx])
        return [(features[k], labels[k]) for k in range(len(idx))]

