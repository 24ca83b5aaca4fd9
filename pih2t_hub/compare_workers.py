"""Worker processes that fit a trial's cross-validation parts, and the final retraining's seeds, side by side
(``--jobs``).

A trial is scored on K x R parts whose fits share nothing but the cached features and their stage-1 heads, and
each fit seeds itself from its part, so the parts can be fitted in any order and in any process. On a CPU the fits
are small (a linear head on cached features) and a single process keeps one core busy at best; ``--jobs N`` forks
N single-threaded processes once every part's stage-1 head is trained, each holding the parent's bench (features,
folds, heads) by copy-on-write, and hands them (method, configuration, part) triples: only the triple goes out and
one number comes back (a trained model, for the final retraining, which the parent then evaluates: the test split
is read there only). The study, its sampler and the order of the scores stay in the parent, so the table is the
one a single process makes with one thread.

Forking is only safe before a CUDA context exists and where the platform has ``fork``: elsewhere ``--jobs`` above 1
is refused with one line. Workers end with their parent, even one killed with SIGKILL (a resumed comparison must
not find the cores still busy with the dead one's fits).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Iterator, Sequence

__all__ = ["check_jobs", "PartPool"]

_BENCH: Any = None  # the bench a forked worker inherited; set in the parent just before the fork


def check_jobs(jobs: int, device_type: str) -> int:
    """``jobs`` if this process can fork that many workers, else a one-line ``ValueError`` naming why not."""
    if jobs > 1 and device_type != "cpu":
        raise ValueError(f"--jobs {jobs} forks CPU worker processes, which cannot share a {device_type} device: "
                         f"use --jobs 1 there (the device already fits the parts in parallel)")
    if jobs > 1 and "fork" not in multiprocessing.get_all_start_methods():
        raise ValueError(f"--jobs {jobs} needs the fork start method, which this platform lacks: use --jobs 1")
    return jobs


def _exit_with(parent: int) -> None:
    """Watch the parent: a worker whose parent died (its parent id changed) exits at once."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def _start_worker(parent: int) -> None:
    import torch

    torch.set_num_threads(1)  # N workers, N cores: more threads per worker would only contend
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # (inherited already) Ctrl-C is the parent's to report, once
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _fit(job: tuple[str, int, Any, dict[str, Any]]) -> tuple[Any, dict[str, float], dict]:
    which, index, cand, overrides = job
    return _BENCH.fit(cand, overrides, getattr(_BENCH, which)[index])


def _score(job: tuple[str, int, Any, dict[str, Any]]) -> float:
    return _fit(job)[1]["balanced"]


class PartPool:
    """``jobs`` forked workers over one bench; :meth:`scores` returns the parts' balanced accuracies in order."""

    def __init__(self, bench: Any, jobs: int) -> None:
        global _BENCH

        _BENCH = bench  # inherited by the fork below, read only there
        context = multiprocessing.get_context("fork")
        self._pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_start_worker,
                                         initargs=(os.getpid(),))
        # fork every worker now, ignoring Ctrl-C from birth: one pressed while a worker starts up would otherwise
        # print its traceback (a forking executor starts all its workers on its first submit, in this thread); one
        # pressed in that instant is dropped
        main = threading.current_thread() is threading.main_thread()  # only there can a handler be set
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            self._pool.submit(int)
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)

    def scores(self, cand: Any, overrides: dict[str, Any], which: str, indices: Sequence[int]) -> list[float]:
        """Balanced accuracy of the candidate with ``overrides`` on ``getattr(bench, which)[i]`` for each index."""
        return list(self._pool.map(_score, [(which, i, cand, overrides) for i in indices]))

    def fits(self, cand: Any, overrides: dict[str, Any], which: str,
             indices: Sequence[int]) -> Iterator[tuple[Any, dict[str, float], dict]]:
        """The fits themselves (model, metrics of the scored rows, what the method reported), in the order of
        ``indices``, each as soon as it and those before it are done: the final retraining, whose models the parent
        evaluates on test."""
        return self._pool.map(_fit, [(which, i, cand, overrides) for i in indices])

    def close(self) -> None:
        """Stop the workers now: between trials none is busy; after an error or Ctrl-C a running fit is dropped
        rather than waited for (its trial is redone on resume)."""
        processes = list(getattr(self._pool, "_processes", {}).values())  # the executor has no public terminate
        self._pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
        for process in processes:
            process.join()
        global _BENCH
        _BENCH = None  # the parent's reference: the bench is freed with its owner
