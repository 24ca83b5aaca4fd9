"""Peak memory of a stage-2 epoch over a 1,000,000 x 1,280 fp16 feature cache: < 300 MB above the import baseline.

Setup: a synthetic cache (``features.npy`` fp16, ``labels.npy`` int64 with exponentially long-tailed classes,
``manifest.json``; 2.56 GB) written with the package's own ``write_cache`` (streamed in chunks, SHA-256 per
4,096-row shard computed while writing, never mapped) into ``--workdir`` (default: a fresh directory under /tmp),
reused if it is already there and deleted at the end unless ``--keep``.

The epoch: one H2T (p = 0.25) stage-2 epoch through the recipe's own stage-2 function
(``pih2t_hub.training.stage2.run_stage2``: its ``DualBranchSampler`` / ``DualBranchDataset`` loader, its cached step,
``train_loop`` on accelerate, CPU), batch ``--batch`` pairs, linear head, then its validation on 5,000 rows.
Each mode runs in a fresh child process so that its peak is its own:

* ``recipe``: the cache opened as ``load_or_extract`` reopens one (full SHA-256 verification, timed), and the
  dataset ``open_for_training(cache)`` returns, which is what ``run.py`` hands stage 2 (above 256 MiB: the
  ``pread`` ``CacheRowReader``, which never maps the file);
* ``mmap``: ``cache.as_tensor_dataset()``, the memory-mapped arrays stage 2 used before (for contrast).

Memory, from ``/proc/self/status`` of the child: ``VmHWM`` (the kernel's peak resident set: anonymous +
file-backed + shared pages) and the peaks of ``RssAnon`` and ``RssFile`` sampled every 20 ms by a thread. The
import baseline is the RSS right after the child's imports (torch, accelerate, pih2t_hub); the figure that matters
is peak minus baseline. Pages of a *mapped* file that the process touched count in its RSS until unmapped, so the
mmap mode grows towards the file size although nothing is copied; pages read with ``pread`` stay in the kernel's
page cache, which belongs to no process. Targets: peak above the import baseline < 300 MB; peak total < 1 GB.

    python benchmarks/memory_cache_epoch.py [--workdir DIR] [--keep] [--modes recipe]   # ~3 min, 2.6 GB of disk

Prints a table and writes ``benchmarks/results/memory_cache_epoch.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse
import contextlib
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import git_state, write_json  # noqa: E402  (this folder is on sys.path)

TARGET_BYTES = 1_000_000_000  # total peak RSS: an epoch over a large cache must fit a small machine
TARGET_ABOVE_BASELINE = 300 * 10**6  # peak RSS above the import baseline
MODES = ("recipe", "mmap")
_OWN_FILES = ("features.npy", "labels.npy", "manifest.json")


# ---------------------------------------------------------------------------------------------- helpers




def proc_status() -> dict[str, int]:
    """Memory fields of /proc/self/status in bytes (VmRSS, VmHWM, RssAnon, RssFile, RssShmem)."""
    out = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def mapped_rss(path: Path) -> int:
    """Resident bytes of this process's mappings of ``path`` (from /proc/self/smaps): the file's share of RSS."""
    target, total, inside = str(path.resolve()), 0, False
    with open("/proc/self/smaps") as handle:
        for line in handle:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping header: "start-end perms offset dev inode path"
                parts = line.split(maxsplit=5)
                inside = len(parts) == 6 and parts[5].strip() == target
            elif inside and first == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


class PeakSampler:
    """Samples /proc/self/status every ``interval_s`` in a thread, and the feature file's mapped RSS every
    ``smaps_every`` samples (smaps is slower to read); ``peaks`` holds the maximum of each field seen."""

    def __init__(self, features_path: Path, interval_s: float = 0.02, smaps_every: int = 250) -> None:
        self.features_path = features_path
        self.interval_s = interval_s
        self.smaps_every = smaps_every
        self.peaks: dict[str, int] = {**proc_status(), "CacheFileRss": mapped_rss(features_path)}
        self.timeline: list[tuple[float, int, int, int]] = []  # (seconds, VmRSS, RssAnon, RssFile), every ~0.25 s
        self._stop = threading.Event()
        self._t0 = time.perf_counter()

    def _sample(self, smaps: bool = True) -> None:
        values = proc_status()
        if smaps:
            values["CacheFileRss"] = mapped_rss(self.features_path)
        for key, value in values.items():
            self.peaks[key] = max(self.peaks.get(key, 0), value)
        now = time.perf_counter() - self._t0
        if not self.timeline or now - self.timeline[-1][0] >= 0.25:
            self.timeline.append((round(now, 3), values["VmRSS"], values["RssAnon"], values["RssFile"]))

    def _run(self) -> None:
        tick = 0
        while not self._stop.wait(self.interval_s):
            tick += 1
            self._sample(smaps=tick % self.smaps_every == 0)

    def __enter__(self) -> PeakSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def long_tailed_counts(n: int, num_classes: int, ratio: float) -> np.ndarray:
    """Class sizes decaying exponentially from head to tail (imbalance ``ratio``), summing to ``n``, all >= 1."""
    weights = ratio ** (-np.arange(num_classes) / max(num_classes - 1, 1))
    counts = 1 + np.floor(weights / weights.sum() * (n - num_classes)).astype(np.int64)
    counts[0] += n - counts.sum()
    return counts


def cache_request(rows: int, dim: int) -> dict[str, Any]:
    from pih2t_hub.data.features import FORMAT_VERSION

    return {"backbone": "synthetic", "weights": "none", "transform": "none", "dataset": f"synthetic-{rows}x{dim}",
            "num_samples": rows, "dtype": "float16", "num_views": 1, "shard_size": 4096, "seed": 0,
            "format_version": FORMAT_VERSION, "autocast": None, "channels_last": False}


def write_cache(workdir: Path, rows: int, dim: int, classes: int, chunk_rows: int) -> float:
    """Write the cache with the package's own writer (``write_cache``: streamed, hashed while written, never
    mapped); returns seconds."""
    from pih2t_hub.data.features import write_cache as seal

    start = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(classes), long_tailed_counts(rows, classes, 100.0)))
    centres = rng.standard_normal((classes, dim), dtype=np.float32)

    def parts():
        for lo in range(0, rows, chunk_rows):
            hi = min(rows, lo + chunk_rows)
            chunk = rng.standard_normal((hi - lo, dim), dtype=np.float32)
            chunk += centres[labels[lo:hi]]
            np.maximum(chunk, 0, out=chunk)  # post-ReLU-like, class-dependent features
            yield chunk.astype(np.float16), labels[lo:hi]

    seal(workdir, cache_request(rows, dim), parts(), (dim,), extracted_on="synthetic")
    return time.perf_counter() - start


def cache_is_there(workdir: Path, rows: int, dim: int) -> bool:
    from pih2t_hub.data.features import CacheIntegrityError, FeatureCache

    try:
        cache = FeatureCache.open(workdir, manifest=cache_request(rows, dim))
    except (FileNotFoundError, ValueError, CacheIntegrityError):
        return False
    ok = cache.features.shape == (rows, dim) and cache.features.dtype == np.float16
    del cache
    return ok


# ---------------------------------------------------------------------------------------------- the child


def child(args: argparse.Namespace) -> int:
    """One stage-2 epoch in this (fresh) process, through the run's own stage-2 function; prints one JSON line."""
    import torch
    from _stage2_epoch import stage2_epoch
    from accelerate import Accelerator

    import pih2t_hub.evaluation.metrics  # noqa: F401  (everything the epoch imports, before the baseline)
    import pih2t_hub.training.run  # noqa: F401
    from pih2t_hub.data.features import FeatureCache

    after_imports = proc_status()
    verify_s = None
    if args.child == "recipe":  # reopened as load_or_extract reopens a cache: every checksum verified
        start = time.perf_counter()
        FeatureCache.open(args.workdir, verify=True)
        verify_s = time.perf_counter() - start
    after_verify = proc_status()
    accelerator = Accelerator(cpu=True)
    before_epoch = proc_status()
    load_before = os.getloadavg()[0]
    with PeakSampler(Path(args.workdir) / "features.npy") as sampler, contextlib.redirect_stderr(open(os.devnull, "w")):
        state, seconds, dataset_type = stage2_epoch(Path(args.workdir), accelerator, args.batch, mode=args.child,
                                                    max_steps=args.max_steps)
    steps = state.global_step if state is not None else args.max_steps
    end = {**proc_status(), "CacheFileRss": mapped_rss(Path(args.workdir) / "features.npy")}
    print(json.dumps({
        "mode": args.child, "dataset_type": dataset_type, "steps": steps, "samples": steps * args.batch,
        "epoch_seconds": seconds, "final_loss": state.last_loss if state is not None else None,
        "verify_seconds": verify_s, "after_verify": after_verify,
        "after_imports": after_imports, "before_epoch": before_epoch, "end": end,
        "peaks_sampled": sampler.peaks, "vmhwm": end["VmHWM"], "timeline": sampler.timeline,
        "torch_threads": torch.get_num_threads(), "loadavg_1min_start_end": [round(load_before, 2),
                                                                             round(os.getloadavg()[0], 2)],
    }))
    return 0


# ---------------------------------------------------------------------------------------------- main


def plot_timelines(runs: dict[str, Any], path: Path, args: argparse.Namespace) -> str | None:
    """RSS (total and anonymous) over the epoch for each reading mode, against the 1 GB target."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    colours = {"mmap": "tab:red", "recipe": "tab:blue"}
    for mode, r in runs.items():
        t = [p[0] for p in r["timeline"]]
        ax.plot(t, [p[1] / 2**20 for p in r["timeline"]], color=colours.get(mode), label=f"{mode}: total RSS")
        ax.plot(t, [p[2] / 2**20 for p in r["timeline"]], color=colours.get(mode), ls="--",
                label=f"{mode}: anonymous (RssAnon)")
    ax.axhline(TARGET_BYTES / 2**20, color="k", lw=0.8, ls=":", label="target 1 GB")
    ax.set_xlabel("seconds into the epoch")
    ax.set_ylabel("MiB")
    ax.set_title(f"Stage-2 H2T epoch over a {args.rows:,} x {args.dim} fp16 cache, batch {args.batch}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return str(path)



def thin(points: list, keep: int) -> list:
    """About ``keep`` evenly spaced points of a timeline, always including the last one."""
    step = max(1, len(points) // keep)
    return points[::step] + ([points[-1]] if points and (len(points) - 1) % step else [])


def mib(x: int) -> float:
    """Bytes to MiB (the table and JSON say MiB; the target is 10^9 bytes = 953.7 MiB)."""
    return round(x / 2**20, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--max-steps", type=int, default=None, help="stop the epoch early (default: whole epoch)")
    parser.add_argument("--chunk-rows", type=int, default=50_000)
    parser.add_argument("--workdir", default=None, help="where the cache is written (default: a new dir in /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the cache (reused by the next run)")
    parser.add_argument("--child", choices=MODES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory_cache_epoch.json"))
    args = parser.parse_args()
    if args.child:
        return child(args)

    import torch

    made_dir = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pih2t-memcache-"))
    size_bytes = args.rows * args.dim * 2
    if shutil.disk_usage(workdir.parent if made_dir else (workdir if workdir.exists() else workdir.parent)).free \
            < size_bytes * 1.1 and not cache_is_there(workdir, args.rows, args.dim):
        raise SystemExit(f"not enough free disk for a {size_bytes / 1e9:.2f} GB cache under {workdir}")
    load_start = [round(v, 2) for v in os.getloadavg()]
    runs: dict[str, Any] = {}
    try:
        if cache_is_there(workdir, args.rows, args.dim):
            write_s = None
            print(f"reusing the cache in {workdir}", flush=True)
        else:
            print(f"writing a {args.rows:,} x {args.dim} fp16 cache ({size_bytes / 1e9:.2f} GB) to {workdir} ...",
                  flush=True)
            write_s = write_cache(workdir, args.rows, args.dim, args.classes, args.chunk_rows)
        for mode in args.modes:
            print(f"epoch with {mode} reads ({args.rows // args.batch} steps of {args.batch} pairs) ...", flush=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--workdir", str(workdir),
                   "--batch", str(args.batch)]
            if args.max_steps:
                cmd += ["--max-steps", str(args.max_steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{mode} child failed:\n{proc.stderr[-3000:]}")
            runs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            for name in _OWN_FILES + tuple(n + ".tmp" for n in _OWN_FILES):
                with contextlib.suppress(FileNotFoundError):
                    (workdir / name).unlink()
            if made_dir:
                with contextlib.suppress(OSError):
                    workdir.rmdir()

    plot = plot_timelines(runs, Path(args.out).with_suffix(".png"), args) if runs else None
    summary = {}
    for mode, r in runs.items():
        peaks = r["peaks_sampled"]
        summary[mode] = {
            "epoch_seconds": round(r["epoch_seconds"], 2),
            "steps": r["steps"],
            "samples_per_second": round(r["samples"] / r["epoch_seconds"], 1),
            "peak_total_rss_vmhwm_mib": mib(r["vmhwm"]),
            "peak_rss_anon_mib": mib(peaks["RssAnon"]),
            "peak_rss_file_mib": mib(peaks["RssFile"]),
            "peak_rss_shmem_mib": mib(peaks.get("RssShmem", 0)),
            "cache_file_rss_peak_mib": mib(max(peaks["CacheFileRss"], r["end"]["CacheFileRss"])),
            "epoch_increment_mib": mib(r["vmhwm"] - r["before_epoch"]["VmRSS"]),
            "rss_after_imports_mib": mib(r["after_imports"]["VmRSS"]),
            "rss_before_epoch_mib": mib(r["before_epoch"]["VmRSS"]),
            "rss_anon_before_epoch_mib": mib(r["before_epoch"]["RssAnon"]),
            "dataset_type": r["dataset_type"],
            "peak_above_import_baseline_mib": mib(r["vmhwm"] - r["after_imports"]["VmRSS"]),
            "target_above_baseline_met": r["vmhwm"] - r["after_imports"]["VmRSS"] < TARGET_ABOVE_BASELINE,
            "verify_seconds": None if r["verify_seconds"] is None else round(r["verify_seconds"], 2),
            "verify_gb_per_second": round(size_bytes / 1e9 / r["verify_seconds"], 2) if r["verify_seconds"] else None,
            "target_met": r["vmhwm"] < TARGET_BYTES,
            "final_loss": round(r["final_loss"], 4),
            "loadavg_1min_start_end": r["loadavg_1min_start_end"],
        }
    result = {
        "benchmark": "memory_cache_epoch",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "rows": args.rows, "dim": args.dim, "dtype": "float16", "classes": args.classes, "batch_size": args.batch,
        "cache_bytes_on_disk": size_bytes, "cache_write_seconds": None if write_s is None else round(write_s, 1),
        "epoch": "H2T p=0.25, DualBranchSampler + DualBranchDataset, linear head, CE, SGD, train_loop "
                 "(accelerate, CPU)",
        "max_steps": args.max_steps,
        "target_bytes": TARGET_BYTES,
        "target_above_import_baseline_bytes": TARGET_ABOVE_BASELINE,
        "modes": summary,
        "target_met": {m: s["target_met"] for m, s in summary.items()},
        "target_above_baseline_met": {m: s["target_above_baseline_met"] for m, s in summary.items()},
        "note": "the machine was shared with other jobs (see the load averages): memory figures do not depend on "
                "the load, epoch and verify seconds do",
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "numpy": np.__version__,
                    "python": platform.python_version(), "platform": platform.platform(),
                    "memory_total_mib": mib(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
                    "loadavg_1_5_15_at_start": load_start,
                    "loadavg_1_5_15_at_end": [round(v, 2) for v in os.getloadavg()], "git": git_state()},
        "kept_cache": str(workdir) if args.keep else None,
        "plot": plot,
        "timelines_mib": {m: [[t, mib(v), mib(a), mib(f)] for t, v, a, f in thin(r["timeline"], 150)]
                          for m, r in runs.items()},
    }
    print(f"\nstage-2 epoch over a {args.rows:,} x {args.dim} fp16 memory-mapped cache ({size_bytes / 1e9:.2f} GB), "
          f"batch {args.batch}, H2T")
    print(f"  {'reads':<11}{'epoch s':>9}{'steps':>7}{'peak RSS':>10}{'RssAnon':>9}{'RssFile':>9}{'of cache':>10}"
          f"{'base':>7}{'epoch +':>9}  (MiB)  target < 1 GB (953.7 MiB)")
    for mode, s in summary.items():
        print(f"  {mode:<11}{s['epoch_seconds']:>9.1f}{s['steps']:>7}{s['peak_total_rss_vmhwm_mib']:>10.1f}"
              f"{s['peak_rss_anon_mib']:>9.1f}{s['peak_rss_file_mib']:>9.1f}{s['cache_file_rss_peak_mib']:>10.1f}"
              f"{s['rss_before_epoch_mib']:>7.1f}{s['epoch_increment_mib']:>9.1f}"
              f"  target met: {'yes' if s['target_met'] else 'no'}")
    for mode, s in summary.items():
        print(f"  {mode}: {s['dataset_type']}, peak {s['peak_above_import_baseline_mib']:.1f} MiB above the import "
              f"baseline (target < 300 MB = 286.1 MiB: {'yes' if s['target_above_baseline_met'] else 'no'})"
              + (f"; full SHA-256 verification of the cache {s['verify_seconds']} s ({s['verify_gb_per_second']} GB/s)"
                 if s["verify_seconds"] else ""))
    print("  peak RSS = VmHWM (total); RssAnon / RssFile = sampled peaks; of cache = RSS of the features.npy mapping;")
    print("  base = RSS before the first step (interpreter + torch + pih2t_hub imports + loader); "
          "epoch + = peak - base")
    print(f"  load average at start/end: {load_start[0]} / {result['machine']['loadavg_1_5_15_at_end'][0]}; per mode: "
          + ", ".join(f"{m} {s['loadavg_1min_start_end']}" for m, s in summary.items())
          + " (epoch seconds are only comparable at low load; the memory figures do not depend on it)")
    if not args.keep:
        print(f"  removed the cache in {workdir}")
    out = Path(args.out)
    write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
