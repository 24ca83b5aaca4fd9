"""On-disk integrity of a feature cache: ``features.npy`` written with a SHA-256 per block of rows, verified on open.

Why: a cache is reused across runs for days; a zeroed, truncated or bit-flipped ``features.npy`` (a full disk, a
killed copy, a bad sector) would otherwise train a head on garbage without a word, or fail deep inside NumPy with
"mmap length is greater than file size". The writer hashes the bytes as it writes them (no second pass), one
SHA-256 for the ``.npy`` header and one per block of ``block_rows`` rows (the extraction shards), and also keeps
a cheap summary of the values (mean, std, zeros, non-finite). Verification re-hashes the blocks in parallel threads
(``hashlib`` and ``os.pread`` release the GIL) and names the first bad file and row range in one line.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import atomic_write_bytes

_CHUNK = 8 << 20  # bytes hashed per read while verifying


class CacheIntegrityError(ValueError):
    """A cache file does not match the size or checksum its manifest recorded."""


class FeatureWriter:
    """Streams rows into ``<path>.tmp`` as a ``.npy`` file, hashing and summarising them; :meth:`close` seals it.

    Rows may arrive in chunks of any size; the hashes are cut at multiples of ``block_rows`` so that they do not
    depend on how the rows were chunked (1 process or N, resumed or not).
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, block_rows: int) -> None:
        self.path, self.shape, self.dtype = Path(path), tuple(int(s) for s in shape), np.dtype(dtype)
        self.block_rows = int(block_rows)
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(  # the header np.save writes for such an array
            header, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape})
        self.header = header.getvalue()
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.handle = open(self.tmp, "wb")
        self.handle.write(self.header)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.rows_written = 0
        self.blocks: list[str] = []
        self._block = hashlib.sha256()
        self._sum = self._sumsq = 0.0
        self._zeros = self._nonfinite = 0

    def write(self, rows: np.ndarray) -> None:
        """Append ``rows`` (shape ``(n, *shape[1:])``, the writer's dtype)."""
        if rows.shape[1:] != self.shape[1:] or rows.dtype != self.dtype:
            raise ValueError(f"rows of shape {rows.shape} / {rows.dtype} do not fit a {self.shape} {self.dtype} cache")
        if self.rows_written + len(rows) > self.shape[0]:
            raise ValueError(f"more than the {self.shape[0]} rows announced")
        rows = np.ascontiguousarray(rows)
        self._summarise(rows.reshape(-1))
        data = memoryview(rows.reshape(-1).view(np.uint8))
        start = 0
        while start < len(rows):
            room = self.block_rows - self.rows_written % self.block_rows
            take = min(room, len(rows) - start)
            piece = data[start * self.row_bytes : (start + take) * self.row_bytes]
            self._block.update(piece)
            self.handle.write(piece)
            start += take
            self.rows_written += take
            if self.rows_written % self.block_rows == 0 or self.rows_written == self.shape[0]:
                self.blocks.append(self._block.hexdigest())
                self._block = hashlib.sha256()

    def _summarise(self, flat: np.ndarray) -> None:
        """Accumulate zeros, sum and sum of squares (float32 products, float64 totals; non-finite values counted and
        left out), in pieces of 2^20 values so that the copies stay small and the pass stays cheap."""
        for lo in range(0, flat.size, 1 << 20):
            part = flat[lo : lo + (1 << 20)]
            self._zeros += int(part.size - np.count_nonzero(part))
            values = part.astype(np.float32, copy=False)
            total, squares = float(values.sum(dtype=np.float64)), float(np.dot(values, values))
            if not math.isfinite(total + squares):
                finite = np.isfinite(values)
                self._nonfinite += int(values.size - np.count_nonzero(finite))
                values = values[finite].astype(np.float64)
                total, squares = float(values.sum()), float(np.dot(values, values))
            self._sum += total
            self._sumsq += squares

    def close(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Fsync and rename into place; returns ``(file record, value summary)`` for the manifest."""
        if self.rows_written != self.shape[0]:
            self.handle.close()
            raise ValueError(f"{self.rows_written} rows written, {self.shape[0]} announced")
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.tmp, self.path)
        record = {"bytes": len(self.header) + self.shape[0] * self.row_bytes,
                  "header_sha256": hashlib.sha256(self.header).hexdigest(), "block_rows": self.block_rows,
                  "blocks_sha256": self.blocks}
        count = self.shape[0] * max(1, int(np.prod(self.shape[1:], dtype=np.int64)))
        finite = max(count - self._nonfinite, 1)
        mean = self._sum / finite
        std = math.sqrt(max(self._sumsq / finite - mean * mean, 0.0))
        summary = {"values": count, "mean": mean, "std": std, "zeros": self._zeros, "nonfinite": self._nonfinite}
        return record, summary

    def abort(self) -> None:
        """Close and delete the temp file (an extraction that failed half way)."""
        self.handle.close()
        self.tmp.unlink(missing_ok=True)


def write_array(path: Path, array: np.ndarray) -> dict[str, Any]:
    """``np.save`` a small array atomically; returns its size and SHA-256 for the manifest."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# ---------------------------------------------------------------------------------------------- verification


def check_sizes(cache_dir: Path, files: dict[str, dict[str, Any]]) -> None:
    """Every recorded file exists with its recorded size (cheap: always done on open)."""
    for name, record in files.items():
        path = cache_dir / name
        if not path.exists():
            raise CacheIntegrityError(f"{path} is missing")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise CacheIntegrityError(f"{path} has {size} bytes, its manifest recorded {record['bytes']} (truncated or "
                                      "overwritten)")


def _hash_range(fd: int, offset: int, length: int) -> str:
    h = hashlib.sha256()
    end = offset + length
    while offset < end:
        chunk = os.pread(fd, min(_CHUNK, end - offset), offset)
        if not chunk:
            break
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


def verify_files(cache_dir: Path, files: dict[str, dict[str, Any]], threads: int | None = None) -> None:
    """Sizes, then every SHA-256 the manifest recorded; raises :class:`CacheIntegrityError` naming the damage."""
    check_sizes(cache_dir, files)
    for name, record in files.items():
        path = cache_dir / name
        fd = os.open(path, os.O_RDONLY)
        try:
            if "sha256" in record:
                if _hash_range(fd, 0, record["bytes"]) != record["sha256"]:
                    raise CacheIntegrityError(f"{path} fails its SHA-256 checksum (flipped bits or overwritten)")
                continue
            _verify_blocks(path, fd, record, threads)
        finally:
            os.close(fd)


def _verify_blocks(path: Path, fd: int, record: dict[str, Any], threads: int | None) -> None:
    head = os.pread(fd, 1 << 16, 0)
    parsed = _parse_header(head)
    if parsed is None or hashlib.sha256(head[: parsed[0]]).hexdigest() != record["header_sha256"]:
        raise CacheIntegrityError(f"{path}: its .npy header fails its SHA-256 checksum")
    header_len, row_bytes = parsed
    blocks, rows_per_block = record["blocks_sha256"], record["block_rows"]
    total, block_bytes = record["bytes"] - header_len, rows_per_block * row_bytes
    ranges = [(header_len + k * block_bytes, min(block_bytes, total - k * block_bytes)) for k in range(len(blocks))]
    with ThreadPoolExecutor(max_workers=threads or min(4, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda r: _hash_range(fd, *r), ranges))
    for k, (digest, expected) in enumerate(zip(digests, blocks)):
        if digest != expected:
            first = k * rows_per_block
            last = first + ranges[k][1] // max(row_bytes, 1) - 1
            raise CacheIntegrityError(f"{path}: rows {first}-{last} (block {k} of {len(blocks)}) fail their SHA-256 "
                                      "checksum (zeroed or flipped bits)")


def _parse_header(head: bytes) -> tuple[int, int] | None:
    """``(header length, bytes per row)`` of a ``.npy`` file's first bytes, or None if they are not one."""
    try:
        handle = io.BytesIO(head)
        version = np.lib.format.read_magic(handle)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = reader(handle)
        return handle.tell(), int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    except (ValueError, SyntaxError, EOFError, TypeError):
        return None
