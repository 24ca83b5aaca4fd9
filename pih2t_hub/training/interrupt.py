"""Ctrl-C that stops training at a step boundary, so the checkpoint written on the way out is exact.

A ``KeyboardInterrupt`` raised wherever the signal lands can hit a step half-way: after the fusion generator drew
the step's channel subset, or after ``optimizer.step()`` but before the step counter moved. A checkpoint of that
state resumes with the generator one step ahead (the resumed run picked another best epoch). With
:class:`DeferredInterrupt` installed, the first SIGINT only sets a flag; the loop calls :meth:`raise_if_requested`
where a regular checkpoint would be taken (after a completed optimiser step, or after an epoch's checkpoint) and
the checkpoint on the way out is then the same as a regular one. A second Ctrl-C raises at once, and nothing is
written: the newest sealed checkpoint stays the one to resume from.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

__all__ = ["DeferredInterrupt"]


class DeferredInterrupt:
    """Context manager: SIGINT requests a stop at the next :meth:`raise_if_requested` (main thread only; elsewhere
    Python delivers no signals and the loop keeps its old behaviour)."""

    def __init__(self, accelerator: Any | None = None) -> None:
        self.accelerator = accelerator
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("interrupt: finishing the current step, then checkpointing (Ctrl-C again to stop at once, "
              "without a new checkpoint)", file=sys.stderr, flush=True)

    def install(self) -> "DeferredInterrupt":
        """Take over SIGINT (main thread only); returns ``self``. Undo with :meth:`restore`."""
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def restore(self) -> None:
        """Give SIGINT back to the handler that was there before :meth:`install`."""
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

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

        flag = torch.tensor([1.0 if self.requested else 0.0], device=acc.device)
        return bool(acc.reduce(flag, reduction="sum").item() > 0)

    def raise_if_requested(self) -> None:
        """Raise ``KeyboardInterrupt`` here, at a consistent point, if a stop was requested (on any rank)."""
        if self._any_rank_requested():
            self.requested = True
            raise KeyboardInterrupt
