"""Feature cache for frozen backbones: extract once (on every process), resume after a kill, verify before reuse.

Stage 2 with a frozen backbone in eval mode only needs the backbone's (pooled) features, so they are computed once
and read from disk afterwards. The cache directory holds:

* ``manifest.json``: the *request* (what the features were computed from: the caller's backbone, weights,
  transform, plus the dataset fingerprint, dtype, views, shard size, seed, autocast and memory format) and, once
  complete, the feature shape, each file's size and SHA-256 checksums (one for the ``.npy`` header and one per
  shard of rows of ``features.npy``; one for ``labels.npy``) and a cheap summary of the values (mean, std, zeros,
  non-finite). A request that differs from the stored one *rebuilds* the cache; it is never silently reused.
* while extracting, ``shard-NNNNN.npz``: ``shard_size`` consecutive samples each, written atomically (temp file +
  ``os.replace``, :func:`pih2t_hub._atomic.atomic_write`). A re-run with the same request skips the shards that
  exist, so a killed extraction resumes.
* when done, ``features.npy`` and ``labels.npy``, opened memory-mapped with ``allow_pickle=False``. Shards are
  deleted after this consolidation.

Several processes (``torch.distributed`` initialised, e.g. by ``accelerate launch``): each rank extracts a
disjoint, contiguous run of the missing shards on its own device, rank 0 consolidates, and every rank then opens
the whole cache. The bytes of every file do not depend on the number of processes, the batch size or the number
of DataLoader workers, because each sample's random augmentation is seeded from ``(seed, view, row)`` alone. The
cache directory must be visible to every rank (one machine, or a shared file system).

Reuse is verified: sizes always (a truncated file is reported by name, not as an mmap error), and with
``verify=True`` (the default of :func:`load_or_extract`) every checksum, hashed in parallel threads. A damaged
cache is reported in one warning line naming the file and rows, and extracted again.

Shapes: ``features`` is ``(N, *S)`` with ``S`` the per-sample shape ``encode`` returns (``(D,)`` for pooled
features, ``(C, H, W)`` for un-pooled maps), or ``(N, V, *S)`` with ``V = num_views > 1`` augmented views. Storage
dtypes are float32 and float16 (NumPy has no bfloat16; bf16 *autocast* is supported for the forward pass).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .._atomic import atomic_write, atomic_write_text
from ._cache_files import CacheIntegrityError, FeatureWriter, check_sizes, verify_files, write_array

__all__ = [
    "CacheIntegrityError",
    "CacheRowReader",
    "FeatureCache",
    "PREAD_THRESHOLD_BYTES",
    "default_num_workers",
    "extract_features",
    "load_or_extract",
    "open_for_training",
    "write_cache",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: per-sample seeding, checksums and value summary in the manifest
REQUIRED_KEYS = ("backbone", "weights", "transform")
_MANIFEST = "manifest.json"
_FEATURES = "features.npy"
_LABELS = "labels.npy"
_DTYPES = {"float32": np.float32, "float16": np.float16}
_AUTOCAST = {None: None, "none": None, "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16"}
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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


def _autocast_name(autocast) -> str | None:
    key = autocast.lower() if isinstance(autocast, str) else autocast
    key = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(key, key)
    try:
        return _AUTOCAST[key]
    except (KeyError, TypeError):
        raise ValueError(f"autocast must be None, 'bf16' or 'fp16', got {autocast!r}") from None


def _write_manifest(cache_dir: Path, manifest: dict) -> None:
    atomic_write_text(cache_dir / _MANIFEST, json.dumps(manifest, indent=2))


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
def _preserved_global_rng() -> Iterator[None]:
    """Restore torch's CPU RNG, NumPy's and Python's ``random`` on exit (samples re-seed them while fetching)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


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


def default_num_workers() -> int:
    """DataLoader workers for decoding/transforms: the cores of this process's share, one kept for the forward.

    The share is the CPU affinity divided by ``LOCAL_WORLD_SIZE`` (set by ``torchrun`` / ``accelerate launch``);
    at most 8 (more rarely helps one device and each worker holds a copy of the dataset's state).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(0, min(8, cores // local - 1))


# ---------------------------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class _Group:
    """This process's rank among the extracting processes, and how to wait for all of them."""

    rank: int
    world_size: int

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def _process_group(rank: int | None, world_size: int | None) -> _Group:
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialised else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    if world_size > 1 and not initialised:
        raise ValueError(f"world_size={world_size} needs an initialised torch.distributed process group")
    return _Group(rank, world_size)


def _my_part(todo: list[int], group: _Group) -> list[int]:
    """A contiguous, disjoint run of the pending shards for this rank (sizes differ by at most one shard)."""
    lo = group.rank * len(todo) // group.world_size
    hi = (group.rank + 1) * len(todo) // group.world_size
    return todo[lo:hi]


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
    def open(cls, cache_dir: str | os.PathLike, manifest: Mapping | None = None, verify: bool = False) -> FeatureCache:
        """Open a completed cache; with ``manifest``, every given key must match the stored request.

        File sizes are always checked against the manifest (cheap); ``verify=True`` also re-hashes every byte
        (about a second per GB here, in parallel threads). Damage raises :class:`CacheIntegrityError` naming the
        file (and the rows, for ``features.npy``).
        """
        cache_dir = Path(cache_dir)
        stored = _read_manifest(cache_dir)
        if stored is None or not stored.get("complete"):
            raise FileNotFoundError(f"no complete feature cache in {cache_dir}; run load_or_extract")
        if manifest is not None:
            wanted = _normalise(manifest)
            diff = {k: (stored["request"].get(k), v) for k, v in wanted.items() if stored["request"].get(k) != v}
            if diff:
                raise ValueError(f"feature cache {cache_dir} was built for a different request: {diff}")
        files = stored.get("files")
        if not isinstance(files, dict) or set(files) != {_FEATURES, _LABELS}:
            raise CacheIntegrityError(f"{cache_dir / _MANIFEST} records no checksums (an older format); re-extract")
        (verify_files if verify else check_sizes)(cache_dir, files)
        try:
            features = np.load(cache_dir / _FEATURES, mmap_mode="c", allow_pickle=False)
            labels = np.load(cache_dir / _LABELS, mmap_mode="c", allow_pickle=False)
        except (ValueError, OSError) as err:
            raise CacheIntegrityError(f"feature cache {cache_dir} is unreadable: {err}") from None
        if len(features) != stored["request"]["num_samples"] or len(labels) != len(features):
            raise CacheIntegrityError(f"feature cache {cache_dir} is inconsistent with its manifest; re-extract")
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
    def nbytes(self) -> int:
        """Size of ``features.npy`` on disk."""
        return int(self.manifest["files"][_FEATURES]["bytes"])

    @property
    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels)

    def as_tensor_dataset(self, view: int | None = None) -> TensorDataset:
        """A ``TensorDataset(features, labels)`` over the memory map (no copy).

        With several views, ``view=k`` selects one; ``view=None`` flattens views into ``N * V`` samples
        (sample ``n``'s views at rows ``n*V ... n*V + V - 1``) with repeated labels.
        """
        return TensorDataset(*_view_tensors(torch.from_numpy(self.features), torch.from_numpy(self.labels),
                                            self.num_views, view))


def _view_tensors(features: torch.Tensor, labels: torch.Tensor, num_views: int,
                  view: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if num_views == 1:
        if view not in (None, 0):
            raise ValueError(f"the cache has one view; got view={view}")
        return features, labels
    if view is not None:
        if not 0 <= view < num_views:
            raise ValueError(f"view must be in [0, {num_views}), got {view}")
        return features[:, view], labels
    flat = features.reshape(len(features) * num_views, *features.shape[2:])
    return flat, labels.repeat_interleave(num_views)


def write_cache(
    cache_dir: str | os.PathLike,
    request: Mapping[str, Any],
    parts: Iterable[tuple[np.ndarray, np.ndarray]],
    sample_shape: tuple[int, ...],
    extracted_on: str | None = None,
) -> dict:
    """Seal ``(features, labels)`` chunks, in row order, as a complete cache; returns the final manifest.

    ``request`` is the full stored request (``num_samples``, ``dtype``, ``num_views`` and ``shard_size`` are read
    from it; ``shard_size`` is also the checksum block). Used by the consolidation step, and by anything that
    produces features some other way (e.g. a synthetic benchmark cache) and wants the same format and checks.
    """
    cache_dir = Path(cache_dir)
    request = _normalise(request)
    num_samples, dtype = int(request["num_samples"]), np.dtype(_DTYPES[request["dtype"]])
    writer = FeatureWriter(cache_dir / _FEATURES, (num_samples, *sample_shape), dtype, int(request["shard_size"]))
    labels = np.empty(num_samples, dtype=np.int64)
    try:
        for features, part_labels in parts:
            labels[writer.rows_written : writer.rows_written + len(features)] = part_labels
            writer.write(features)
        features_record, summary = writer.close()
    except BaseException:
        writer.abort()
        raise
    if summary["nonfinite"]:
        logger.warning("feature cache %s: %d of %d stored values are NaN or infinite", cache_dir,
                       summary["nonfinite"], summary["values"])
    labels_record = write_array(cache_dir / _LABELS, labels)
    num_views = int(request["num_views"])
    final = {"request": request, "complete": True,
             "feature_shape": list(sample_shape[1:] if num_views > 1 else sample_shape),
             "files": {_FEATURES: features_record, _LABELS: labels_record}, "stats": summary,
             "extracted_on": extracted_on}
    _write_manifest(cache_dir, final)
    return final


# ---------------------------------------------------------------------------------------------- extraction


class _SeededRows(Dataset):
    """Item ``(view, row)`` is ``dataset[row]`` fetched with the global RNGs seeded from ``(seed, view, row)``.

    Why: random augmentations (timm, torchvision) draw from the global ``random`` / NumPy / torch states. Seeding
    per sample makes every view a function of the sample alone: the same bytes with 1 or N processes, any batch
    size, any number of workers, and after a resume. (The caller restores the main process's states.)
    """

    def __init__(self, dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        view, row = key
        seed = _mix(self.seed, view, row)
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)  # CPU only: accelerator RNGs are left alone
        return self.dataset[row]


@dataclass(frozen=True)
class _Job:
    """Everything the extraction of one split needs, validated once."""

    encode: Callable[[Any], torch.Tensor]
    dataset: Any
    num_samples: int
    batch_size: int
    shard_size: int
    num_views: int
    dtype: np.dtype
    seed: int
    image_key: str
    label_key: str
    collate_fn: Callable | None
    num_workers: int
    device: torch.device | None
    channels_last: bool
    autocast: str | None

    def rows(self, shard: int) -> range:
        return range(shard * self.shard_size, min(self.num_samples, (shard + 1) * self.shard_size))

    def batches(self, shards: list[int]) -> list[tuple[int, int, list[int]]]:
        """``(shard, view, rows)`` of every batch, shard by shard: batches never straddle two shards."""
        plan = []
        for shard in shards:
            rows = list(self.rows(shard))
            for view in range(self.num_views):
                plan += [(shard, view, rows[k : k + self.batch_size]) for k in range(0, len(rows), self.batch_size)]
        return plan

    def forward(self, inputs) -> np.ndarray:
        if isinstance(inputs, torch.Tensor) and self.device is not None:
            fmt = torch.channels_last if self.channels_last and inputs.ndim == 4 else torch.preserve_format
            inputs = inputs.to(self.device, memory_format=fmt, non_blocking=True)
        elif isinstance(inputs, torch.Tensor) and self.channels_last and inputs.ndim == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        if self.autocast is None:
            out = self.encode(inputs)
        else:
            with torch.autocast(self.device.type, dtype=_AUTOCAST_DTYPES[self.autocast]):
                out = self.encode(inputs)
        if not isinstance(out, torch.Tensor) or out.ndim < 1:
            raise ValueError(f"encode must return a (batch, ...) tensor; got {type(out).__name__}")
        return out.detach().to("cpu", torch.float32).numpy().astype(self.dtype, copy=False)


def _extract_shards(job: _Job, cache_dir: Path, shards: list[int], progress_bar=None) -> None:
    """Extract ``shards`` through one DataLoader (workers started once) and seal each as soon as it is complete."""
    if not shards:
        return
    plan = job.batches(shards)
    pin = job.device is not None and job.device.type == "cuda"
    batches = [[(view, row) for row in rows] for _, view, rows in plan]
    loader = DataLoader(_SeededRows(job.dataset, job.seed), batch_sampler=batches,
                        num_workers=job.num_workers, collate_fn=job.collate_fn, pin_memory=pin)
    features: list[list[np.ndarray]] = [[] for _ in range(job.num_views)]
    labels: list[list[np.ndarray]] = [[] for _ in range(job.num_views)]
    with _preserved_global_rng(), torch.inference_mode():
        for k, ((shard, view, rows), batch) in enumerate(zip(plan, loader)):
            inputs, batch_labels = _split_batch(batch, job.image_key, job.label_key)
            out = job.forward(inputs)
            if out.shape[0] != len(rows) or len(batch_labels) != len(rows):
                raise ValueError(f"encode must return a (batch, ...) tensor; got {tuple(out.shape)} for {len(rows)} "
                                 "samples")
            features[view].append(out)
            labels[view].append(batch_labels.numpy())
            if progress_bar is not None:
                progress_bar.update(1)
            if k + 1 == len(plan) or plan[k + 1][0] != shard:
                _seal_shard(cache_dir, shard, features, labels)
                features = [[] for _ in range(job.num_views)]
                labels = [[] for _ in range(job.num_views)]


def _seal_shard(cache_dir: Path, shard: int, features: list[list[np.ndarray]], labels: list[list[np.ndarray]]) -> None:
    views = [np.concatenate(chunks) for chunks in features]
    view_labels = [np.concatenate(chunks) for chunks in labels]
    if any(not np.array_equal(view_labels[0], other) for other in view_labels[1:]):
        raise ValueError("the dataset returned different labels for the same rows across views")
    stacked = views[0] if len(views) == 1 else np.stack(views, axis=1)
    data, y = np.ascontiguousarray(stacked), view_labels[0].astype(np.int64)
    atomic_write(_shard_path(cache_dir, shard), lambda h: np.savez(h, features=data, labels=y))


def _read_shard(job: _Job, cache_dir: Path, shard: int) -> tuple[np.ndarray, np.ndarray]:
    """A sealed shard's arrays; an unreadable one (bad zip CRC, truncated) is reported and extracted again."""
    path = _shard_path(cache_dir, shard)
    for attempt in range(2):
        try:
            with np.load(path, allow_pickle=False) as data:
                features, labels = data["features"], data["labels"]
            if len(features) != len(job.rows(shard)) or len(labels) != len(features):
                raise ValueError(f"{len(features)} rows, expected {len(job.rows(shard))}")
            return features, labels
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as err:
            if attempt:
                raise
            logger.warning("feature cache shard %s is unreadable (%s); extracting it again", path, err)
            path.unlink(missing_ok=True)
            _extract_shards(job, cache_dir, [shard])
    raise AssertionError("unreachable")


def _consolidate(job: _Job, cache_dir: Path, request: dict, extracted_on: str | None) -> None:
    num_shards = math.ceil(job.num_samples / job.shard_size)
    first = _read_shard(job, cache_dir, 0)
    sample_shape = first[0].shape[1:]

    def parts() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        yield first
        for shard in range(1, num_shards):
            features, labels = _read_shard(job, cache_dir, shard)
            if features.shape[1:] != sample_shape or features.dtype != job.dtype:
                raise ValueError(f"shard {shard} holds {features.shape[1:]} {features.dtype}, expected "
                                 f"{sample_shape} {job.dtype}")
            yield features, labels

    write_cache(cache_dir, request, parts(), sample_shape, extracted_on)
    for shard in range(num_shards):
        _shard_path(cache_dir, shard).unlink(missing_ok=True)


def _reuse_or_reset(cache_dir: Path, request: dict, verify: bool) -> FeatureCache | None:
    """Rank 0 only: the verified complete cache if it matches, else a pending manifest (resume or rebuild)."""
    stored = _read_manifest(cache_dir)
    if stored is not None and stored["request"] == request:
        if not stored.get("complete"):
            for tmp in cache_dir.glob("*.tmp"):
                tmp.unlink()
            return None
        for leftover in cache_dir.glob("shard-*.npz"):  # killed after the final manifest was written
            leftover.unlink()
        try:
            return FeatureCache.open(cache_dir, verify=verify)
        except CacheIntegrityError as err:
            logger.warning("%s; extracting %s again", err, cache_dir)
    elif stored is not None:
        old = stored["request"]
        changed = sorted(k for k in set(old) | set(request) if old.get(k) != request.get(k))
        logger.warning("feature cache %s is stale (changed: %s); rebuilding", cache_dir, changed)
    for path in _own_files(cache_dir):
        path.unlink()
    _write_manifest(cache_dir, {"request": request, "complete": False})
    return None


def _check_options(batch_size, num_views, shard_size, seed, num_workers, manifest) -> None:
    for name, value in (("batch_size", batch_size), ("num_views", num_views), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                    or num_workers < 0):
        raise ValueError(f"num_workers must be None (automatic) or a non-negative integer, got {num_workers!r}")
    if not isinstance(manifest, Mapping):
        raise TypeError(f"manifest must be a dict, got {type(manifest).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"manifest lacks {missing}; it must name the backbone, its weights and the transform")


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
    num_workers: int | None = None,
    device: torch.device | str | None = None,
    channels_last: bool = False,
    autocast: str | None = None,
    verify: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
) -> FeatureCache:
    """Return the cache of ``encode`` over ``dataset``, extracting (or finishing) it if needed, on every process.

    Args:
        encode: batch of inputs -> ``(batch, *S)`` features; runs under ``torch.inference_mode``. ``model.eval()``
            is the caller's business; so is moving inputs to a device when ``device`` is None.
        dataset: map-style dataset yielding ``{image_key: ..., label_key: ...}`` dicts (e.g. a
            ``datasets.Dataset`` after :func:`pih2t_hub.data.transforms.apply_transform`) or ``(x, y)`` tuples.
        cache_dir: directory of the cache (created); only the cache's own files in it are ever deleted.
        manifest: JSON-serialisable description with at least ``backbone``, ``weights`` and ``transform``
            (e.g. ``repr`` of the transform). ``dataset`` may be given to identify data that is not a
            ``datasets.Dataset`` (otherwise ``dataset._fingerprint`` is used).
        dtype: storage dtype, float32 or float16.
        num_views: ``V > 1`` stores ``V`` passes over the data (augmented views when the transform is random).
        shard_size: samples per resumable shard and per checksum (part of the request: changing it rebuilds).
        seed: seeds the random augmentation of each (view, sample).
        num_workers: DataLoader workers decoding and transforming; None = :func:`default_num_workers`, 0 = in
            this process.
        device: where the batches go before ``encode`` (pinned memory and non-blocking copies on CUDA).
        channels_last, autocast: memory format (4-D inputs) and ``"bf16"`` / ``"fp16"`` autocast of the forward;
            both are part of the request, since they change the stored bytes. Autocast needs ``device``.
        verify: re-hash a complete cache before reusing it (a damaged one is reported and extracted again).
        rank, world_size: this process among the extracting ones; default from ``torch.distributed`` if
            initialised, else a single process. Every rank must call this with the same arguments.

    Reuse rules: a complete cache with an equal request is opened without calling ``encode``; an incomplete one is
    resumed (only missing shards are extracted, by whichever ranks run now); any difference rebuilds from scratch
    (logged as a warning).
    """
    autocast_name, device = _check_arguments(encode, batch_size, num_views, shard_size, seed, num_workers, manifest,
                                             autocast, device)
    group = _process_group(rank, world_size)
    num_samples = len(dataset)
    if num_samples < 1:
        raise ValueError("the dataset is empty")
    dtype_name = _dtype_name(dtype)
    request = _normalise({
        **manifest, "dataset": _fingerprint(dataset, manifest), "num_samples": num_samples, "dtype": dtype_name,
        "num_views": num_views, "shard_size": shard_size, "seed": seed, "format_version": FORMAT_VERSION,
        "autocast": autocast_name, "channels_last": bool(channels_last),
    })
    job = _Job(encode=encode, dataset=dataset, num_samples=num_samples, batch_size=batch_size, shard_size=shard_size,
               num_views=num_views, dtype=np.dtype(_DTYPES[dtype_name]), seed=seed, image_key=image_key,
               label_key=label_key, collate_fn=collate_fn,
               num_workers=default_num_workers() if num_workers is None else num_workers, device=device,
               channels_last=bool(channels_last), autocast=autocast_name)
    return _reuse_or_extract(job, Path(cache_dir), request, group, verify, progress)


def _check_arguments(
    encode: Callable[[Any], torch.Tensor],
    batch_size: int,
    num_views: int,
    shard_size: int,
    seed: int,
    num_workers: int | None,
    manifest: Mapping[str, Any],
    autocast: str | None,
    device: torch.device | str | None,
) -> tuple[str | None, torch.device | None]:
    """Refuse bad arguments before any process touches the cache; returns the autocast name and the device."""
    if not callable(encode):
        raise TypeError("encode must be callable")
    _check_options(batch_size, num_views, shard_size, seed, num_workers, manifest)
    autocast_name = _autocast_name(autocast)
    device = torch.device(device) if device is not None else None
    if autocast_name is not None and device is None:
        raise ValueError("autocast needs device= (the device encode runs on)")
    return autocast_name, device


def _reuse_or_extract(job: _Job, cache_dir: Path, request: dict, group: _Group, verify: bool,
                      progress: bool) -> FeatureCache:
    """On every rank: open the complete cache for ``request``, or extract the missing shards (split between the
    ranks) and let rank 0 consolidate them. The barriers keep the ranks in step on the shared directory."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    reused = _reuse_or_reset(cache_dir, request, verify) if group.rank == 0 else None
    group.barrier()
    stored = _read_manifest(cache_dir)
    if stored is None or stored["request"] != request:
        raise RuntimeError(f"rank {group.rank}: the manifest in {cache_dir} is not this request; every rank must "
                           "call load_or_extract with the same arguments (and see the same directory)")
    if stored.get("complete"):
        return reused if reused is not None else FeatureCache.open(cache_dir)
    todo = [s for s in range(math.ceil(job.num_samples / job.shard_size)) if not _shard_path(cache_dir, s).exists()]
    group.barrier()  # everyone has listed the pending shards before anyone seals a new one
    mine = _my_part(todo, group)
    _run_with_progress(job, cache_dir, mine, progress)
    group.barrier()
    if group.rank == 0:
        _consolidate(job, cache_dir, request, None if job.device is None else job.device.type)
    group.barrier()
    return FeatureCache.open(cache_dir)


def _run_with_progress(job: _Job, cache_dir: Path, shards: list[int], progress: bool) -> None:
    progress_bar = None
    if progress and shards:
        from .._progress import progress_bar as tqdm  # live on a terminal, one line in a log

        progress_bar = tqdm(total=len(job.batches(shards)), desc=f"features -> {cache_dir.name}", unit="batch")
    try:
        _extract_shards(job, cache_dir, shards, progress_bar)
    finally:
        if progress_bar is not None:
            progress_bar.close()


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

    def __init__(self, cache_dir: str | os.PathLike, view: int | None = None, verify: bool = False) -> None:
        cache = FeatureCache.open(cache_dir, verify=verify)  # completeness, sizes, shapes; the maps are dropped below
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
        self._view = view
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

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, labels)`` like ``TensorDataset.tensors``, for code that needs whole columns once (class
        prototypes, tau-norm on validation features).

        The features are a *fresh memory map* of the file: whatever it touches stays resident while the caller
        holds the tensor, so drop it after use (the point of this class is that the training loop never maps).
        """
        features = torch.from_numpy(np.load(self.cache_dir / _FEATURES, mmap_mode="c", allow_pickle=False))
        labels = torch.from_numpy(np.load(self.cache_dir / _LABELS, allow_pickle=False))
        return _view_tensors(features, labels, self.num_views, self._view)

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



#: Caches larger than this are read with :class:`CacheRowReader` by :func:`open_for_training`: a random-access epoch
#: over a memory map keeps every touched page resident, i.e. up to the whole file in RSS.
PREAD_THRESHOLD_BYTES = 256 * 2**20


def open_for_training(
    cache: FeatureCache | str | os.PathLike, threshold_bytes: int | None = None, view: int | None = None
) -> Dataset:
    """The dataset stage 2 should train on: the memory-mapped ``TensorDataset`` for small caches (fastest), the
    ``pread`` :class:`CacheRowReader` above ``threshold_bytes`` (default :data:`PREAD_THRESHOLD_BYTES`), so the
    resident memory of an epoch is the batch, not the file. Both yield ``(features_row, label)`` and expose
    ``.tensors``; ``threshold_bytes=0`` always reads with ``pread``.
    """
    if not isinstance(cache, FeatureCache):
        cache = FeatureCache.open(cache)
    threshold = PREAD_THRESHOLD_BYTES if threshold_bytes is None else int(threshold_bytes)
    if threshold < 0:
        raise ValueError(f"threshold_bytes must be >= 0, got {threshold_bytes!r}")
    if cache.nbytes > threshold:
        return CacheRowReader(cache.cache_dir, view=view)
    return cache.as_tensor_dataset(view=view)
