"""Time and memory of ``make_long_tailed`` on a 1,000,000-row dataset (target: < 2 s, < 200 MB).

The dataset has 1,000 classes x 1,000 rows (shuffled) with a ``ClassLabel`` column and an int64 column, built in
memory (default) or saved with ``save_to_disk`` and memory-mapped back (``--on-disk``). Peak memory is the
process's resident set size sampled every millisecond during the call, minus the RSS just before it (so the
dataset itself is not counted); NumPy's share is cross-checked with ``tracemalloc`` in a separate run.

    python benchmarks/longtail_subset.py [--rows 1000000] [--classes 1000] [--ratio 100] [--on-disk]

Prints the numbers and writes ``benchmarks/results/longtail_subset.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np

TIME_TARGET_S = 2.0
MEMORY_TARGET_MB = 200.0


def rss_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # Linux fallback
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples RSS in a background thread; ``peak`` is the maximum seen while the context was open."""

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def build_dataset(rows: int, classes: int, on_disk: bool, workdir: str):
    from datasets import ClassLabel, Dataset, Features, Value, load_from_disk

    labels = np.random.default_rng(0).permutation(np.arange(rows) % classes)
    features = Features({"label": ClassLabel(num_classes=classes), "row": Value("int64")})
    ds = Dataset.from_dict({"label": labels, "row": np.arange(rows)}, features=features)
    if on_disk:
        ds.save_to_disk(workdir)
        del ds
        ds = load_from_disk(workdir)
    return ds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--ratio", type=float, default=100.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--on-disk", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "longtail_subset.json"))
    args = parser.parse_args()

    import datasets
    import pyarrow as pa

    from pih2t_hub.data import make_long_tailed

    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        ds = build_dataset(args.rows, args.classes, args.on_disk, workdir)
        build_s = time.perf_counter() - t0
        gc.collect()

        times, peaks = [], []
        for _ in range(args.repeats):
            gc.collect()
            before = rss_bytes()
            with PeakRSS() as peak:
                start = time.perf_counter()
                subset = make_long_tailed(ds, args.ratio, seed=0)
                times.append(time.perf_counter() - start)
            peaks.append((peak.peak - before) / 2**20)
            assert len(subset.dataset) == sum(subset.class_counts)
            del subset

        tracemalloc.start()
        subset = make_long_tailed(ds, args.ratio, seed=0)
        numpy_peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()

        result = {
            "rows": args.rows,
            "classes": args.classes,
            "imbalance_ratio": args.ratio,
            "storage": "arrow on disk (memory-mapped)" if args.on_disk else "in-memory arrow",
            "subset_rows": len(subset.dataset),
            "build_dataset_s": round(build_s, 3),
            "time_s": [round(t, 4) for t in times],
            "time_s_max": round(max(times), 4),
            "time_s_median": round(statistics.median(times), 4),
            "peak_rss_above_dataset_mb": [round(p, 1) for p in peaks],
            "peak_rss_above_dataset_mb_max": round(max(peaks), 1),
            "tracemalloc_peak_mb": round(numpy_peak_mb, 1),
            "arrow_pool_max_mb": round(pa.default_memory_pool().max_memory() / 2**20, 1),
            "targets": {"time_s": TIME_TARGET_S, "memory_mb": MEMORY_TARGET_MB},
            "met": {"time": max(times) < TIME_TARGET_S, "memory": max(peaks) < MEMORY_TARGET_MB},
            "machine": {
                "python": platform.python_version(),
                "numpy": np.__version__,
                "datasets": datasets.__version__,
                "pyarrow": pa.__version__,
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
            },
        }

    print(f"make_long_tailed on {args.rows:,} rows x {args.classes} classes, IR {args.ratio:g} ({result['storage']})")
    print(f"  subset rows          {result['subset_rows']:,}")
    print(f"  time (s)             {result['time_s']}  max {result['time_s_max']}  target < {TIME_TARGET_S}")
    print(f"  peak RSS above data  {result['peak_rss_above_dataset_mb']} MB  target < {MEMORY_TARGET_MB:g} MB")
    print(f"  tracemalloc peak     {result['tracemalloc_peak_mb']} MB (NumPy / Python allocations)")
    print(f"  targets met          time={result['met']['time']} memory={result['met']['memory']}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"  wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
