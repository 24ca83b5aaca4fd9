"""Folders that are replaced whole or not at all.

A model folder is several files (config, weights, processor config, code, card, plot). Writing them one by one
into an existing folder mixes two runs when a write fails half-way (a full disk kept the old weights next to a
new ``config.json``, which still loaded and predicted differently). Here everything is written into a fresh
temporary sibling, checked, flushed to disk, and only then put in place of the old folder:

* on Linux the swap is one ``renameat2(RENAME_EXCHANGE)`` call, so the destination path always names a complete
  folder (old or new);
* elsewhere (or on a file system without it) the old folder is renamed aside, the new one renamed in, and the
  old one put back if that second rename fails.

Any exception before the swap leaves the destination exactly as it was and removes the temporary folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["atomic_folder", "swap_folder", "fsync_tree"]

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


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
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes it private; the model folder gets the usual permissions
    try:
        yield stage
        if verify is not None:
            verify(stage)
        fsync_tree(stage)
        swap_folder(stage, dest)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
