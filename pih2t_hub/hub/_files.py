"""Atomic writes with ordinary permissions for everything the hub modules put on disk.

``tempfile.mkstemp`` / ``mkdtemp`` create entries readable by their owner only (0600 / 0700); renamed into place
as is, a model folder would be unreadable to a web server, a container running as another user, or ``git`` hooks.
Files are therefore chmod-ed to ``0666 & ~umask`` (0644 under the usual umask) and folders to ``0777 & ~umask``
(0755) before the rename that publishes them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(..., "w")`` would give a new file (0644 under umask 022)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode ``mkdir`` would give a new folder (0755 under umask 022)."""
    return 0o777 & ~_umask()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through a temp sibling + rename, with :func:`file_mode` permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def fix_tree_modes(root: str | os.PathLike[str]) -> None:
    """Give ``root`` and everything below it :func:`dir_mode` / :func:`file_mode` permissions."""
    fmode, dmode = file_mode(), dir_mode()
    os.chmod(root, dmode)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), dmode)
        for name in files:
            os.chmod(os.path.join(folder, name), fmode)


def publish_folder(staged: str | os.PathLike[str], target: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """Move the finished folder ``staged`` (a sibling of ``target``) to ``target`` in one rename.

    An existing ``target`` is refused unless ``overwrite``; then it is first renamed aside and removed only after
    the new folder is in place, so a reader sees either the old folder or the new one, never a mix.
    """
    staged, target = Path(staged), Path(target)
    fix_tree_modes(staged)
    old = None
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(staged, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target
