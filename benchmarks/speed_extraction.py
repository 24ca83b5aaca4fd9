"""Feature-extraction speed: the adapter against bare timm, the whole input pipeline against the forward alone,
and one process against two.

**adapter** (2c). Both sides compute the pooled 1,280-d features of ``tf_efficientnet_lite0`` with
the *same* ImageNet weights:

* adapter: ``model.pih2t.pool(model.pih2t.forward_features(x))`` of ``create_model("effnet_lite0", ...)``
  (what ``load_or_extract`` calls in a run);
* bare timm: ``timm.create_model("tf_efficientnet_lite0", num_classes=0)`` with the adapter's state dict loaded,
  ``forward_head(forward_features(x), pre_logits=True)``.

The outputs are checked to be equal first. Timing: after warm-up, ``--rounds`` rounds of one batch per side,
alternating which side goes first (A B, B A, A B, ...), so that a drift in machine speed hits both sides alike;
throughput is images / median batch time. Target: adapter >= 0.97x bare timm. FLOPs: counted with
``torch.utils.flop_counter.FlopCounterMode`` on one image (conv + matmul, 2 FLOPs per multiply-add).

**pipeline**. ``--pipeline-images`` synthetic JPEGs (256 x 256, smooth random colour fields) in a
``datasets.Dataset`` ``Image`` column, through the package's whole path: ``apply_transform`` (decode, resize,
crop, normalise: the model's eval transform) -> ``load_or_extract`` (DataLoader, forward under inference mode,
shards, consolidation with checksums) into a fresh cache directory; against the *forward alone* on the same,
pre-decoded tensors (already in memory, same batches). Ratio = pipeline throughput / forward throughput, for 0
workers (decoding in the forward's thread) and for ``--workers`` workers. Both total (start-up, consolidation
included) and steady state (from the end of the first batch to the end of the last). Torch runs
``--threads`` threads in the main process. Order F P0 PN PN P0 F (each twice), medians.

**processes**. The same pipeline over the same JPEGs (saved with ``save_to_disk``) under ``torchrun`` with 1 and
with 2 processes (gloo), 1 torch thread and 0 workers per process; each rank times its ``load_or_extract`` from a
common barrier, throughput = images / slowest rank. The two caches are checked byte-identical.

    python benchmarks/speed_extraction.py            # ~3 min on 2 idle cores

Prints a table and writes ``benchmarks/results/speed_extraction.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from _common import machine_info, write_json  # noqa: E402  (this folder is on sys.path)

TARGET = 0.97


def count_flops(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        fn(x)
    return int(counter.get_total_flops())


def adapter_section(args: argparse.Namespace, model) -> dict:
    """Adapter against bare timm on the same weights, interleaved rounds (item 2c)."""
    import timm

    adapter = model.pih2t
    bare = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    bare.load_state_dict(adapter.backbone.model.state_dict())

    def run_adapter(x: torch.Tensor) -> torch.Tensor:
        return adapter.pool(adapter.forward_features(x))

    def run_bare(x: torch.Tensor) -> torch.Tensor:
        return bare.forward_head(bare.forward_features(x), pre_logits=True)

    size = args.image_size
    x = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = run_adapter(x[:4]), run_bare(x[:4])
    max_diff = float((a - b).abs().max())
    if a.shape != b.shape or max_diff > 1e-4:
        raise RuntimeError(f"adapter and bare timm disagree (shape {tuple(a.shape)} vs {tuple(b.shape)}, "
                           f"max |diff| {max_diff}); the comparison would be meaningless")
    flops_per_image = count_flops(run_bare, x[:1])
    sides = {"adapter": run_adapter, "bare_timm": run_bare}
    times: dict[str, list[float]] = {"adapter": [], "bare_timm": []}

    def once(name: str) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            sides[name](x)
        return time.perf_counter() - start

    for _ in range(args.warmup):
        once("adapter")
        once("bare_timm")
    print(f"adapter: timing {args.rounds} A/B rounds of batch {args.batch} at {size} px ...", flush=True)
    for r in range(args.rounds):  # A B, B A, A B, ...: cancels a linear drift
        for name in (("adapter", "bare_timm") if r % 2 == 0 else ("bare_timm", "adapter")):
            times[name].append(once(name))
    med = {k: statistics.median(v) for k, v in times.items()}
    ips = {k: args.batch / v for k, v in med.items()}
    pair_ratios = [tb / ta for ta, tb in zip(times["adapter"], times["bare_timm"])]
    ratio = ips["adapter"] / ips["bare_timm"]
    result = {
        "backbone": "tf_efficientnet_lite0 (" + ("random" if args.random_weights else "ImageNet") + " weights)",
        "image_size": size, "batch_size": args.batch, "rounds": args.rounds,
        "mode": "torch.inference_mode, eval, float32, CPU", "outputs_max_abs_diff": max_diff,
        "flops_per_image_g": round(flops_per_image / 1e9, 4),
        "median_batch_seconds": {k: round(v, 5) for k, v in med.items()},
        "images_per_second": {k: round(v, 2) for k, v in ips.items()},
        "achieved_gflops_per_second": {k: round(flops_per_image * v / 1e9, 2) for k, v in ips.items()},
        "throughput_ratio_adapter_to_bare": round(ratio, 4),
        "throughput_ratio_median_of_pairs": round(statistics.median(pair_ratios), 4),
        "target_ratio": TARGET, "target_met": ratio >= TARGET,
    }
    print(f"  {'path':<12}{'ms/batch':>10}{'images/s':>11}")
    for k in ("adapter", "bare_timm"):
        print(f"  {k:<12}{1e3 * med[k]:>10.1f}{ips[k]:>11.1f}")
    met = "yes" if result["target_met"] else "no"
    print(f"  adapter / bare throughput: {ratio:.4f}  target >= {TARGET}  met: {met}")
    return result


# ---------------------------------------------------------------------------------------------- pipeline


def jpeg_dataset(n: int, size: int = 256, classes: int = 10):
    """``n`` JPEG-encoded smooth random colour fields in a ``datasets.Dataset`` (decoded lazily, like real data)."""
    import io

    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(n):
        small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        image = PILImage.fromarray(small).resize((size, size), PILImage.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    features = Features({"image": Image(), "label": ClassLabel(num_classes=classes)})
    return Dataset.from_dict({"image": encoded, "label": [i % classes for i in range(n)]}, features=features)


class TimedEncode:
    """The extraction's ``encode``: the adapter's pooled features, with the end time of every batch recorded."""

    def __init__(self, adapter) -> None:
        self.adapter, self.ends, self.images = adapter, [], 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.adapter.pool(self.adapter.forward_features(x))
        self.ends.append(time.perf_counter())
        self.images += len(x)
        return out


def pipeline_once(model, ds, transform, workers: int, batch: int, workdir: Path) -> dict:
    from pih2t_hub.data import apply_transform, load_or_extract

    encode = TimedEncode(model.pih2t)
    manifest = {"backbone": "effnet_lite0", "weights": "benchmark", "transform": repr(transform)}
    start = time.perf_counter()
    load_or_extract(encode, apply_transform(ds, transform, image_column="image", label_column="label"), workdir,
                    manifest, batch_size=batch, num_workers=workers, progress=False)
    total = time.perf_counter() - start
    steady = (encode.images - batch) / (encode.ends[-1] - encode.ends[0]) if len(encode.ends) > 1 else None
    return {"images_per_second": len(ds) / total, "steady_images_per_second": steady}


def forward_once(model, tensors: torch.Tensor, batch: int) -> dict:
    adapter, ends = model.pih2t, []
    start = time.perf_counter()
    with torch.inference_mode():
        for k in range(0, len(tensors), batch):
            adapter.pool(adapter.forward_features(tensors[k : k + batch]))
            ends.append(time.perf_counter())
    total = time.perf_counter() - start
    steady = (len(tensors) - batch) / (ends[-1] - ends[0]) if len(ends) > 1 else None
    return {"images_per_second": len(tensors) / total, "steady_images_per_second": steady}


def pipeline_section(args: argparse.Namespace, model, workdir: Path) -> dict:
    """Whole pipeline (decode -> transform -> forward -> cache) against the forward alone, 0 and N workers."""
    from pih2t_hub.data import build_transform

    transform = build_transform(model.config.backbone_data_config, train=False)
    ds = jpeg_dataset(args.pipeline_images)
    tensors = torch.stack([transform(ds[i]["image"].convert("RGB")) for i in range(len(ds))])
    runs: dict[str, list[dict]] = {"forward": [], "pipeline_0": [], f"pipeline_{args.workers}": []}
    order = list(runs) + list(runs)[::-1]
    print(f"pipeline: {len(ds)} JPEGs, batch {args.batch}, {torch.get_num_threads()} torch thread(s), order "
          f"{' '.join(order)} ...", flush=True)
    forward_once(model, tensors[: args.batch], args.batch)  # warm-up
    for k, name in enumerate(order):
        if name == "forward":
            runs[name].append(forward_once(model, tensors, args.batch))
        else:
            workers = int(name.split("_")[1])
            runs[name].append(pipeline_once(model, ds, transform, workers, args.batch, workdir / f"cache-{k}"))
    med = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    forward = med["forward"]
    ratios = {name: {"total": round(m["images_per_second"] / forward["images_per_second"], 4),
                     "steady": round(m["steady_images_per_second"] / forward["steady_images_per_second"], 4)}
              for name, m in med.items() if name != "forward"}
    result = {"images": len(ds), "jpeg_size": 256, "image_size": transform_size(model), "batch_size": args.batch,
              "torch_threads_main": torch.get_num_threads(), "workers": args.workers, "order": order,
              "median_images_per_second": {n: {k: round(v, 2) for k, v in m.items()} for n, m in med.items()},
              "runs": runs, "ratio_pipeline_to_forward": ratios, "target_ratio_with_workers": 0.9,
              "target_met": ratios[f"pipeline_{args.workers}"]["steady"] >= 0.9}
    print(f"  {'':<14}{'img/s total':>12}{'img/s steady':>14}{'ratio total':>13}{'ratio steady':>14}")
    for name, m in med.items():
        r = ratios.get(name, {"total": 1.0, "steady": 1.0})
        print(f"  {name:<14}{m['images_per_second']:>12.2f}{m['steady_images_per_second']:>14.2f}"
              f"{r['total']:>13.3f}{r['steady']:>14.3f}")
    return result


def transform_size(model) -> list[int]:
    return list(model.config.backbone_data_config.get("input_size", []))


# ---------------------------------------------------------------------------------------------- processes


def child_processes(args: argparse.Namespace) -> int:
    """Under torchrun: every rank extracts its part of the saved JPEG dataset; rank 0 writes the timings."""
    import json

    import torch.distributed as dist
    from datasets import load_from_disk

    from pih2t_hub import create_model
    from pih2t_hub.data import apply_transform, build_transform, load_or_extract

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model = create_model("effnet_lite0", num_labels=10, pretrained=not args.random_weights).eval()
    transform = build_transform(model.config.backbone_data_config, train=False)
    ds = apply_transform(load_from_disk(args.child_processes), transform, image_column="image", label_column="label")
    encode = TimedEncode(model.pih2t)
    manifest = {"backbone": "effnet_lite0", "weights": "benchmark", "transform": repr(transform)}
    dist.barrier()
    start = time.perf_counter()
    load_or_extract(encode, ds, args.cache, manifest, batch_size=args.batch, shard_size=args.shard_size, num_workers=0,
                    progress=False)
    seconds = time.perf_counter() - start
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, {"seconds": seconds, "images": encode.images})
    if dist.get_rank() == 0:
        Path(args.cache, "timing.json").write_text(json.dumps(everything))
    dist.destroy_process_group()
    return 0


def processes_section(args: argparse.Namespace, workdir: Path) -> dict:
    import hashlib
    import json
    import subprocess

    data_dir = workdir / "jpegs"
    jpeg_dataset(args.process_images).save_to_disk(str(data_dir))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    result: dict = {"images": args.process_images, "batch_size": args.batch, "shard_size": args.shard_size,
                    "torch_threads_per_process": 1,
                    "workers_per_process": 0}
    for nproc in (1, 2):
        cache = workdir / f"procs-{nproc}"
        print(f"processes: {nproc} process(es) over {args.process_images} JPEGs ...", flush=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(Path(__file__).resolve()), "--child-processes", str(data_dir), "--cache", str(cache),
               "--batch", str(args.batch), "--shard-size", str(args.shard_size)]
        cmd += ["--random-weights"] if args.random_weights else []
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{nproc}-process extraction failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        ranks = json.loads((cache / "timing.json").read_text())
        slowest = max(r["seconds"] for r in ranks)
        digest = hashlib.sha256((cache / "features.npy").read_bytes()).hexdigest()
        result[f"{nproc}_process"] = {"ranks": ranks, "images_per_second": round(args.process_images / slowest, 2),
                                      "sha256_features": digest}
    one, two = result["1_process"], result["2_process"]
    result["speedup_2_over_1"] = round(two["images_per_second"] / one["images_per_second"], 3)
    result["caches_identical"] = one["sha256_features"] == two["sha256_features"]
    print(f"  1 process {one['images_per_second']:.2f} img/s, 2 processes {two['images_per_second']:.2f} img/s: "
          f"{result['speedup_2_over_1']:.2f}x; images per rank {[r['images'] for r in two['ranks']]}; caches "
          f"identical: {'yes' if result['caches_identical'] else 'NO'}")
    return result


# ---------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", nargs="+", choices=("adapter", "pipeline", "processes"),
                        default=["adapter", "pipeline", "processes"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224, help="the backbone's native input size")
    parser.add_argument("--rounds", type=int, default=10, help="adapter: timed A/B pairs")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--pipeline-images", type=int, default=128)
    parser.add_argument("--process-images", type=int, default=128)
    parser.add_argument("--shard-size", type=int, default=16, help="processes: samples per shard (work unit)")
    parser.add_argument("--workers", type=int, default=1, help="pipeline: the N of 'N workers'")
    parser.add_argument("--threads", type=int, default=1, help="pipeline: torch threads of the main process")
    parser.add_argument("--random-weights", action="store_true", help="skip the ImageNet weights")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "speed_extraction.json"))
    parser.add_argument("--child-processes", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_processes:
        return child_processes(args)

    import tempfile

    from pih2t_hub import create_model

    machine = machine_info()
    model = create_model("effnet_lite0", num_labels=10, pretrained=not args.random_weights).eval()
    result = {"benchmark": "speed_extraction",
              "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "machine": machine,
              "note": "shared machine: other jobs ran alongside (see the load averages); ratios are within one run"}
    with tempfile.TemporaryDirectory(prefix="pih2t-speed-") as tmp:
        if "adapter" in args.sections:
            result["adapter"] = adapter_section(args, model)
        if "pipeline" in args.sections:
            threads = torch.get_num_threads()
            torch.set_num_threads(args.threads)
            result["pipeline"] = pipeline_section(args, model, Path(tmp))
            torch.set_num_threads(threads)
        if "processes" in args.sections:
            result["processes"] = processes_section(args, Path(tmp))
    result["machine"]["loadavg_1_5_15_at_end"] = [round(v, 2) for v in os.getloadavg()]
    print(f"load average at start/end: {machine['loadavg_1_5_15_at_start'][0]} / "
          f"{result['machine']['loadavg_1_5_15_at_end'][0]} on {machine['cpus']} cores")
    out = Path(args.out)
    write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
