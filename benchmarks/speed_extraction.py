"""Feature-extraction speed (issue 9, item 2c): the pih2t_hub adapter against bare timm, under inference mode.

Both sides compute the pooled 1,280-d features of ``tf_efficientnet_lite0`` with the *same* ImageNet weights:

* adapter: ``model.pih2t.pool(model.pih2t.forward_features(x))`` of ``create_model("effnet_lite0", ...)``
  (what ``load_or_extract`` calls in a run);
* bare timm: ``timm.create_model("tf_efficientnet_lite0", num_classes=0)`` with the adapter's state dict loaded,
  ``forward_head(forward_features(x), pre_logits=True)``.

The outputs are checked to be equal first. Timing: after warm-up, ``--rounds`` rounds of one batch per side,
alternating which side goes first (A B, B A, A B, ...: the sequence A B B A A B ...), so that a drift in machine
speed hits both sides alike; throughput is images / median batch time. Target: adapter >= 0.97x bare timm.

FLOPs: counted with ``torch.utils.flop_counter.FlopCounterMode`` on one image through bare timm. It counts
convolutions (grouped/depthwise included: ``2 x out_elements x in_channels/groups x kh x kw``) and matrix
products as 2 FLOPs per multiply-add; batch norm, activations and pooling are not counted (they are < 2 % of
this network's arithmetic and memory-bound anyway). Achieved GFLOP/s = counted FLOPs per image x images/s.

    python benchmarks/speed_extraction.py            # ~30 s on 2 idle cores

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224, help="the backbone's native input size")
    parser.add_argument("--rounds", type=int, default=20, help="timed A/B pairs (each side runs --rounds batches)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--random-weights", action="store_true", help="skip the ImageNet weights")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "speed_extraction.json"))
    args = parser.parse_args()

    import timm

    from pih2t_hub import create_model

    machine = machine_info()
    model = create_model("effnet_lite0", num_labels=10, pretrained=not args.random_weights).eval()
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
    flops_adapter = count_flops(run_adapter, x[:1])

    sides = {"adapter": run_adapter, "bare_timm": run_bare}
    times: dict[str, list[float]] = {"adapter": [], "bare_timm": []}

    def once(name: str) -> float:
        start = time.perf_counter()
        run = sides[name]
        with torch.inference_mode():
            run(x)
        return time.perf_counter() - start

    for _ in range(args.warmup):
        once("adapter")
        once("bare_timm")
    print(f"timing {args.rounds} A/B rounds of batch {args.batch} at {size} px ...", flush=True)
    for r in range(args.rounds):  # A B, B A, A B, ...: the sequence A B B A A B B A cancels a linear drift
        order = ("adapter", "bare_timm") if r % 2 == 0 else ("bare_timm", "adapter")
        for name in order:
            times[name].append(once(name))
    med = {k: statistics.median(v) for k, v in times.items()}
    ips = {k: args.batch / v for k, v in med.items()}
    pair_ratios = [tb / ta for ta, tb in zip(times["adapter"], times["bare_timm"])]  # adapter throughput / bare
    ratio = ips["adapter"] / ips["bare_timm"]
    gflops = {k: flops_per_image * v / 1e9 for k, v in ips.items()}
    result = {
        "benchmark": "speed_extraction",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "backbone": "tf_efficientnet_lite0 (" + ("random" if args.random_weights else "ImageNet") + " weights)",
        "image_size": size,
        "batch_size": args.batch,
        "rounds": args.rounds,
        "mode": "torch.inference_mode, eval, float32, CPU",
        "outputs_max_abs_diff": max_diff,
        "flops_per_image_g": round(flops_per_image / 1e9, 4),
        "flops_per_image_adapter_g": round(flops_adapter / 1e9, 4),
        "flop_counting": "torch.utils.flop_counter.FlopCounterMode: conv + matmul, 2 FLOPs per multiply-add",
        "median_batch_seconds": {k: round(v, 5) for k, v in med.items()},
        "batch_seconds": {k: [round(t, 5) for t in v] for k, v in times.items()},
        "images_per_second": {k: round(v, 2) for k, v in ips.items()},
        "achieved_gflops_per_second": {k: round(v, 2) for k, v in gflops.items()},
        "throughput_ratio_adapter_to_bare": round(ratio, 4),
        "throughput_ratio_median_of_pairs": round(statistics.median(pair_ratios), 4),
        "target_ratio": TARGET,
        "target_met": ratio >= TARGET,
        "machine": machine,
    }
    result["machine"]["loadavg_1_5_15_at_end"] = [round(v, 2) for v in os.getloadavg()]

    print(f"feature extraction, tf_efficientnet_lite0 @ {size} px, batch {args.batch}, {args.rounds} rounds "
          f"(A/B interleaved), inference_mode")
    print(f"  counted FLOPs per image: {flops_per_image / 1e9:.3f} GFLOP (FlopCounterMode; conv + matmul)")
    print(f"  {'path':<12}{'ms/batch':>10}{'images/s':>11}{'GFLOP/s':>10}")
    for k in ("adapter", "bare_timm"):
        print(f"  {k:<12}{1e3 * med[k]:>10.1f}{ips[k]:>11.1f}{gflops[k]:>10.1f}")
    print(f"  adapter / bare throughput: {ratio:.4f} (median of pairs {result['throughput_ratio_median_of_pairs']})"
          f"  target >= {TARGET}  target met: {'yes' if result['target_met'] else 'no'}")
    print(f"  outputs equal to {max_diff:.2e}; load average at start/end: "
          f"{machine['loadavg_1_5_15_at_start'][0]} / {machine['loadavg_1_5_15_at_end'][0]}")
    out = Path(args.out)
    write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
