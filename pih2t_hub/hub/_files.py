"""Atomic writes with ordinary permissions for everything the hub modules put on disk.

``tempfile.mkstemp`` / ``mkdtemp`` create entries readable by their owner only (0600 / 0700); renamed into place
as is, a model folder would be unreadable to a web server, a container running as another user, or ``git`` hooks.
Files are therefore chmod-ed to ``0666 & ~umask`` (0644 under the usual umask) and folders to ``0777 & ~umask``
(0755) before the rename that publishes them. Single files go through :func:`pih2t_hub._atomic.atomic_write`,
which does exactly that.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from pih2t_hub import _atomic
from pih2t_hub._atomic import dir_mode, file_mode

__all__ = ["atomic_write_text", "dir_mode", "file_mode", "fix_tree_modes", "publish_folder"]


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through a temp sibling + rename, with :func:`file_mode` permissions.

    Unlike the bare primitive, the folder is created first: a card or a side file may be the first thing written
    into a new model folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _atomic.atomic_write_text(path, text)


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
