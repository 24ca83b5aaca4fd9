"""Stage-1 retrofits compared on the same long-tailed data: linear probe, full fine-tuning and lightweight
fine-tuning (LoRA, BitFit; AdaptFormer and VPT on a ViT), each followed by the same stage 2.

Every arm is one ``recipes/finetune.py`` run (:func:`pih2t_hub.training.run.run`) on Fashion-MNIST-LT setting C
(n_max 1,000, IR 100, exp profile, 10 % validation, balanced 10,000-image test split) with the offline pretrained
EfficientNet-Lite0, the same stage-1 epochs for every arm, then H2T with its recipe on the cached features of the
backbone the arm produced. Arms:

* ``linear``: linear probe of the frozen backbone (the project's stage 1: CE, lr 0.1);
* ``full``: the whole backbone fine-tuned end to end (CE, lr 0.1);
* ``lora`` / ``bitfit`` (and ``adaptformer`` / ``vpt`` on a ViT): ``--stage1-mode peft`` with LIFT's recipe
  (cosine head from class means, logit-adjusted loss, lr 0.01); LoRA on the ungrouped convolutions of the CNN.

Recorded per arm and seed: balanced, many / medium / few accuracy on test after stage 1 and after stage 2, the
trainable backbone parameters, wall and process time. CPU (default; what this machine affords)::

    nice -n 5 python benchmarks/peft_longtail.py            # 32 px, 3 epochs, 3 seeds
    python benchmarks/render_results.py                    # the README block

GPU (``--gpu``: 224 px, 10 epochs, mixed precision; ``--backbone vit_small`` adds AdaptFormer and VPT arms where
its weights are cached)::

    python benchmarks/peft_longtail.py --gpu --backbone vit_small --out benchmarks/results/peft_longtail_gpu_vit.json

Writes ``benchmarks/results/peft_longtail.json`` (or ``--out``) after every arm, so an interrupted run keeps what
it finished and ``--resume`` skips those arms.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SETTING_C = dict(dataset="fashion_mnist", imbalance_ratio=100.0, max_per_class=1000, test_per_class=1000,
                 profile="exp", val_fraction=0.1)
SMOKE = dict(dataset="digits", imbalance_ratio=10.0, max_per_class=60, test_per_class=20, profile="exp",
             val_fraction=0.1)
CNN_ARMS = ("linear", "full", "lora", "bitfit")
VIT_ARMS = ("linear", "full", "lora", "bitfit", "adaptformer", "vpt")
STAGE2 = "h2t"


def arm_config(arm: str, seed: int, args: argparse.Namespace, workdir: Path) -> Any:
    """The run's config for one arm: shared data, backbone, epochs and stage 2; the arm's own stage 1."""
    from pih2t_hub.training.config import RunConfig

    base = dict(SMOKE if args.smoke else SETTING_C, backbone=args.backbone, pretrained=not args.smoke,
                image_size=args.size, batch_size=128,
                stage1_epochs=args.epochs, stage1_lr=0.1, method=STAGE2, stage="both", stage2_mode="cached",
                mixed_precision=args.mixed_precision, seed=seed, output_dir=str(workdir / f"{arm}_s{seed}"),
                cache_dir=str(workdir / f"{arm}_s{seed}" / "features"))
    if arm == "linear":
        return RunConfig(**base, stage1_mode="linear")
    if arm == "full":
        return RunConfig(**base, stage1_mode="finetune")
    return RunConfig(**base, stage1_mode="peft", peft=arm, peft_rank=args.rank if arm == "lora" else None)


def run_arm(arm: str, seed: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One run; its test numbers after each stage, trainable parameters and times."""
    import torch

    from pih2t_hub.training.run import run

    cfg = arm_config(arm, seed, args, workdir)
    wall, cpu = time.perf_counter(), time.process_time()
    results = run(cfg)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    from pih2t_hub.models.pih2t import PIH2TForImageClassification

    model = PIH2TForImageClassification.from_pretrained(Path(cfg.output_dir) / "model")
    tuning = model.config.tuning or {}
    backbone_params = sum(p.numel() for p in model.get_backbone().parameters())
    trainable = {"linear": 0, "full": backbone_params}.get(arm, tuning.get("trainable_params"))
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"arm": arm, "seed": seed, "stage1_test": results["stage1"]["test"], "test": results["test"],
            "trainable_backbone_params": trainable, "backbone_params": backbone_params,
            "trainable_percent": round(100.0 * trainable / backbone_params, 4), "tuning": tuning or None,
            "stage1_best_epoch": results["stage1"]["best_epoch"], "wall_s": round(wall, 1),
            "process_s": round(cpu, 1), "class_counts": results["class_counts"]}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds of every number, per arm."""
    import numpy as np

    out: dict[str, Any] = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        rows = [r for r in runs if r["arm"] == arm]
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in rows],
                                 "trainable_backbone_params": rows[0]["trainable_backbone_params"],
                                 "trainable_percent": rows[0]["trainable_percent"]}
        for stage in ("stage1_test", "test"):
            for key in ("balanced", "many", "medium", "few"):
                values = np.array([r[stage][key] for r in rows], dtype=float)
                entry[f"{stage}_{key}"] = {"mean": float(np.nanmean(values)), "std": float(np.nanstd(values))}
        for key in ("wall_s", "process_s"):
            entry[f"{key}_mean"] = float(np.mean([r[key] for r in rows]))
        out[arm] = entry
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backbone", default="effnet_lite0")
    p.add_argument("--arms", default=None, help="comma-separated; default: the kinds that apply to the backbone")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--size", type=int, default=32, help="input resolution in pixels")
    p.add_argument("--epochs", type=int, default=3, help="stage-1 epochs, the same for every arm")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    p.add_argument("--gpu", action="store_true", help="GPU preset: 224 px, 10 epochs (LIFT's), bf16")
    p.add_argument("--workdir", default="/tmp/pih2t_peft_bench")
    p.add_argument("--out", default=str(RESULTS / "peft_longtail.json"))
    p.add_argument("--resume", action="store_true", help="keep the arms --out already holds")
    p.add_argument("--smoke", action="store_true", help="the code path only: tiny digits-LT, random weights, "
                   "1 epoch, seed 0 (e.g. --backbone test_vit for every arm); writes to the workdir")
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs, args.seeds, args.out = 1, "0", str(Path(args.workdir) / "smoke.json")
    if args.gpu:
        args.size, args.epochs, args.mixed_precision = 224, 10, "bf16"
    return args


def main(argv: list[str] | None = None) -> int:
    from pih2t_hub._tuning_names import backbone_is_vit

    args = parse(argv)
    arms = args.arms.split(",") if args.arms else list(VIT_ARMS if backbone_is_vit(args.backbone) else CNN_ARMS)
    seeds = [int(s) for s in args.seeds.split(",")]
    out, workdir = Path(args.out), Path(args.workdir)
    runs = json.loads(out.read_text())["runs"] if args.resume and out.is_file() else []
    done = {(r["arm"], r["seed"]) for r in runs}
    setting = SMOKE if args.smoke else SETTING_C
    setup = {"setting": "digits-LT (smoke)" if args.smoke else "Fashion-MNIST-LT C", **setting,
             "backbone": args.backbone, "image_size": args.size,
             "stage1_epochs": args.epochs, "lora_rank": args.rank, "stage2": STAGE2, "arms": arms, "seeds": seeds,
             "mixed_precision": args.mixed_precision, "command": "python benchmarks/peft_longtail.py "
             + " ".join(sys.argv[1:] if argv is None else argv)}
    machine = machine_info()
    for seed in seeds:
        for arm in arms:
            if (arm, seed) in done:
                continue
            t0 = time.perf_counter()
            runs.append(run_arm(arm, seed, args, workdir))
            print(f"{arm} seed {seed}: balanced {100 * runs[-1]['test']['balanced']:.2f} "
                  f"(stage 1 {100 * runs[-1]['stage1_test']['balanced']:.2f}) in {time.perf_counter() - t0:.0f} s",
                  flush=True)
            write_json(out, {"setup": setup, "machine": machine, "runs": runs, "summary": summary(runs)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
