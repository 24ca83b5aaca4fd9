"""Ctrl-C and SIGTERM that stop training at a step boundary, so the checkpoint written on the way out is exact.

A ``KeyboardInterrupt`` raised wherever the signal lands can hit a step half-way: after the fusion generator drew
the step's channel subset, or after ``optimizer.step()`` but before the step counter moved. A checkpoint of that
state resumes with the generator one step ahead (the resumed run picked another best epoch). With
:class:`DeferredInterrupt` installed, the first SIGINT only sets a flag; the loop calls :meth:`raise_if_requested`
where a regular checkpoint would be taken (after a completed optimiser step, or after an epoch's checkpoint) and
the checkpoint on the way out is then the same as a regular one. A second Ctrl-C raises at once, and nothing is
written: the newest sealed checkpoint stays the one to resume from.

SIGTERM, what schedulers, ``kill`` and container runtimes send before they kill, is handled the same way (a
:class:`Terminated`, which is a ``KeyboardInterrupt``, so every clean-up that runs on Ctrl-C runs on it too); the
command line exits with 143 (128 + 15) instead of 130. Outside the training loop :func:`terminate_like_ctrl_c`
turns SIGTERM into that exception at once, as Python does with SIGINT.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from types import FrameType
from typing import Any, Iterator

__all__ = ["DeferredInterrupt", "Terminated", "terminate_like_ctrl_c"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """The run was stopped by SIGTERM; handled like Ctrl-C, reported with exit code 143."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


@contextlib.contextmanager
def terminate_like_ctrl_c() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` where it lands for the ``with`` block (main thread only), as SIGINT raises
    ``KeyboardInterrupt``: the output lock is released and the newest sealed checkpoint kept, instead of the process
    dying with the lock file left behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class DeferredInterrupt:
    """Context manager: SIGINT or SIGTERM requests a stop at the next :meth:`raise_if_requested` (main thread only;
    elsewhere Python delivers no signals and the loop keeps its old behaviour)."""

    def __init__(self, accelerator: Any | None = None) -> None:
        self.accelerator = accelerator
        self.requested = False
        self.terminated = False  # the request came from SIGTERM
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self.requested = True
        self.terminated = signum == signal.SIGTERM
        what = "terminate (SIGTERM)" if self.terminated else "interrupt"
        print(f"{what}: finishing the current step, then checkpointing (Ctrl-C again to stop at once, "
              "without a new checkpoint)", file=sys.stderr, flush=True)

    def install(self) -> "DeferredInterrupt":
        """Take over SIGINT and SIGTERM (main thread only); returns ``self``. Undo with :meth:`restore`."""
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in _SIGNALS}
        return self

    def restore(self) -> None:
        """Give SIGINT and SIGTERM back to the handlers that were there before :meth:`install`."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __enter__(self) -> "DeferredInterrupt":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def _any_rank_requested(self) -> bool:
        """Every rank stops at the same step: one rank's request is every rank's (one tiny all-reduce per check)."""
        acc = self.accelerator
        if acc is None or acc.num_processes == 1:
            return self.requested
        import torch

        flags = torch.tensor([float(self.requested), float(self.terminated)], device=acc.device)
        requested, terminated = (acc.reduce(flags, reduction="sum") > 0).tolist()
        self.terminated = self.terminated or terminated
        return requested

    def raise_if_requested(self) -> None:
        """Raise ``KeyboardInterrupt`` (:class:`Terminated` after SIGTERM) here, at a consistent point, if a stop was
        requested (on any rank)."""
        if self._any_rank_requested():
            self.requested = True
            raise Terminated if self.terminated else KeyboardInterrupt
