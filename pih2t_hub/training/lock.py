"""One run per output directory: an exclusive lock file held for the whole run.

Two runs into one ``--output-dir`` used to both finish: the model and results came from one, the config from the
other, and a checkpoint of one was left half-written. :func:`output_lock` holds ``<output_dir>/.pih2t.lock``:

* exclusivity comes from ``flock`` on the open file, which the kernel drops when the holder exits however it
  exits, so a live holder is never mistaken for a dead one;
* the file records who holds it (pid, host, start time, command), so the refusal names the holder;
* a clean exit (including Ctrl-C, SIGTERM and exceptions) removes the file. A file that is still there but not
  locked was left by a run that died (SIGKILL, power loss): it is reported as stale. ``--resume`` (``take_over_dead``)
  takes it over, saying so, when the holder is provably gone: recorded on this host (same host name and boot) and
  its pid no longer runs, or now belongs to a process that started at another time (a reused pid). Where that
  cannot be proven (another host, a pid still running), and for a run without ``--resume`` (which would remove
  the dead run's checkpoints), only ``force=True`` (``--force-unlock``) takes it over;
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
    """A lock file left by a run that is gone; taken over by ``--resume`` when its holder is provably gone from this
    host, else only with ``force=True`` (``--force-unlock``)."""


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


def _boot_id() -> str | None:
    """This boot of this machine (Linux), so that a pid recorded before a reboot is not compared with today's."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field 22); None where unknown.

    A pid and its start time name one process: a pid that is reused belongs to a process with another start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # after the command name, which may hold spaces and parentheses
    return fields[19] if len(fields) > 19 else None


def _holder_state(info: dict) -> tuple[bool, str]:
    """``(provably gone, why)`` for a recorded holder that does not hold the lock.

    Gone is proven only on this host and boot: the pid does not run, or runs with another start time (reused).
    """
    if info.get("host") != socket.gethostname():
        return False, "holds no lock from this host (it ran on another machine: check it is gone)"
    if info.get("boot_id") != _boot_id():
        return False, "holds no lock (it ran before this machine's last boot, or on another machine of this name)"
    try:
        pid = int(info.get("pid", -1))
        os.kill(pid, 0)
    except ProcessLookupError:
        return True, "is no longer running"
    except (ValueError, OverflowError):
        return False, "holds no lock (its pid is unreadable)"
    except PermissionError:
        pass  # a live process of another user
    recorded, now = info.get("proc_start"), _process_start(pid)
    if recorded is not None and now is not None and recorded != now:
        return True, "is no longer running (its pid now belongs to another process)"
    return False, "no longer holds the lock but its pid is in use (reused, or it runs without the lock)"


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


def _acquire(folder: Path, force: bool, take_over_dead: bool, report: Callable[[str], None]) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = _open_locked(path)
    previous = read_lock(path)
    if previous:
        gone, why = _holder_state(previous)
        message = f"stale lock in {folder}: {_describe(previous)} {why}"
        if force:
            report(f"{message}: taken over (--force-unlock)")
        elif gone and take_over_dead:
            report(f"{message}: taken over (--resume; the holder is gone from this host)")
        else:
            os.close(fd)
            how = "--resume to continue it, or with --force-unlock" if gone else "--force-unlock"
            raise StaleLockError(f"{message}; its checkpoints may be incomplete (--resume skips those): rerun with "
                                 f"{how} to take the lock over")
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)[:500], "boot_id": _boot_id(), "proc_start": _process_start(os.getpid())}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    os.fsync(fd)
    return fd


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike[str], force: bool = False, report: Callable[[str], None] = print,
                take_over_dead: bool = False) -> Iterator[Path]:
    """Hold ``<folder>/.pih2t.lock`` for the ``with`` block (created with ``folder``); yield the lock file's path.

    Raises :class:`OutputLockedError` at once when a live run holds it, :class:`StaleLockError` when a dead run
    left it, unless ``force``, or ``take_over_dead`` (``--resume``) and the holder is provably gone.
    """
    folder = Path(folder)
    key = str(folder.resolve())
    path = folder / LOCK_NAME
    if key in _HELD:
        _HELD[key][1] += 1
    else:
        _HELD[key] = [_acquire(folder, force, take_over_dead, report), 1]
    try:
        yield path
    finally:
        _HELD[key][1] -= 1
        if _HELD[key][1] == 0:
            fd = _HELD.pop(key)[0]
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # while still holding it: a waiter then sees another inode and retries
            os.close(fd)
