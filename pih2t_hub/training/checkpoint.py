"""Checkpoints that are complete or absent.

``accelerate``'s ``save_state`` writes many files; a kill in the middle leaves a half-written folder. We write the
state into ``checkpoint-<step>.tmp``, add a manifest with the size and SHA-256 of every file, then ``os.replace``
the folder to ``checkpoint-<step>``. A folder without a manifest, or whose files disagree with it, is reported as
corrupt and never loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from .._atomic import atomic_write, swap_folder
from .._atomic import atomic_write_json as write_atomic_json  # the engine's name for it

MANIFEST = "pih2t_checkpoint.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CorruptCheckpointError(RuntimeError):
    """A checkpoint folder is partial or its files do not match their manifest."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def begin_checkpoint(root: Path | str, step: int) -> Path:
    """Create an empty ``checkpoint-<step>.tmp`` folder to save into (main process only)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"checkpoint-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def seal_checkpoint(root: Path | str, step: int, trainer_state: dict[str, Any], keep_last: int = 2) -> Path:
    """Write the trainer state and the manifest into the temp folder, rename it into place, prune old ones.

    Call on the main process after every process has finished writing into the temp folder.
    """
    root = Path(root)
    tmp = root / f"checkpoint-{step}.tmp"
    final = root / f"checkpoint-{step}"
    write_atomic_json(tmp / "trainer_state.json", trainer_state)
    manifest = {"step": step, "files": {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)}
                                        for p in _files(tmp)}}
    write_atomic_json(tmp / MANIFEST, manifest)
    swap_folder(tmp, final)  # replaces a checkpoint of the same step (a resumed run re-saving it)
    prune_checkpoints(root, keep_last)
    return final


def save_checkpoint(
    root: Path | str, step: int, save_fn: Callable[[str], None], trainer_state: dict[str, Any], keep_last: int = 2
) -> Path:
    """Single-process convenience: ``save_fn(tmp_dir)`` then seal (see :func:`seal_checkpoint`)."""
    tmp = begin_checkpoint(root, step)
    save_fn(str(tmp))
    return seal_checkpoint(root, step, trainer_state, keep_last)


def verify_checkpoint(folder: Path | str) -> dict[str, Any]:
    """Return the trainer state of a sealed checkpoint, or raise ``CorruptCheckpointError`` saying what is wrong."""
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not folder.is_dir():
        raise CorruptCheckpointError(f"checkpoint {folder} does not exist")
    if not mpath.is_file():
        raise CorruptCheckpointError(f"checkpoint {folder} is partial: no {MANIFEST} (interrupted while saving?)")
    try:  # a well-formed JSON file that is not a manifest is as corrupt as a truncated one
        manifest = json.loads(mpath.read_text())
        files = {str(rel): (int(meta["size"]), str(meta["sha256"])) for rel, meta in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CorruptCheckpointError(f"checkpoint {folder}: unreadable manifest ({err!r})") from err
    if "trainer_state.json" not in files:
        raise CorruptCheckpointError(f"checkpoint {folder}: the manifest does not list trainer_state.json")
    for rel, (size, sha256) in files.items():
        p = folder / rel
        if not p.is_file():
            raise CorruptCheckpointError(f"checkpoint {folder}: file {rel} is missing")
        if p.stat().st_size != size or _sha256(p) != sha256:
            raise CorruptCheckpointError(f"checkpoint {folder}: file {rel} is corrupt (size or hash mismatch)")
    return json.loads((folder / "trainer_state.json").read_text())


def list_checkpoints(root: Path | str) -> list[Path]:
    """Sealed-or-not checkpoint folders under ``root``, oldest first (temp folders excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_valid_checkpoint(root: Path | str, report: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint that verifies; corrupt ones are reported (never loaded) and skipped."""
    for folder in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(folder)
            return folder
        except CorruptCheckpointError as err:
            report(f"skipping corrupt checkpoint: {err}")
    return None


def prune_checkpoints(root: Path | str, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest checkpoints (``keep_last <= 0`` keeps everything)."""
    if keep_last <= 0:
        return
    for folder in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(folder, ignore_errors=True)


__all__ = [
    "CorruptCheckpointError",
    "save_checkpoint",
    "begin_checkpoint",
    "seal_checkpoint",
    "verify_checkpoint",
    "list_checkpoints",
    "latest_valid_checkpoint",
    "prune_checkpoints",
    "write_atomic_json",
]
