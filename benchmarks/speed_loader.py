"""Stage 2 on cached features: what fetching a batch with one gather per column buys over per-row fetching.

A whole epoch through the real ``train_loop`` on ``accelerate`` over an in-memory cache (``--rows`` rows of
``--dim`` float32 features, ``--classes`` long-tailed classes), linear head, SGD, for two loaders:

* CE with the instance sampler (one branch), and H2T (p = 0.25) with the dual-branch sampler (two rows per sample);
* each fetched two ways: ``per_row`` (``TensorDataset``, one tuple of row views per sample, then torch's
  ``default_collate`` stacks them) and ``batched`` (``TensorRows`` + ``collate_rows``, what stage 2 and the linear
  probe use: one gather per column per batch). Same sampler order, same batches.

The variants are interleaved for ``--rounds`` rounds and each keeps its fastest epoch (the machine may be shared).
The batch sizes are the comparison's stage-2 batch (128) and a large one (512)::

    python benchmarks/speed_loader.py          # ~1 min on an idle core

Prints a table and writes ``benchmarks/results/speed_loader.json``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_json  # noqa: E402
from speed_stage2 import long_tailed_labels, plugin_fusion, timed_loop  # noqa: E402


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from accelerate import Accelerator

    from pih2t_hub.data.row_batches import batch_fetching, collate_rows
    from pih2t_hub.data.samplers import DualBranchDataset, DualBranchSampler, InstanceSampler
    from pih2t_hub.losses import build_loss
    from pih2t_hub.models.pih2t.heads import LinearHead
    from pih2t_hub.training.config import RunConfig
    from pih2t_hub.training.steps import cached_fused_features

    accelerator = Accelerator(cpu=True)
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(args.rows, args.dim, generator=gen).relu()
    labels = long_tailed_labels(args.rows, args.classes, 100.0, seed=0)
    fuse = plugin_fusion("h2t", RunConfig(fusion_ratio=0.25), torch.Generator().manual_seed(1))
    loss_fn = build_loss("ce")
    head0 = LinearHead(args.dim, args.classes)

    def plain_step(head):
        return lambda b: loss_fn(head(b[0].float()), b[1])

    def h2t_step(head):
        def step(b):
            (xf, yf), (xg, _) = b["fused"], b["fusing"]
            return loss_fn(head(cached_fused_features(xf, xg, yf, fuse)), yf)
        return step

    def loader(kind: str, fetch: str, batch: int) -> DataLoader:
        ds = TensorDataset(feats, labels)
        extra = {}
        if fetch == "batched":
            ds, extra = batch_fetching(ds), {"collate_fn": collate_rows}
        if kind == "ce_instance":
            return DataLoader(ds, batch_size=batch, sampler=InstanceSampler(args.rows, seed=0), **extra)
        return DataLoader(DualBranchDataset(ds), batch_size=batch, sampler=DualBranchSampler(labels, seed=0), **extra)

    steps = {"ce_instance": plain_step, "h2t_dual": h2t_step}
    out: dict[str, Any] = {"rows": args.rows, "dim": args.dim, "classes": args.classes, "rounds": args.rounds,
                           "batches": {}}
    for batch in args.batches:
        secs: dict[str, float] = {}
        for _ in range(args.rounds):
            for kind, step in steps.items():
                for fetch in ("per_row", "batched"):
                    s, _ = timed_loop(accelerator, copy.deepcopy(head0), loader(kind, fetch, batch), step, 1, [])
                    key = f"{kind}/{fetch}"
                    secs[key] = min(secs.get(key, float("inf")), s)
        entry = {"seconds_per_epoch": {k: round(v, 4) for k, v in secs.items()},
                 "speedup": {k: round(secs[f"{k}/per_row"] / secs[f"{k}/batched"], 2) for k in steps}}
        out["batches"][str(batch)] = entry
        print(f"batch {batch}: " + ", ".join(
            f"{k} per-row {secs[f'{k}/per_row']:.3f} s -> batched {secs[f'{k}/batched']:.3f} s "
            f"({entry['speedup'][k]:.2f}x)" for k in steps), flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "speed_loader.json"))
    args = parser.parse_args()
    if min(args.rows, args.dim, args.classes, args.rounds, *args.batches) < 1:
        parser.error("--rows, --dim, --classes, --rounds and --batches must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"benchmark": "speed_loader", "machine": machine_info(), "torch_threads": torch.get_num_threads(),
              "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), **measure(args)}
    result["machine"]["loadavg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(Path(args.out), result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
