"""Does PIF (PI-H2T's stage-1 layer) give more clustered features and wider class margins? An honest stage-1 study.

EfficientNet-Lite0 (ImageNet weights) is fine-tuned end to end on a long-tailed split, with and without PIF
(residual mode, starting from the identity, so both start from the same function), with the same budget and
seeds. Both then get the same stage 2 (H2T, p = 0.25, on cached features). Measured on the validation split with
the stage-1 backbone (test is read once per run, for the final numbers only):

* the stage-1 learning curve (validation balanced accuracy per epoch) — is the baseline still climbing?
* feature clustering: the ratio of mean intra-class to mean inter-class-centroid distance, and the silhouette
  score (Euclidean, on L2-normalised pooled features);
* per-class margins: the mean over validation samples of (true-class logit − best other logit), per class, and
  its mean over the few-shot classes;
* balanced / few-shot test accuracy after stage 1 and after the shared stage 2.

Run::

    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    nice -n 19 python benchmarks/pif_study.py --epochs 8 --seeds 0,1,2 --image-size 32

Writes ``benchmarks/results/pif_study.json`` and ``pif_study.png`` (curves, clustering, margins). Each finished run
is kept in ``--workdir`` and reused by a later invocation with the same settings, so an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_json  # noqa: E402

from pih2t_hub.methods import register_method  # noqa: E402
from pih2t_hub.methods.h2t import H2T  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SETTING = dict(dataset="fashion_mnist", imbalance_ratio=100.0, max_per_class=1000, profile="exp", val_fraction=0.1,
               backbone="effnet_lite0", pretrained=True, stage1_mode="finetune", stage2_mode="cached",
               stage1_lr=0.01, batch_size=64, stage2_batch_size=128)


@register_method("h2t_after_pif")
class H2TAfterPIF(H2T):
    """Stage 1 with the PIF layer, stage 2 plain H2T: isolates what PIF does to the representation."""

    paper = "study variant: PIF in stage 1, H2T in stage 2"
    summary = "PIF in stage 1, H2T (p = 0.25) in stage 2"
    stage1_pif = True


def clustering(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Intra/inter distance ratio and silhouette on L2-normalised features."""
    from sklearn.metrics import silhouette_score

    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    classes = np.unique(y)
    centroids = np.stack([z[y == c].mean(0) for c in classes])
    intra = np.mean([np.linalg.norm(z[y == c] - centroids[i], axis=1).mean() for i, c in enumerate(classes)])
    d = np.linalg.norm(centroids[:, None] - centroids[None], axis=-1)
    inter = d[np.triu_indices(len(classes), 1)].mean()
    return {"intra_inter_ratio": float(intra / inter), "silhouette": float(silhouette_score(z, y))}


def margins(logits: np.ndarray, y: np.ndarray, counts: np.ndarray) -> dict[str, Any]:
    """Per-class mean of (true logit − best other logit) on validation; few = classes with ≤ 20 train images."""
    true = logits[np.arange(len(y)), y]
    other = np.where(np.eye(logits.shape[1], dtype=bool)[y], -np.inf, logits).max(1)
    per_class = [float((true - other)[y == c].mean()) for c in range(logits.shape[1])]
    few = [m for m, n in zip(per_class, counts) if n <= 20]
    return {"per_class": per_class, "mean": float(np.mean(per_class)), "few": float(np.mean(few)) if few else None}


@torch.no_grad()
def val_features_and_logits(model_dir: Path, cfg: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pooled features and logits of the saved stage-1 model on the run's validation split (eval transform)."""
    from pih2t_hub.data.splits import load_splits
    from pih2t_hub.data.transforms import apply_transform, build_transform
    from pih2t_hub.models.pih2t import PIH2TForImageClassification

    model = PIH2TForImageClassification.from_pretrained(model_dir).eval()
    data = load_splits(cfg)
    val = apply_transform(data["val"], build_transform(model.config.backbone_data_config, train=False),
                          label_column=data["label_column"])
    feats, logits, labels = [], [], []
    for start in range(0, len(val), 128):
        batch = val[start:start + 128]
        x = torch.stack(list(batch["pixel_values"])) if isinstance(batch["pixel_values"], list) else batch["pixel_values"]
        pooled = model.pih2t.pool(model.pih2t.forward_features(x))
        feats.append(pooled.numpy())
        logits.append(model.classifier(pooled).numpy())
        labels.append(np.asarray(batch["labels"]))
    return np.concatenate(feats), np.concatenate(logits), np.concatenate(labels)


def one_run(variant: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Stage 1 (fine-tune, with or without PIF), the representation measured, then the same stage 2 (H2T)."""
    import dataclasses

    from pih2t_hub.training.config import RunConfig
    from pih2t_hub.training.run import run

    work = Path(args.workdir) / f"{variant}_s{seed}"
    stage1_method = "h2t_after_pif" if variant == "pif" else "h2t"
    cfg = RunConfig(**SETTING, method=stage1_method, seed=seed, image_size=args.image_size,
                    stage1_epochs=args.epochs, stage="1", output_dir=str(work / "stage1"))
    start = time.perf_counter()
    s1 = run(cfg)
    x, logits, y = val_features_and_logits(work / "stage1" / "model", cfg)
    counts = np.asarray(s1["class_counts"])
    s2 = run(dataclasses.replace(cfg, stage="2", method="h2t", init_from=str(work / "stage1" / "model"),
                                 stage2_epochs=10, output_dir=str(work / "stage2")))
    return {"variant": variant, "seed": seed, "wall_s": round(time.perf_counter() - start, 1),
            "stage1_curve": [h["val_balanced"] for h in s1["stage1"]["history"]], "stage1_test": s1["test"],
            "stage2_test": s2["test"], "clustering": clustering(x, y), "margins": margins(logits, y, counts), "counts": counts.tolist()}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std per variant of every scalar the study reports, and the paired PIF − no-PIF differences."""
    def agg(values: list[float]) -> dict[str, float]:
        return {"mean": float(np.mean(values)), "std": float(statistics.stdev(values)) if len(values) > 1 else 0.0}

    scalars = {
        "stage1_balanced": lambda r: r["stage1_test"]["balanced"], "stage1_few": lambda r: r["stage1_test"]["few"],
        "stage2_balanced": lambda r: r["stage2_test"]["balanced"], "stage2_few": lambda r: r["stage2_test"]["few"],
        "intra_inter_ratio": lambda r: r["clustering"]["intra_inter_ratio"],
        "silhouette": lambda r: r["clustering"]["silhouette"], "margin_mean": lambda r: r["margins"]["mean"],
        "margin_few": lambda r: r["margins"]["few"],
        "curve_last_gain": lambda r: r["stage1_curve"][-1] - r["stage1_curve"][-2],
    }
    out: dict[str, Any] = {}
    for variant in ("baseline", "pif"):
        rows = [r for r in runs if r["variant"] == variant]
        out[variant] = {k: agg([f(r) for r in rows]) for k, f in scalars.items()}
    pairs = [(a, b) for a in runs if a["variant"] == "pif" for b in runs if b["variant"] == "baseline"
             and b["seed"] == a["seed"]]
    out["pif_minus_baseline"] = {k: [f(a) - f(b) for a, b in pairs] for k, f in scalars.items()}
    return out


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for r in runs:
        style = "-" if r["variant"] == "pif" else "--"
        axes[0].plot(range(1, len(r["stage1_curve"]) + 1), [100 * v for v in r["stage1_curve"]], style,
                     label=f"{r['variant']} s{r['seed']}")
    axes[0].set(xlabel="stage-1 epoch", ylabel="val balanced %", title="stage-1 curve")
    axes[0].legend(fontsize=7)
    for i, key in enumerate(("intra_inter_ratio", "silhouette")):
        for j, variant in enumerate(("baseline", "pif")):
            vals = [r["clustering"][key] for r in runs if r["variant"] == variant]
            axes[1].scatter([i + 0.15 * (2 * j - 1)] * len(vals), vals, label=variant if i == 0 else None)
    axes[1].set_xticks([0, 1], ["intra/inter", "silhouette"])
    axes[1].set_title("clustering (val)")
    axes[1].legend()
    for r in runs:
        style = "-" if r["variant"] == "pif" else "--"
        order = np.argsort(-np.asarray(r["counts"]), kind="stable")  # head → tail
        axes[2].plot(np.asarray(r["margins"]["per_class"])[order], style)
    axes[2].set(xlabel="class, by training count (head → tail)", ylabel="mean logit margin", title="per-class margins (val)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def finished_run(variant: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run's result, from ``<workdir>/<variant>_s<seed>/result.json`` when an earlier invocation finished it
    with the same settings (a run takes many minutes on a CPU; the study resumes run by run). An unfinished run's
    folder is removed and the run starts over."""
    import shutil

    work = Path(args.workdir) / f"{variant}_s{seed}"
    record = work / "result.json"
    key = {"setting": SETTING, "image_size": args.image_size, "stage1_epochs": args.epochs}
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("key") == json.loads(json.dumps(key)):
            return saved["result"]
    shutil.rmtree(work, ignore_errors=True)
    result = one_run(variant, seed, args)
    write_json(record, {"key": key, "result": json.loads(json.dumps(result, default=float))})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8, help="stage-1 fine-tuning epochs (default: 8)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    parser.add_argument("--image-size", type=int, default=32, help="input resolution (default: 32)")
    parser.add_argument("--workdir", default="/tmp/pih2t_pif_study")
    parser.add_argument("--dataset", default=SETTING["dataset"], help="default: Fashion-MNIST-LT setting C")
    parser.add_argument("--max-per-class", type=int, default=SETTING["max_per_class"])
    parser.add_argument("--imbalance-ratio", type=float, default=SETTING["imbalance_ratio"])
    args = parser.parse_args(argv)
    SETTING.update(dataset=args.dataset, max_per_class=args.max_per_class, imbalance_ratio=args.imbalance_ratio)
    start = time.perf_counter()
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for variant in ("baseline", "pif"):
            r = finished_run(variant, seed, args)
            runs.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "margins"}, default=float))
    report = {"setting": {**SETTING, "image_size": args.image_size, "stage1_epochs": args.epochs,
                          "stage2": "h2t p=0.25, 10 epochs, cached"},
              "runs": runs, "summary": summary(runs), "wall_time_s": round(time.perf_counter() - start, 1),
              "machine": machine_info()}
    write_json(RESULTS / "pif_study.json", json.loads(json.dumps(report, default=float)))
    plot(runs, RESULTS / "pif_study.png")
    print(json.dumps(report["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
