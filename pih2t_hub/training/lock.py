"""One run per output directory: an exclusive lock file held for the whole run.

Two runs into one ``--output-dir`` used to both finish: the model and results came from one, the config from the
other, and a checkpoint of one was left half-written. :func:`output_lock` holds ``<output_dir>/.pih2t.lock``:

* exclusivity comes from ``flock`` on the open file, which the kernel drops when the holder exits however it
  exits, so a live holder is never mistaken for a dead one;
* the file records who holds it (pid, host, start time, command), so the refusal names the holder;
* a clean exit (including Ctrl-C and exceptions) removes the file. A file that is still there but not locked was
  left by a run that died (SIGKILL, power loss): it is reported as stale and taken over only with
  ``force=True`` (``--force-unlock``), since its checkpoints may be half-written;
* the lock is re-entrant within a process (the CLI takes it before the heavy imports, ``run()`` takes it again).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, the lock file alone decides
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "OutputLockedError", "StaleLockError", "output_lock", "read_lock"]

LOCK_NAME = ".pih2t.lock"
_HELD: dict[str, list] = {}  # resolved path -> [fd, depth]


class OutputLockedError(RuntimeError):
    """Another live run holds the output directory."""


class StaleLockError(RuntimeError):
    """A lock file left by a run that is gone; take it over with ``force=True`` (``--force-unlock``)."""


def read_lock(path: str | os.PathLike[str]) -> dict:
    """The holder recorded in a lock file (empty when the file is empty, unreadable or absent)."""
    try:
        return json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(info: dict) -> str:
    if not info:
        return "an unknown process"
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('started', '?')}"
            f" ({info.get('command', '?')})")


def _pid_state(info: dict) -> str:
    """Why a recorded holder is not holding the lock: 'is no longer running' or what we cannot check."""
    if info.get("host") != socket.gethostname():
        return "holds no lock from this host (it ran on another machine: check it is gone)"
    try:
        os.kill(int(info.get("pid", -1)), 0)
    except ProcessLookupError:
        return "is no longer running"
    except (PermissionError, ValueError, OverflowError):
        pass
    return "no longer holds the lock (the pid was reused)"


def _open_locked(path: Path) -> int:
    """Open ``path`` and hold an exclusive ``flock`` on it; raise :class:`OutputLockedError` if a live run has it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise OutputLockedError(f"output directory {path.parent} is locked by {_describe(read_lock(path))}; "
                                    "wait for that run or choose another --output-dir") from None
        try:  # the holder may have removed the file between our open and our flock: lock the current file
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _acquire(folder: Path, force: bool, report: Callable[[str], None]) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = _open_locked(path)
    previous = read_lock(path)
    if previous:
        message = f"stale lock in {folder}: {_describe(previous)} {_pid_state(previous)}"
        if not force:
            os.close(fd)
            raise StaleLockError(f"{message}; its checkpoints may be incomplete (--resume skips those): rerun with "
                                 "--force-unlock to take the lock over")
        report(f"{message}: taken over (--force-unlock)")
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)[:500]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    os.fsync(fd)
    return fd


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike[str], force: bool = False,
                report: Callable[[str], None] = print) -> Iterator[Path]:
    """Hold ``<folder>/.pih2t.lock`` for the ``with`` block (created with ``folder``); yield the lock file's path.

    Raises :class:`OutputLockedError` at once when a live run holds it, :class:`StaleLockError` when a dead run
    left it (unless ``force``).
    """
    folder = Path(folder)
    key = str(folder.resolve())
    path = folder / LOCK_NAME
    if key in _HELD:
        _HELD[key][1] += 1
    else:
        _HELD[key] = [_acquire(folder, force, report), 1]
    try:
        yield path
    finally:
        _HELD[key][1] -= 1
        if _HELD[key][1] == 0:
            fd = _HELD.pop(key)[0]
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # while still holding it: a waiter then sees another inode and retries
            os.close(fd)
