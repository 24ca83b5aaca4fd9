"""Stage-2 speed (issue 9, items 2a and 2b): cached features against the online recipe, and the cost of fusion.

(a) **Epoch, cached vs online.** The same H2T stage 2 (dual-branch sampler, p = 0.25, linear head, SGD, the
    real ``train_loop`` on ``accelerate``) run two ways over the same ``--images`` images:

    * online: every step forwards the fused and the fusing branch *separately* through the frozen
      ``effnet_lite0`` (ImageNet weights) in train mode (shift-BN), fuses the un-pooled maps with H2T and pools
      (``steps.online_fused_features``);
    * cached: the pooled features are extracted once (``load_or_extract``, eval mode, fp16 on disk) and every
      step fuses the memory-mapped pooled vectors (``steps.cached_fused_features``).

    Images are synthetic, already-normalised tensors held in memory at ``--image-size`` px (default 96), so the
    online path pays no decoding or augmentation: that flatters the online path, so the ratio is conservative.
    Each path is warmed up by one step, then timed over whole epochs (online ``--online-epochs``, cached
    ``--cached-epochs``), and reported as seconds per epoch of ``--images`` samples. Target: cached >= 50x faster.

(b) **Step, fusion vs plain.** One optimisation step on cached pooled features (fp16 batch -> float, fusion,
    linear head forward, cross-entropy, backward, SGD with momentum) for a plain linear head, H2T (p = 0.25) and
    PI-H2T's H2TF (prototype distance, interpolation); same batch, same head initialisation, same optimiser.
    The three are interleaved step by step (rotating their order) for ``--step-reps`` rounds and compared by the
    median; the fusion alone (features only) is timed in the same rotation to show where the extra time goes,
    and the step is repeated with ``--context-classes`` (1,000, ImageNet-LT's count) at the larger batch.
    Target: fused step <= 1.10x the plain step (at ``--classes``). As context (no target), one epoch over an
    in-memory cache through the real loader and loop: CE with an instance sampler vs H2T with the dual-branch
    loader, which reads two rows per sample.

    python benchmarks/speed_stage2.py            # ~40 s on 2 idle cores

Prints a table and writes ``benchmarks/results/speed_stage2.json``. The loop's progress bars are kept (their
cost is part of a real epoch) but written to a discarding sink instead of the terminal.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from _common import machine_info, write_json  # noqa: E402  (this folder is on sys.path)

EPOCH_TARGET = 50.0
STEP_TARGET = 1.10


# ---------------------------------------------------------------------------------------------- shared helpers





def long_tailed_labels(n: int, num_classes: int, ratio: float, seed: int) -> torch.Tensor:
    """``n`` labels with exponentially decaying class sizes (imbalance ``ratio``), shuffled; every class present."""
    if n < num_classes:
        raise ValueError(f"need at least one sample per class: {n} samples for {num_classes} classes")
    weights = ratio ** (-np.arange(num_classes) / max(num_classes - 1, 1))
    counts = 1 + np.floor(weights / weights.sum() * (n - num_classes)).astype(np.int64)
    counts[0] += n - counts.sum()
    labels = np.repeat(np.arange(num_classes), counts)
    return torch.from_numpy(np.random.default_rng(seed).permutation(labels))


def sgd(module: nn.Module) -> torch.optim.Optimizer:
    from pih2t_hub.training.config import RunConfig

    cfg = RunConfig()
    return torch.optim.SGD(module.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


class _Discard:
    """A text sink that drops everything: tqdm still formats its bars (real cost), the terminal stays clean."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def timed_loop(accelerator, head: nn.Module, loader: DataLoader, step_of: Callable, epochs: int,
               hooks: list) -> tuple[float, int]:
    """Warm up one step, then time ``epochs`` whole epochs of the real ``train_loop``; (seconds, steps)."""
    from pih2t_hub.training.loop import cosine_per_epoch, train_loop

    opt = sgd(head)
    head_p, opt, loader_p = accelerator.prepare(head, opt, loader)
    step = step_of(head_p)
    lr = opt.param_groups[0]["lr"]
    kwargs = dict(trainable=head_p, optimizer=opt, loader=loader_p, step=step, lr_at_epoch=cosine_per_epoch(lr, epochs),
                  set_epoch_hooks=hooks)
    with contextlib.redirect_stderr(_Discard()):
        train_loop(accelerator, epochs=1, stop_after_steps=1, **kwargs)  # warm-up (allocations, oneDNN kernels)
        start = time.perf_counter()
        state = train_loop(accelerator, epochs=epochs, **kwargs)
        elapsed = time.perf_counter() - start
    return elapsed, state.global_step


# ---------------------------------------------------------------------------------------------- (a) epochs


def bench_epoch(args: argparse.Namespace) -> dict[str, Any]:
    from accelerate import Accelerator

    from pih2t_hub import create_model
    from pih2t_hub.data.features import load_or_extract
    from pih2t_hub.data.samplers import DualBranchDataset, DualBranchSampler
    from pih2t_hub.losses import build_loss
    from pih2t_hub.training.config import RunConfig
    from pih2t_hub.training.methods import get_method
    from pih2t_hub.training.run import make_fusion
    from pih2t_hub.training.steps import cached_fused_features, online_fused_features

    accelerator = Accelerator(cpu=True)
    model = create_model("effnet_lite0", num_labels=args.classes, pretrained=not args.random_weights)
    backbone = model.pih2t.requires_grad_(False)
    head0 = copy.deepcopy(model.classifier)
    gen = torch.Generator().manual_seed(0)
    size = args.image_size
    images = torch.randn(args.images, 3, size, size, generator=gen)
    labels = long_tailed_labels(args.images, args.classes, 100.0, seed=0)
    cfg = RunConfig(fusion_ratio=0.25)
    fuse = make_fusion(get_method("h2t"), cfg, torch.Generator().manual_seed(1), None)
    loss_fn = build_loss("ce")
    batch = args.batch

    # online: the faithful recipe, two forwards per step through the train-mode (shift-BN) backbone
    online_loader = DataLoader(DualBranchDataset(TensorDataset(images, labels)), batch_size=batch,
                               sampler=DualBranchSampler(labels, seed=0))

    def online_step(head):
        def step(b):
            (xf, yf), (xg, _) = b["fused"], b["fusing"]
            return loss_fn(head(online_fused_features(backbone, xf, xg, yf, fuse, "h2t", shift_bn=True)), yf)
        return step

    print(f"(a) online: {args.online_epochs} epoch(s) of {args.images} images at {size} px, batch {batch} ...",
          flush=True)
    online_s, online_steps = timed_loop(accelerator, copy.deepcopy(head0), online_loader, online_step,
                                        args.online_epochs, [])

    # cached: extract once (timed separately), then the same epoch on memory-mapped pooled features
    backbone.eval()

    def encode(x: torch.Tensor) -> torch.Tensor:
        return backbone.pool(backbone.forward_features(x))

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        cache = load_or_extract(encode, TensorDataset(images, labels), tmp,
                                {"backbone": "effnet_lite0", "weights": "bench", "transform": f"synthetic-{size}",
                                 "dataset": f"synthetic-{args.images}"},
                                batch_size=batch, dtype="float16", progress=False)
        extract_s = time.perf_counter() - start
        cached_loader = DataLoader(DualBranchDataset(cache.as_tensor_dataset()), batch_size=batch,
                                   sampler=DualBranchSampler(torch.from_numpy(np.asarray(cache.labels)), seed=0))

        def cached_step(head):
            def step(b):
                (xf, yf), (xg, _) = b["fused"], b["fusing"]
                return loss_fn(head(cached_fused_features(xf, xg, yf, fuse)), yf)
            return step

        print(f"(a) cached: {args.cached_epochs} epochs ...", flush=True)
        cached_s, cached_steps = timed_loop(accelerator, copy.deepcopy(head0), cached_loader, cached_step,
                                            args.cached_epochs, [])
        del cached_loader, cache

    online_epoch = online_s / args.online_epochs
    cached_epoch = cached_s / args.cached_epochs
    stage2_epochs = RunConfig().epochs
    return {
        "backbone": "effnet_lite0 (timm tf_efficientnet_lite0, "
                    + ("random weights" if args.random_weights else "ImageNet weights") + ")",
        "image_size": size,
        "images_per_epoch": args.images,
        "batch_size": batch,
        "num_classes": args.classes,
        "fusion": "h2t p=0.25 (online: on 1280x{0}x{0} maps before pooling; cached: on pooled vectors)".format(
            -(-size // 32)),
        "feature_dtype_cached": "float16",
        "online": {"epochs_timed": args.online_epochs, "steps_timed": online_steps, "seconds": round(online_s, 3),
                   "seconds_per_epoch": round(online_epoch, 4),
                   "seconds_per_step": round(online_s / online_steps, 5)},
        "cached": {"epochs_timed": args.cached_epochs, "steps_timed": cached_steps, "seconds": round(cached_s, 3),
                   "seconds_per_epoch": round(cached_epoch, 5),
                   "seconds_per_step": round(cached_s / cached_steps, 6)},
        "extraction_seconds_once": round(extract_s, 3),
        "speedup_per_epoch": round(online_epoch / cached_epoch, 1),
        "target_speedup": EPOCH_TARGET,
        "target_met": online_epoch / cached_epoch >= EPOCH_TARGET,
        "stage2_epochs_default": stage2_epochs,
        "speedup_whole_stage2_incl_extraction": round(
            stage2_epochs * online_epoch / (extract_s + stage2_epochs * cached_epoch), 1),
    }


# ---------------------------------------------------------------------------------------------- (b) steps


def bench_steps(args: argparse.Namespace, classes: int, batches: list[int], reps: int) -> dict[str, Any]:
    from pih2t_hub.losses import build_loss
    from pih2t_hub.models.pih2t.fusion import class_prototypes
    from pih2t_hub.models.pih2t.heads import LinearHead
    from pih2t_hub.training.config import RunConfig
    from pih2t_hub.training.methods import get_method
    from pih2t_hub.training.run import make_fusion
    from pih2t_hub.training.steps import cached_fused_features

    dim = args.dim
    gen = torch.Generator().manual_seed(0)
    # prototypes from a "stage-1" feature set: classes separated by their means, so the distances vary
    pool_n = 20 * classes
    pool_y = torch.arange(pool_n) % classes
    centres = torch.randn(classes, dim, generator=gen)
    pool_x = (centres[pool_y] + torch.randn(pool_n, dim, generator=gen)).relu()
    prototypes = class_prototypes(pool_x, pool_y, classes)
    cfg = RunConfig(fusion_ratio=0.25)
    fusions = {
        "plain": None,
        "h2t": make_fusion(get_method("h2t"), cfg, torch.Generator().manual_seed(1), None),
        "pi-h2t (h2tf)": make_fusion(get_method("pi-h2t"), cfg, torch.Generator().manual_seed(2), prototypes),
    }
    loss_fn = build_loss("ce")
    head0 = LinearHead(dim, classes)
    results: dict[str, Any] = {"dim": dim, "num_classes": classes, "repetitions": reps, "batches": {}}
    for batch in batches:
        y = torch.randint(0, classes, (batch,), generator=gen)
        xf = (centres[y] + torch.randn(batch, dim, generator=gen)).relu().half()  # fp16, as read from a cache
        xg = (centres[torch.randint(0, classes, (batch,), generator=gen)]
              + torch.randn(batch, dim, generator=gen)).relu().half()
        heads = {name: copy.deepcopy(head0) for name in fusions}
        opts = {name: sgd(h) for name, h in heads.items()}

        def step(name: str) -> float:
            head, opt, fuse = heads[name], opts[name], fusions[name]
            start = time.perf_counter()
            feats = cached_fused_features(xf, xg if fuse else None, y, fuse)
            loss = loss_fn(head(feats), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return time.perf_counter() - start

        def fuse_only(name: str) -> float:  # where the extra time goes: the fusion (incl. fp16 -> float) alone
            fuse = fusions[name]
            start = time.perf_counter()
            cached_fused_features(xf, xg if fuse else None, y, fuse)
            return time.perf_counter() - start

        names = list(fusions)
        jobs = {**{n: (step, n) for n in names}, **{f"{n} [features only]": (fuse_only, n) for n in names}}
        order = list(jobs)
        for _ in range(20):  # warm-up
            for job in order:
                jobs[job][0](jobs[job][1])
        times: dict[str, list[float]] = {job: [] for job in order}
        for rep in range(reps):
            shift = rep % len(order)
            for job in order[shift:] + order[:shift]:  # rotate the order: no measurement always runs first
                fn, name = jobs[job]
                times[job].append(fn(name))
        med = {job: statistics.median(t) for job, t in times.items()}
        entry: dict[str, Any] = {
            "median_ms": {n: round(1e3 * v, 4) for n, v in med.items()},
            "p10_p90_ms": {n: [round(1e3 * float(np.percentile(t, 10)), 4), round(1e3 * float(np.percentile(t, 90)), 4)]
                           for n, t in times.items()},
        }
        ratios = {n: round(med[n] / med["plain"], 4) for n in names if n != "plain"}
        entry["ratio_to_plain"] = ratios
        entry["target_met"] = {n: r <= STEP_TARGET for n, r in ratios.items()}
        results["batches"][str(batch)] = entry
        print(f"(b) batch {batch}: " + ", ".join(f"{n} {1e3 * v:.3f} ms" for n, v in med.items()), flush=True)
    results["target_ratio"] = STEP_TARGET
    results["target_met"] = all(all(e["target_met"].values()) for e in results["batches"].values())
    return results


def bench_loader_epoch(args: argparse.Namespace) -> dict[str, Any]:
    """Context for (b): a whole cached epoch through the real loader and loop, CE vs H2T (no target)."""
    from accelerate import Accelerator

    from pih2t_hub.data.samplers import DualBranchDataset, DualBranchSampler, InstanceSampler
    from pih2t_hub.losses import build_loss
    from pih2t_hub.models.pih2t.heads import LinearHead
    from pih2t_hub.training.config import RunConfig
    from pih2t_hub.training.methods import get_method
    from pih2t_hub.training.run import make_fusion
    from pih2t_hub.training.steps import cached_fused_features

    accelerator = Accelerator(cpu=True)
    n, batch = args.loader_rows, max(args.step_batches)
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(n, args.dim, generator=gen).relu().half()
    labels = long_tailed_labels(n, args.classes, 100.0, seed=0)
    ds = TensorDataset(feats, labels)
    fuse = make_fusion(get_method("h2t"), RunConfig(fusion_ratio=0.25), torch.Generator().manual_seed(1), None)
    loss_fn = build_loss("ce")
    head0 = LinearHead(args.dim, args.classes)

    def plain_step(head):
        return lambda b: loss_fn(head(cached_fused_features(b[0], None, b[1], None)), b[1])

    def h2t_step(head):
        def step(b):
            (xf, yf), (xg, _) = b["fused"], b["fusing"]
            return loss_fn(head(cached_fused_features(xf, xg, yf, fuse)), yf)
        return step

    out = {"rows": n, "batch_size": batch, "epochs_timed": args.loader_epochs}
    plain_loader = DataLoader(ds, batch_size=batch, sampler=InstanceSampler(n, seed=0))
    dual_loader = DataLoader(DualBranchDataset(ds), batch_size=batch, sampler=DualBranchSampler(labels, seed=0))
    secs = {}
    for rnd in range(2):  # two rounds, alternating, keep the faster of each (drift / noise)
        for name, loader, step in (("ce_instance", plain_loader, plain_step), ("h2t_dual", dual_loader, h2t_step)):
            s, _ = timed_loop(accelerator, copy.deepcopy(head0), loader, step, args.loader_epochs, [])
            secs[name] = min(secs.get(name, float("inf")), s / args.loader_epochs)
    out["seconds_per_epoch"] = {k: round(v, 4) for k, v in secs.items()}
    out["ratio_h2t_to_ce"] = round(secs["h2t_dual"] / secs["ce_instance"], 3)
    print(f"(b, context) loader-inclusive epoch of {n} rows: CE {secs['ce_instance']:.3f} s, "
          f"H2T {secs['h2t_dual']:.3f} s", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=384, help="samples per epoch (both paths)")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=64, help="stage-2 batch for (a): pairs per step")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--online-epochs", type=int, default=2)
    parser.add_argument("--cached-epochs", type=int, default=100)
    parser.add_argument("--random-weights", action="store_true", help="skip the ImageNet weights (same speed)")
    parser.add_argument("--dim", type=int, default=1280, help="feature width for (b)")
    parser.add_argument("--step-batches", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--step-reps", type=int, default=500)
    parser.add_argument("--context-classes", type=int, default=1000,
                        help="also time (b) at batch max(--step-batches) with this many classes (0: skip)")
    parser.add_argument("--loader-rows", type=int, default=50_000)
    parser.add_argument("--loader-epochs", type=int, default=1)
    parser.add_argument("--skip-epoch", action="store_true", help="only (b)")
    parser.add_argument("--skip-step", action="store_true", help="only (a)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "speed_stage2.json"))
    args = parser.parse_args()

    result: dict[str, Any] = {"benchmark": "speed_stage2", "machine": machine_info(),
                              "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}
    if not args.skip_epoch:
        result["a_epoch_cached_vs_online"] = bench_epoch(args)
    if not args.skip_step:
        result["b_step_fusion_vs_plain"] = bench_steps(args, args.classes, args.step_batches, args.step_reps)
        if args.context_classes:
            result["b_context_more_classes"] = bench_steps(args, args.context_classes, [max(args.step_batches)],
                                                           max(50, args.step_reps // 3))
        result["b_context_loader_epoch"] = bench_loader_epoch(args)
    result["machine"]["loadavg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]

    print()
    if "a_epoch_cached_vs_online" in result:
        a = result["a_epoch_cached_vs_online"]
        print(f"(a) stage-2 epoch, {a['images_per_epoch']} samples, effnet_lite0 @ {a['image_size']} px, "
              f"batch {a['batch_size']}")
        print(f"    {'path':<10}{'s/epoch':>12}{'s/step':>12}{'steps timed':>14}")
        for key in ("online", "cached"):
            r = a[key]
            print(f"    {key:<10}{r['seconds_per_epoch']:>12.4f}{r['seconds_per_step']:>12.5f}{r['steps_timed']:>14}")
        print(f"    speedup {a['speedup_per_epoch']:.1f}x  (target >= {EPOCH_TARGET:g}x)  "
              f"target met: {'yes' if a['target_met'] else 'no'}")
        print(f"    one-time extraction {a['extraction_seconds_once']:.2f} s; whole stage 2 of "
              f"{a['stage2_epochs_default']} epochs incl. extraction: {a['speedup_whole_stage2_incl_extraction']}x")
    if "b_step_fusion_vs_plain" in result:
        b = result["b_step_fusion_vs_plain"]
        print(f"(b) one step on cached features, D={b['dim']}, C={b['num_classes']}, median of {b['repetitions']}")
        print(f"    {'batch':<7}{'plain ms':>10}{'h2t ms':>10}{'h2tf ms':>10}{'h2t/plain':>11}{'h2tf/plain':>12}")
        for batch, e in b["batches"].items():
            m, r = e["median_ms"], e["ratio_to_plain"]
            print(f"    {batch:<7}{m['plain']:>10.3f}{m['h2t']:>10.3f}{m['pi-h2t (h2tf)']:>10.3f}"
                  f"{r['h2t']:>11.3f}{r['pi-h2t (h2tf)']:>12.3f}")
        print(f"    target <= {STEP_TARGET}x  target met: {'yes' if b['target_met'] else 'no'}")
        for batch, e in b["batches"].items():
            m = e["median_ms"]
            print(f"    features only (fp16 -> float + fusion), batch {batch}: plain "
                  f"{m['plain [features only]']:.3f} ms, h2t {m['h2t [features only]']:.3f} ms, "
                  f"h2tf {m['pi-h2t (h2tf) [features only]']:.3f} ms")
        if "b_context_more_classes" in result:
            cc = result["b_context_more_classes"]
            for batch, e in cc["batches"].items():
                r = e["ratio_to_plain"]
                print(f"    context, C={cc['num_classes']}, batch {batch}: plain {e['median_ms']['plain']:.3f} ms, "
                      f"h2t/plain {r['h2t']:.3f}, h2tf/plain {r['pi-h2t (h2tf)']:.3f}")
        c = result["b_context_loader_epoch"]
        print(f"    context: loader-inclusive epoch ({c['rows']} rows, batch {c['batch_size']}): CE/instance "
              f"{c['seconds_per_epoch']['ce_instance']:.3f} s, H2T/dual {c['seconds_per_epoch']['h2t_dual']:.3f} s "
              f"({c['ratio_h2t_to_ce']}x; the dual branch reads two rows per sample)")
    print(f"    load average at start/end: {result['machine']['loadavg_1_5_15_at_start'][0]} / "
          f"{result['machine']['loadavg_1_5_15_at_end'][0]}")
    out = Path(args.out)
    write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
