"""GPU feature-extraction speed: the adapter against bare timm, fp32 and bf16, plus a cached stage-2 epoch.

For each of ``effnet_lite0`` (tf_efficientnet_lite0), ``resnet50`` and ``vit_base_timm`` (ViT-B/16,
vit_base_patch16_224) at 224 px, random weights (speed does not depend on them): images/s of the pooled features

* through the adapter: ``model.pih2t.pool(model.pih2t.forward_features(x))`` of ``pih2t_hub.create_model``
  (what ``load_or_extract`` calls in a run), and
* through bare timm: ``timm.create_model(<architecture>, num_classes=0)`` with the adapter's weights loaded,
  ``forward_head(forward_features(x), pre_logits=True)``;

under ``torch.inference_mode``, eval, in fp32 and under bf16 autocast, optionally channels_last (``--channels-last``
for the CNNs). The outputs of the two sides are checked equal first (fp32). ``--rounds`` interleaved rounds
(A B, B A, ...) of one batch each after ``--warmup`` batches, ``torch.cuda.synchronize`` around each; images/s from
the median batch time. Target: adapter >= 0.97x bare timm.

Then one cached H2T stage-2 epoch over 115,846 x 768 fp16 features (ImageNet-LT's size, 1,000 classes, long-tailed
labels), written with the package's ``write_cache`` and run through the recipe's own stage-2 function on the GPU
(``benchmarks/_stage2_epoch.py``), batch 512 pairs.

    python benchmarks/gpu_extraction.py              # on a machine with a CUDA GPU: ~2-4 min; writes the JSON
    python benchmarks/gpu_extraction.py --smoke      # tiny models, 64 px, on CPU: checks that the script runs

Without a GPU (and without ``--smoke``) it stops: GPU numbers are pending until it is run on one. The JSON
(``benchmarks/results/gpu_extraction.json``) names the GPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from _common import machine_info, write_json  # noqa: E402  (this folder is on sys.path)

TARGET = 0.97
MODELS = ("effnet_lite0", "resnet50", "vit_base_timm")
SMOKE_MODELS = ("test_efficientnet", "test_resnet", "test_vit")
STAGE2_ROWS, STAGE2_DIM, STAGE2_CLASSES = 115_846, 768, 1000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_pair(name: str, device: torch.device, channels_last: bool) -> tuple[Callable, Callable, int]:
    """(adapter forward, bare-timm forward, image size) for one backbone, same random weights on both sides."""
    import timm

    from pih2t_hub import create_model

    model = create_model(name, num_labels=10, pretrained=False).eval()
    adapter = model.pih2t
    inner = adapter.backbone.model
    bare = timm.create_model(inner.pretrained_cfg["architecture"], pretrained=False, num_classes=0).eval()
    bare.load_state_dict(inner.state_dict())
    memory = torch.channels_last if channels_last else torch.contiguous_format
    adapter.to(device, memory_format=memory)
    bare.to(device, memory_format=memory)
    size = int(model.config.backbone_data_config["input_size"][-1])

    def run_adapter(x: torch.Tensor) -> torch.Tensor:
        return adapter.pool(adapter.forward_features(x))

    def run_bare(x: torch.Tensor) -> torch.Tensor:
        return bare.forward_head(bare.forward_features(x), pre_logits=True)

    return run_adapter, run_bare, size


def time_pair(sides: dict[str, Callable], x: torch.Tensor, autocast: torch.dtype | None, rounds: int,
              warmup: int) -> dict[str, list[float]]:
    device = x.device
    ctx = (lambda: torch.autocast(device.type, dtype=autocast)) if autocast else contextlib.nullcontext

    def once(name: str) -> float:
        _sync(device)
        start = time.perf_counter()
        with torch.inference_mode(), ctx():
            sides[name](x)
        _sync(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        for name in sides:
            once(name)
    times: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(once(name))
    return times


def extraction(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in (SMOKE_MODELS if args.smoke else MODELS):
        cnn = "vit" not in name
        run_adapter, run_bare, size = build_pair(name, device, args.channels_last and cnn)
        size = args.image_size or size
        x = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        if args.channels_last and cnn:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            diff = float((run_adapter(x[:4]).float() - run_bare(x[:4]).float()).abs().max())
        if diff > 1e-3:
            raise RuntimeError(f"{name}: adapter and bare timm disagree by {diff}; the comparison is meaningless")
        entry: dict[str, Any] = {"image_size": size, "batch_size": args.batch, "outputs_max_abs_diff_fp32": diff,
                                 "channels_last": bool(args.channels_last and cnn)}
        for precision, autocast in (("fp32", None), ("bf16", torch.bfloat16)):
            times = time_pair({"adapter": run_adapter, "bare_timm": run_bare}, x, autocast, args.rounds, args.warmup)
            ips = {k: args.batch / statistics.median(v) for k, v in times.items()}
            ratio = ips["adapter"] / ips["bare_timm"]
            entry[precision] = {"images_per_second": {k: round(v, 1) for k, v in ips.items()},
                                "ratio_adapter_to_bare": round(ratio, 4), "within_3_percent": ratio >= TARGET}
            print(f"  {name:<18}{precision:<6}{ips['adapter']:>12.1f}{ips['bare_timm']:>12.1f}{ratio:>9.3f}"
                  f"  {'ok' if ratio >= TARGET else 'below 0.97'}", flush=True)
        results[name] = entry
        del run_adapter, run_bare
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def stage2(args: argparse.Namespace, device: torch.device, workdir: Path) -> dict[str, Any]:
    """A cached H2T stage-2 epoch over ImageNet-LT-sized features (synthetic), through the recipe's code."""
    from _stage2_epoch import stage2_epoch
    from accelerate import Accelerator

    from pih2t_hub.data.features import FORMAT_VERSION, write_cache

    rows, dim, classes = (2000, 64, 20) if args.smoke else (STAGE2_ROWS, STAGE2_DIM, STAGE2_CLASSES)
    rng = np.random.default_rng(0)
    weights = 100.0 ** (-np.arange(classes) / (classes - 1))
    labels = rng.choice(classes, size=rows, p=weights / weights.sum())
    request = {"backbone": "synthetic", "weights": "none", "transform": "none", "dataset": f"synthetic-{rows}x{dim}",
               "num_samples": rows, "dtype": "float16", "num_views": 1, "shard_size": 4096, "seed": 0,
               "format_version": FORMAT_VERSION, "autocast": None, "channels_last": False}

    def parts():
        for lo in range(0, rows, 16384):
            hi = min(rows, lo + 16384)
            yield rng.standard_normal((hi - lo, dim), dtype=np.float32).astype(np.float16), labels[lo:hi]

    write_cache(workdir, request, parts(), (dim,), extracted_on="synthetic")
    accelerator = Accelerator(cpu=device.type != "cuda")
    with contextlib.redirect_stderr(open(os.devnull, "w")):
        state, seconds, dataset_type = stage2_epoch(workdir, accelerator, args.stage2_batch)
    steps = state.global_step
    print(f"  stage-2 epoch (H2T, cached, {rows:,} x {dim} fp16, {classes} classes, batch {args.stage2_batch}): "
          f"{seconds:.2f} s, {steps} steps, {rows / seconds:,.0f} samples/s ({dataset_type})", flush=True)
    return {"rows": rows, "dim": dim, "classes": classes, "batch_size": args.stage2_batch, "steps": steps,
            "epoch_seconds_including_validation": round(seconds, 3), "dataset_type": dataset_type,
            "final_loss": round(float(state.last_loss), 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models at 64 px on CPU, 2 rounds: the script runs")
    parser.add_argument("--batch", type=int, default=None, help="default 256 on GPU, 4 in --smoke")
    parser.add_argument("--image-size", type=int, default=None, help="default: the model's own (224); 64 in --smoke")
    parser.add_argument("--rounds", type=int, default=None, help="default 20 (2 in --smoke)")
    parser.add_argument("--warmup", type=int, default=None, help="default 5 (1 in --smoke)")
    parser.add_argument("--channels-last", action="store_true", help="CNNs in channels_last on both sides")
    parser.add_argument("--stage2-batch", type=int, default=512)
    parser.add_argument("--out", default=None, help="default benchmarks/results/gpu_extraction.json (GPU runs only)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("no CUDA GPU here: GPU numbers are pending; run this on a GPU machine (or --smoke to check the script)")
        return 2
    device = torch.device("cuda" if cuda and not args.smoke else "cpu")
    args.batch = args.batch or (4 if args.smoke else 256)
    args.image_size = args.image_size or (64 if args.smoke else None)
    args.rounds = args.rounds or (2 if args.smoke else 20)
    args.warmup = args.warmup or (1 if args.smoke else 5)
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else None
    print(f"device: {gpu or 'CPU (smoke run: GPU numbers are pending)'}")
    print(f"  {'backbone':<18}{'prec':<6}{'adapter/s':>12}{'timm/s':>12}{'ratio':>9}")
    machine = machine_info()
    result = {"benchmark": "gpu_extraction", "command": "python " + " ".join([Path(sys.argv[0]).as_posix(),
                                                                             *sys.argv[1:]]),
              "gpu": gpu, "smoke": args.smoke, "device": str(device), "machine": machine,
              "cuda": torch.version.cuda, "target_ratio": TARGET}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    result["extraction"] = extraction(args, device)
    with tempfile.TemporaryDirectory(prefix="pih2t-gpu-") as tmp:
        result["stage2_epoch"] = stage2(args, device, Path(tmp))
    result["all_within_3_percent"] = all(e[p]["within_3_percent"] for e in result["extraction"].values()
                                         for p in ("fp32", "bf16"))
    if args.smoke:
        print("smoke run on CPU: these are not GPU numbers (GPU numbers are pending)")
    out = args.out or (None if args.smoke else str(Path(__file__).parent / "results" / "gpu_extraction.json"))
    if out:
        write_json(Path(out), result)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
