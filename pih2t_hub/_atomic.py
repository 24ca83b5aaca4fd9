"""Files and folders that are replaced whole or not at all.

Files: :func:`atomic_write` writes into a temporary sibling (same directory, so the final rename never crosses a
file system), flushes it to disk, gives it the permissions a plain ``open(path, "w")`` would (``mkstemp`` makes
it 0600, which would lock a published model file away from a web server or another user), and ``os.replace``-s
it over the destination. A reader sees the old bytes or the new ones, never a truncated file; any exception
(``OSError(ENOSPC)`` from the disk, an error in the caller's ``write``) removes the temporary file and leaves the
destination as it was.

Folders: a model folder is several files (config, weights, processor config, code, card, plot). Writing them one
by one into an existing folder mixes two runs when a write fails half-way (a full disk kept the old weights next
to a new ``config.json``, which still loaded and predicted differently). Here everything is written into a fresh
temporary sibling, checked, flushed to disk, and only then put in place of the old folder:

* on Linux the swap is one ``renameat2(RENAME_EXCHANGE)`` call, so the destination path always names a complete
  folder (old or new);
* elsewhere (or on a file system without it) the old folder is renamed aside, the new one renamed in, and the
  old one put back if that second rename fails.

Any exception before the swap leaves the destination exactly as it was and removes the temporary folder.

This is the project's one atomic-write module: config, results, checkpoints' JSON, the model card, feature-cache
manifests, benchmark results (:func:`atomic_write_text` / :func:`atomic_write_json`), model folders
(:func:`atomic_folder`) and the timm export (:func:`publish_folder`) all go through it, and every folder is put in
place by the one swap, :func:`swap_folder`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

__all__ = [
    "atomic_folder",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "dir_mode",
    "file_mode",
    "fix_tree_modes",
    "fsync_tree",
    "publish_folder",
    "swap_folder",
]

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(..., "w")`` would give a new file (0644 under umask 022)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode ``mkdir`` would give a new folder (0755 under umask 022)."""
    return 0o777 & ~_umask()


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[Any]], object], *, text: bool = False) -> Path:
    """Call ``write(handle)`` on a temporary sibling of ``path``, then put the finished file at ``path``.

    ``handle`` is a binary file, or with ``text`` a UTF-8 text file with ``"\\n"`` line ends (the same bytes on
    every platform). The parent folder must exist: creating it here could resurrect a folder another process
    removed on purpose (a pruned checkpoint) and publish a file into it. Returns ``path``.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") if text else os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, *, parents: bool = False) -> Path:
    """Write ``text`` (UTF-8, ``"\\n"`` line ends) to ``path`` through :func:`atomic_write`.

    ``parents`` creates the folder first: for a file that may be the first thing written into a new folder (a
    model card, a result file), never for one inside a folder another process may remove (a checkpoint)."""
    if parents:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda handle: handle.write(text), text=True)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, parents: bool = False, **dump: Any) -> Path:
    """Write ``obj`` as JSON through :func:`atomic_write_text`; ``dump`` goes to ``json.dump`` (default: indented
    by 2, sorted keys, ``str`` for what JSON cannot represent)."""
    options = {"indent": 2, "sort_keys": True, "default": str, **dump}
    return atomic_write_text(path, json.dumps(obj, **options), parents=parents)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_write`."""
    return atomic_write(path, lambda handle: handle.write(data))


def fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` and the folder itself, so a crash after the swap cannot leave empty files."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux ``renameat2``); False where the call or the file system lacks it."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:  # pragma: no cover
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:  # pragma: no cover - glibc < 2.28, macOS
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # pragma: no cover - e.g. an older kernel, some FUSE
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


def swap_folder(new: Path, dest: Path) -> None:
    """Put the complete folder ``new`` at ``dest`` (a sibling path), replacing any folder there; remove the old one."""
    new, dest = Path(new), Path(dest)
    if not dest.exists():
        os.rename(new, dest)
    elif _exchange(new, dest):
        shutil.rmtree(new)  # ``new`` now names the previous folder
    else:  # pragma: no cover - exercised only where renameat2 is missing
        aside = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.rename(dest, aside)
        try:
            os.rename(new, dest)
        except BaseException:
            os.rename(aside, dest)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    _fsync_dir(dest.parent)


def fix_tree_modes(root: str | os.PathLike[str]) -> None:
    """Give ``root`` and everything below it :func:`dir_mode` / :func:`file_mode` permissions (what a folder made
    by ``mkdtemp`` / ``mkstemp`` needs before it is published)."""
    fmode, dmode = file_mode(), dir_mode()
    os.chmod(root, dmode)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), dmode)
        for name in files:
            os.chmod(os.path.join(folder, name), fmode)


def publish_folder(staged: str | os.PathLike[str], target: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """Put the finished folder ``staged`` (a sibling of ``target``, written by someone else's code) at ``target``.

    An existing ``target`` is refused unless ``overwrite``; the permissions are made ordinary, the files flushed,
    and the folder put in place by :func:`swap_folder`, so a reader sees the old folder or the new one."""
    staged, target = Path(staged), Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
    fix_tree_modes(staged)
    fsync_tree(staged)
    swap_folder(staged, target)
    return target


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike[str], verify: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``dest`` to write into; on success ``verify`` it and swap it in.

    ``verify(folder)`` raises if the staged folder is not what should replace ``dest`` (e.g. it does not load).
    On any exception (an ``OSError(ENOSPC)`` from a write, a failed check) the staged folder is removed and
    ``dest`` is untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    os.chmod(stage, dir_mode())  # mkdtemp makes it private; the model folder gets the usual permissions
    try:
        yield stage
        if verify is not None:
            verify(stage)
        fsync_tree(stage)
        swap_folder(stage, dest)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
