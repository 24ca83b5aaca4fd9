"""Pooled features of the frozen backbone (eval mode) for every split, through the resumable feature cache."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from ..data.features import load_or_extract, open_for_training
from .context import RunContext, weights_fingerprint


def needs_features(ctx: RunContext) -> bool:
    """Whether the run reads cached features: any linear probe or cached stage 2, and methods that fit on them."""
    return ctx.cfg.stage2_mode == "cached" or not (ctx.finetune or ctx.peft) or ctx.method.needs_features


def extract_features(ctx: RunContext, splits: tuple[str, ...] = ("train", "val", "test")) -> dict[str, TensorDataset]:
    """Extract (or reuse) the splits' features into ``ctx.features``; the manifest keys on everything that changes
    the bytes. The comparison extracts ``test`` only at its final evaluation, so tuning never reads it."""
    cfg, acc = ctx.cfg, ctx.accelerator
    ctx.model.eval()
    backbone = ctx.model.pih2t

    def encode(x: torch.Tensor) -> torch.Tensor:
        return backbone.pool(backbone.forward_features(x.to(acc.device)))

    weights_id = weights_fingerprint(backbone)
    root = Path(cfg.cache_dir) if cfg.cache_dir else ctx.out / "features"
    feats = ctx.features
    for split in splits:
        manifest = {"backbone": ctx.model.config.backbone, "weights": weights_id, "transform": repr(ctx.eval_tf),
                    "split": split, "seed": cfg.seed, "ir": cfg.imbalance_ratio,
                    # the split's exact rows (select() fingerprints are deterministic): a shared cache_dir must
                    # never serve features of other rows (e.g. another test_per_class or max_per_class)
                    "dataset": f"{cfg.dataset}:{ctx.data[split]._fingerprint}"}
        # every rank extracts its own contiguous part of the split (load_or_extract synchronises the ranks), then
        # reads the whole cache: memory-mapped if small, with bounded-memory pread reads if large
        cache = load_or_extract(encode, ctx.images(split, False), root / split, manifest,
                                batch_size=cfg.batch_size, dtype=cfg.feature_dtype, device=acc.device,
                                num_workers=cfg.num_workers, progress=ctx.progress and acc.is_local_main_process)
        feats[split] = open_for_training(cache)
    return feats


__all__ = ["extract_features", "needs_features"]
