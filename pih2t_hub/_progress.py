"""Progress bars that suit where stderr goes, and quiet weight loading inside the package's own loads.

On a terminal a bar redraws itself in place (``\\r``). In a log file or a CI console the same redraws pile up as
hundreds of carriage returns on one line, which no one can read. :func:`progress_bar` therefore gives a live
``tqdm`` bar when the stream is a terminal (or a notebook) and otherwise a :class:`LineProgress`: the same
counters, nothing drawn while it runs, and one plain line (count, elapsed time, rate, postfix) when it closes,
so a log shows one line per epoch or per phase.

transformers draws its own bars in ``from_pretrained`` (one step per tensor, "Loading weights") and
``save_pretrained`` ("Writing model shards"); inside the package's own loads and saves (a reload check, a run's
model folder, a saved model to evaluate) they say nothing, and :func:`quiet_transformers_bars` hides them
(download bars of ``huggingface_hub`` keep their own setting).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator, TextIO

from tqdm import tqdm as _std_tqdm

__all__ = ["LineProgress", "is_terminal", "progress_bar", "quiet_transformers_bars"]


class _Sink:
    """A text stream that drops everything: the bar keeps its counters, nothing is drawn."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


class LineProgress(_std_tqdm):
    """A ``tqdm`` bar for streams that are no terminal: silent while running, one line when closed."""

    def __init__(self, *args: Any, file: TextIO | None = None, **kwargs: Any) -> None:
        self._line_stream = file if file is not None else sys.stderr
        kwargs.setdefault("bar_format", "{desc}: {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]")
        kwargs["mininterval"] = float("inf")  # no redraw would be shown anyway: skip formatting them
        super().__init__(*args, file=_Sink(), **kwargs)

    def close(self) -> None:
        if self.disable:  # disabled, or closed already
            return super().close()
        line = str(self)
        super().close()
        self._line_stream.write(line + "\n")
        self._line_stream.flush()


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (a closed or odd stream counts as no terminal)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def progress_bar(*args: Any, file: TextIO | None = None, **kwargs: Any) -> _std_tqdm:
    """``tqdm(*args, **kwargs)`` drawn live on a terminal or in a notebook, one line per bar anywhere else."""
    from tqdm.auto import tqdm as auto_tqdm

    stream = file if file is not None else sys.stderr
    if any(cls.__module__ == "tqdm.notebook" for cls in auto_tqdm.__mro__):  # widgets: no carriage returns
        return auto_tqdm(*args, file=file, **kwargs)
    if is_terminal(stream):
        return _std_tqdm(*args, file=file, **kwargs)
    return LineProgress(*args, file=stream, **kwargs)


@contextlib.contextmanager
def quiet_transformers_bars() -> Iterator[None]:
    """Hide transformers' "Loading weights" / "Writing model shards" bars for the calls inside."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    was_on, hub_was_on = hf_logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # also switches huggingface_hub's bars off: put those back
    if hub_was_on:
        enable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()  # switches huggingface_hub's bars on as well
            if not hub_was_on:
                disable_progress_bars()
