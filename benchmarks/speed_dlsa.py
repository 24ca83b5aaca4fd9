"""One DLSA fit against one CE fit on the same cached features, and DLSA's fast path against its reference path.

The features are the comparison's own (``benchmarks/accuracy_longtail.py``'s settings: frozen ImageNet
EfficientNet-Lite0, 10 % of the long-tailed train split held out for validation), built through
:class:`pih2t_hub.compare.Bench`, which also trains the stage-1 linear head of every seed. In one process, on one
thread:

* **CE**: the comparison's CE trial with its published recipe (``Bench.fit``), the yardstick of a cheap method;
* **DLSA, reference path**: ``flow_fast_path=False, flow_patience=None``: dense masked products, positives and
  negatives through the flow in two passes, every flow epoch (the arithmetic of the previous implementation);
* **DLSA, fast path**: the defaults: block-sparse masked products, one flow pass per pair batch, early stopping
  with ``flow_patience`` (docs/methods.md, DLSA).

Each DLSA fit is what the DLSA method runs after stage 1 (``fit_dlsa`` on the train / validation features, the
seed's stage-1 head as initialisation) and is scored once on the test features (balanced accuracy), so the two
paths are compared on accuracy as well as time. Time is process CPU time (the machine is shared; wall time is
recorded too). Run from the repository root::

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/speed_dlsa.py --setting C --seeds 1
    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/speed_dlsa.py --setting digits --seeds 3

Writes ``benchmarks/results/speed_dlsa_<setting>_<size>.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, git_state, machine_info, write_json  # noqa: E402

PATHS = {
    "reference": {"flow_fast_path": False, "flow_patience": None},
    "fast": {},
}
TARGET_S = 120.0


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, process CPU seconds, wall seconds)."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def balanced_accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over the classes present in ``y`` of the fraction of their samples predicted correctly."""
    recalls = [float((pred[y == c] == c).double().mean()) for c in torch.unique(y).tolist()]
    return sum(recalls) / len(recalls)


def make_bench(setting: str, size: int, seeds: int, workdir: Path) -> Any:
    from accuracy_longtail import COMMON, SETTINGS

    from pih2t_hub.compare import Bench
    from pih2t_hub.training.cache import extract_features
    from pih2t_hub.training.config import RunConfig

    base = RunConfig(**COMMON, **SETTINGS[setting], image_size=size, seed=0, output_dir=str(workdir / "run"),
                     cache_dir=str(workdir / "features" / f"{setting}_{size}"))
    bench = Bench(base, seeds=seeds, progress=False)
    extract_features(bench.ctx, ("test",))
    return bench


def tensors(bench: Any, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = bench.ctx.features[split].tensors[:2]
    return torch.as_tensor(x).float().clone(), torch.as_tensor(y).long().clone()


def dlsa_fit(bench: Any, path: str, seed: int) -> dict[str, Any]:
    from pih2t_hub.methods.dlsa import DLSAConfig, fit_dlsa

    (xtr, ytr), (xva, yva), (xte, yte) = (tensors(bench, s) for s in ("train", "val", "test"))
    head = bench.heads[seed]
    bias = getattr(head, "bias", None)
    config = DLSAConfig(**PATHS[path])
    model, cpu, wall = timed(lambda: fit_dlsa(
        xtr, ytr, xva, yva, config, seed=seed, stage1_weight=head.weight.detach(),
        stage1_bias=None if bias is None else bias.detach()))
    with torch.no_grad():
        test_bal = balanced_accuracy(model.predict(xte), yte)
        val_bal = balanced_accuracy(model.predict(xva), yva)
    depth = model.history[0]
    return {"path": path, "seed": seed, "cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
            "test_balanced": round(test_bal, 4), "val_balanced": round(val_bal, 4),
            "flow_epochs_run": depth["flow_epochs_run"], "flow_best_epoch": depth["flow_best_epoch"],
            "flow_epoch_scores": depth["flow_epoch_scores"], "flow_lr": depth["flow_lr"]}


def ce_fit(bench: Any, seed: int) -> dict[str, Any]:
    from pih2t_hub.compare import Candidate

    (_, val, _), cpu, wall = timed(lambda: bench.fit(Candidate("ce", "ce"), {}, seed))
    return {"seed": seed, "cpu_s": round(cpu, 3), "wall_s": round(wall, 3), "val_balanced": round(val["balanced"], 4)}


def summary(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    values = torch.tensor([float(r[key]) for r in rows], dtype=torch.float64)
    std = float(values.std()) if len(values) > 1 else 0.0
    return {"mean": round(float(values.mean()), 4), "std": round(std, 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="C", choices=("A", "B", "C", "digits"))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=1, help="DLSA fits per path (seeds 0..n-1)")
    parser.add_argument("--paths", default="reference,fast", help="comma-separated: reference, fast")
    parser.add_argument("--workdir", default="/tmp/pih2t_dlsa_bench")
    args = parser.parse_args(argv)
    paths = args.paths.split(",")
    bad = [p for p in paths if p not in PATHS]
    if bad or args.seeds < 1:
        print(f"error: unknown path(s) {bad}; choose from {sorted(PATHS)}" if bad else "error: --seeds must be >= 1",
              file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    machine = machine_info()
    machine["git_at_start"] = git_state()
    bench, build_cpu, build_wall = timed(lambda: make_bench(args.setting, args.size, args.seeds, Path(args.workdir)))
    xtr, ytr = tensors(bench, "train")
    ce = [ce_fit(bench, s % args.seeds) for s in range(3)]
    print(f"features: train {tuple(xtr.shape)}, classes {torch.bincount(ytr).tolist()}; "
          f"CE fit {min(r['cpu_s'] for r in ce):.2f} s CPU", flush=True)
    out = ROOT / "benchmarks" / "results" / f"speed_dlsa_{args.setting}_{args.size}.json"
    fits: list[dict[str, Any]] = []
    # seed 0 of every path first (the timing), then the other seeds, fast path first (the cheaper accuracy check)
    order = [(0, p) for p in paths] + [(s, p) for p in sorted(paths) for s in range(1, args.seeds)]
    for seed, path in order:
        fits.append(dlsa_fit(bench, path, seed))
        r = fits[-1]
        print(f"DLSA {path:9s} seed {seed}: {r['cpu_s']:7.1f} s CPU ({r['wall_s']:.0f} s wall), flow epochs "
              f"{r['flow_epochs_run']} (best {r['flow_best_epoch']}), test balanced {r['test_balanced']:.4f}",
              flush=True)
        report = make_report(args, paths, xtr, ytr, (build_cpu, build_wall), ce, fits, machine)
        write_json(out, report)  # after every fit: an interrupted run keeps what it measured
    for p, s in report["summary"].items():
        print(f"{p:9s}: {s['cpu_s']['mean']:.1f} s CPU per fit ({s['cpu_vs_ce']}x CE), test balanced "
              f"{s['test_balanced']['mean']:.4f} ± {s['test_balanced']['std']:.4f}")
    if "fast" in report["summary"]:
        print(f"target (fast path <= {TARGET_S:.0f} s CPU per fit): {'yes' if report['target_met'] else 'no'}")
    return 0


def make_report(args: argparse.Namespace, paths: list[str], xtr: torch.Tensor, ytr: torch.Tensor,
                build: tuple[float, float], ce: list[dict[str, Any]], fits: list[dict[str, Any]],
                machine: dict[str, Any]) -> dict[str, Any]:
    ce_cpu = min(r["cpu_s"] for r in ce)
    per_path = {}
    for p in paths:
        rows = [f for f in fits if f["path"] == p]
        if rows:
            cpu = summary(rows, "cpu_s")
            per_path[p] = {"fits": len(rows), "cpu_s": cpu, "test_balanced": summary(rows, "test_balanced"),
                           "flow_epochs_run": summary(rows, "flow_epochs_run"),
                           "cpu_vs_ce": round(cpu["mean"] / ce_cpu, 1)}
    return {
        "setting": args.setting, "image_size": args.size, "seeds": args.seeds,
        "features": {"train": list(xtr.shape), "train_class_counts": torch.bincount(ytr).tolist(),
                     "source": "effnet_lite0 ImageNet weights, accuracy_longtail.py settings"},
        "feature_build_s": {"cpu": round(build[0], 1), "wall": round(build[1], 1)},
        "timing": "process CPU time, torch.set_num_threads(1), nice -n 5 on a shared 2-core machine",
        "paths": PATHS, "ce_fits": ce, "dlsa_fits": fits, "summary": per_path, "target_s": TARGET_S,
        "target_met": "fast" in per_path and per_path["fast"]["cpu_s"]["mean"] <= TARGET_S,
        "machine": machine, "git": git_state(), "command": " ".join(["python", *sys.argv]),
    }


if __name__ == "__main__":
    sys.exit(main())
