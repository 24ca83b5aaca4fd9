"""Accuracy of every long-tailed method on real data with real pretrained weights, offline, by the fair comparison.

Each (setting, resolution) is one :func:`pih2t_hub.compare.compare` run: frozen ImageNet EfficientNet-Lite0
features, then every method with the same Optuna budget, each trial scored by stratified K-fold cross-validation on
the pooled train and validation rows (each fold trains its own linear CE head), its best configuration and its
published recipe retrained for every seed and evaluated on test once.

Settings (exp profile, 10 % of the long-tailed train split held out for validation):

* Fashion-MNIST-LT (Debian ``dataset-fashion-mnist``), balanced 10,000-image test split:
  A = n_max 6,000 at IR 100, B = n_max 6,000 at IR 10, C = n_max 1,000 at IR 100 (few-shot tail);
* digits-LT (scikit-learn): IR 10, 150 images in the head class, 20 test images per class.

Resolutions: 64 px for all, 128 px for A and C (the resolution changes the features, and with them which method
wins). Run::

    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/accuracy_longtail.py --settings digits,C --sizes 64 --jobs 2
    python benchmarks/render_results.py      # regenerates the README table from the JSON files

Writes ``benchmarks/results/compare_<setting>_<size>.json`` (the comparison report: per method the tuned and
default-recipe numbers per seed, mean ± std, chosen hyper-parameters, paired differences, wall time) and
``compare_<setting>_<size>.png``. Interrupted runs resume from the Optuna storage in ``--workdir``.

One thing is done *in this process only*, to save CPU without changing any number: the ``encode`` handed to the
feature cache is memoised by the exact bytes of each transformed input (and the backbone's weights), on disk in
``--workdir``: an image shared by several settings (the 10,000 test images, head-class images) goes through the
backbone once. The library still writes and verifies its own per-setting caches.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_state, machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS: dict[str, dict[str, Any]] = {
    "A": dict(dataset="fashion_mnist", imbalance_ratio=100.0, max_per_class=6000, test_per_class=1000),
    "B": dict(dataset="fashion_mnist", imbalance_ratio=10.0, max_per_class=6000, test_per_class=1000),
    "C": dict(dataset="fashion_mnist", imbalance_ratio=100.0, max_per_class=1000, test_per_class=1000),
    "digits": dict(dataset="digits", imbalance_ratio=10.0, max_per_class=150, test_per_class=20),
}
SIZES = {"A": (64, 128), "B": (64,), "C": (64, 128), "digits": (64,)}
COMMON = dict(backbone="effnet_lite0", pretrained=True, profile="exp", val_fraction=0.1, stage1_epochs=20,
              stage1_lr=0.1, batch_size=128, feature_dtype="float32")


class EncodeMemo:
    """Features by (weights, exact input bytes), kept on disk as safetensors between runs of this script."""

    def __init__(self, path: Path) -> None:
        from safetensors.torch import load_file

        self.path = path
        self.store: dict[str, torch.Tensor] = load_file(str(path)) if path.is_file() else {}
        self.hits = self.misses = 0

    def wrap(self, encode: Any, weights: str) -> Any:
        def memo_encode(x: torch.Tensor) -> torch.Tensor:
            keys = [hashlib.sha1(weights.encode() + row.contiguous().numpy().tobytes()).hexdigest() for row in x.cpu()]
            missing = [i for i, k in enumerate(keys) if k not in self.store]
            if missing:
                feats = encode(x[missing]).detach().cpu()
                self.store.update({keys[i]: f.clone() for i, f in zip(missing, feats)})
            self.hits += len(keys) - len(missing)
            self.misses += len(missing)
            return torch.stack([self.store[k] for k in keys])

        return memo_encode

    def save(self) -> None:
        from safetensors.torch import save_file

        tmp = self.path.with_suffix(".tmp")
        save_file(self.store, str(tmp))
        tmp.replace(self.path)


def install_memo(memo: EncodeMemo) -> None:
    """Route the library's feature extraction through the memo (this process only)."""
    import pih2t_hub.data.sources as sources  # load_splits looks load_dataset_any up in it at call time
    import pih2t_hub.training.cache as cache

    real_extract = cache.load_or_extract
    loaded: dict[tuple[str, str], Any] = {}
    real_load = sources.load_dataset_any

    def load_or_extract(encode, dataset, cache_dir, manifest, **kwargs):
        return real_extract(memo.wrap(encode, manifest["weights"]), dataset, cache_dir, manifest, **kwargs)

    def load_dataset_any(name, split="train", **kwargs):  # datasets are immutable (select/with_transform copy)
        key = (str(name), split)
        if key not in loaded or kwargs:
            loaded[key] = real_load(name, split=split, **kwargs)
        return loaded[key]

    cache.load_or_extract = load_or_extract
    sources.load_dataset_any = load_dataset_any


def run_setting(name: str, size: int, args: argparse.Namespace, memo: EncodeMemo) -> dict[str, Any]:
    from pih2t_hub.compare import CompareConfig, compare
    from pih2t_hub.training.config import RunConfig

    work = Path(args.workdir) / f"{name}_{size}"
    base = RunConfig(**COMMON, **SETTINGS[name], image_size=size, seed=0, output_dir=str(work),
                     cache_dir=str(Path(args.workdir) / "features" / f"{name}_{size}"))
    methods = args.methods.split(",") if args.methods else None
    cc = CompareConfig(methods=methods, trials=args.trials, seeds=args.seeds, max_epochs=args.max_epochs,
                       cv_folds=args.cv_folds, cv_repeats=args.cv_repeats, rescore=args.rescore, jobs=args.jobs,
                       progress=not args.no_progress)
    start = time.perf_counter()
    report = compare(base, cc, progress=not args.no_progress)
    memo.save()
    report["benchmark"] = {"setting": name, "image_size": size, "wall_time_s": round(time.perf_counter() - start, 1),
                           "machine": machine_info(), "git": git_state(), "memo_hits": memo.hits,
                           "memo_misses": memo.misses, "python": platform.python_version()}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"compare_{name}_{size}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=float))
    tmp.replace(out)
    shutil.copyfile(work / "accuracy_vs_frequency.png", RESULTS / f"compare_{name}_{size}.png")
    print(f"\n## {name} at {size} px ({report['benchmark']['wall_time_s']:.0f} s)\n")
    print((work / "comparison.md").read_text())
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="A,B,C,digits", help="comma-separated settings (default: all)")
    parser.add_argument("--sizes", default=None, help="comma-separated resolutions (default: 64 all, 128 for A and C)")
    parser.add_argument("--trials", type=int, default=16, help="tuning budget per method (default: 16)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the final retraining (default: 3)")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: every built-in method)")
    parser.add_argument("--max-epochs", type=int, default=None, help="cap on stage-2 epochs per trial")
    parser.add_argument("--cv-folds", type=int, default=5, help="folds of the cross-validation scoring every trial "
                        "(default: 5; 1: the validation split)")
    parser.add_argument("--cv-repeats", type=int, default=None, help="repeats of the cross-validation (default: 3 "
                        "with a few-shot tail, else 1)")
    parser.add_argument("--rescore", action="store_true", help="re-score every method's best trial and recipe on "
                        "fresh deals (the comparison's --rescore)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes fitting a trial's parts side by side "
                        "(the comparison's --jobs; scores do not depend on it)")
    parser.add_argument("--workdir", default="/tmp/pih2t_accuracy", help="studies, caches and the encode memo")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    memo = EncodeMemo(Path(args.workdir) / "encode_memo.safetensors")
    install_memo(memo)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    for name in args.settings.split(","):
        for size in (sizes or SIZES[name]):
            if size in SIZES[name] or sizes:
                run_setting(name, size, args, memo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
