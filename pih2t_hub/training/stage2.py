"""Stage 2, classifier retraining: the method's head, sampler, fusion and loss on the frozen backbone.

Two feature paths, one loop. ``cached``: pooled features read from the cache (channel replacement commutes with
global pooling, so for a linear or cosine head this *is* fusion on feature maps). ``online``: the two branches
are forwarded separately through the frozen backbone every step, with shift-BN and training augmentation. A
method without a recipe (τ-norm, NCM, post-hoc logit adjustment, DLSA) trains nothing here: its post-hoc step
produces the head directly.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data.row_batches import TensorRows, batch_fetching, collate_rows
from ..data.samplers import DualBranchDataset
from ..methods import Stage2Context
from .bn_state import BufferSnapshots, BufferState, average_buffers
from .context import RunContext, loader_generator
from .loop import EpochHook, LoopState, SeededFetch, load_best, train_loop
from .predict import predict_logits, summarize
from .steps import cached_fused_features, online_fused_features
from ..evaluation.metrics import longtail_metrics


def method_context(ctx: RunContext, results: dict[str, Any]) -> Stage2Context:
    """What the method may read: config, counts, generator and (if cached) the train / val features."""
    feats = ctx.features
    return Stage2Context(cfg=ctx.cfg, class_counts=ctx.counts, generator=ctx.fusion_generator,
                         train_features=feats["train"].tensors if "train" in feats else None,
                         val_features=feats["val"].tensors if "val" in feats else None, results=results)


def run_stage2(ctx: RunContext, mctx: Stage2Context) -> tuple[LoopState | None, nn.Module]:
    """Train the method's head (or apply its post-hoc step); returns the loop state (None: nothing trained) and
    the inference head, not yet put into the model (that is the method's ``export``)."""
    method = ctx.method
    head = ctx.model.classifier
    if method.recipe is None:
        return None, method.finalize(head, mctx)
    trainable = method.setup_head(head, mctx)
    loss_fn = method.make_loss(mctx)
    fuse = method.make_fusion(mctx)
    rows = method.row_values(mctx) if ctx.cfg.stage2_mode == "cached" and fuse is not None else None
    state, trained = _train(ctx, trainable, loss_fn, fuse, rows)
    if state.stopped:
        return state, trained
    return state, method.finalize(trained, mctx)


def _stage2_loader(ctx: RunContext, rows: torch.Tensor | None) -> DataLoader:
    cfg, method = ctx.cfg, ctx.method
    if cfg.stage2_mode == "cached":
        base = ctx.features["train"]
        labels = base.tensors[1]
        # per-row values travel as a third column, gathered with their rows
        base = TensorRows(*base.tensors[:2], rows) if rows is not None else batch_fetching(base)
        ds = DualBranchDataset(base) if method.dual_branch else base
    else:
        base = ctx.images("train", True)
        labels = torch.as_tensor(np.asarray(ctx.data["train"][ctx.data["label_column"]]))
        ds = SeededFetch(DualBranchDataset(base) if method.dual_branch else base, cfg.seed)
    return DataLoader(ds, batch_size=int(cfg.stage2_batch_size), sampler=method.make_sampler(labels, cfg.seed),
                      num_workers=cfg.num_workers, generator=loader_generator(cfg.seed), collate_fn=collate_rows)


def _batch_len(batch: Any) -> int:
    """Samples in a batch of any of the loaders (dual-branch or not, images or cached features)."""
    if isinstance(batch, dict):
        batch = batch.get("fused", batch)
    if isinstance(batch, dict):
        return len(batch["labels"])
    return len(batch[1])


def _train(ctx: RunContext, trainable: nn.Module, loss_fn: nn.Module, fuse: Callable | None,
           rows: torch.Tensor | None) -> tuple[LoopState, nn.Module]:
    cfg, acc, method = ctx.cfg, ctx.accelerator, ctx.method
    opt = ctx.sgd(trainable.parameters(), float(cfg.stage2_lr), float(cfg.stage2_weight_decay))
    trainable, opt, loader = acc.prepare(trainable, opt, _stage2_loader(ctx, rows))
    backbone = ctx.model.pih2t.to(acc.device)
    backbone.requires_grad_(False)
    extra = ctx.extra_state
    if cfg.stage2_mode == "cached":
        step, evaluate = _cached_step(trainable, loss_fn, fuse, method.dual_branch), \
            (lambda e: summarize(ctx.eval_head(trainable, "val")))
    else:
        extra["backbone_buffers"] = BufferState(backbone)  # not in a prepared model when stage 1 was linear
        snapshots = BufferSnapshots(backbone)  # BN statistics of every epoch, to go with the best epoch's head
        extra["bn_snapshots"] = snapshots
        step = _online_step(ctx, trainable, loss_fn, fuse)
        evaluate = _online_evaluate(ctx, trainable, snapshots)
    callbacks = [*ctx.callbacks, *([EpochHook(loss_fn)] if hasattr(loss_fn, "set_epoch") else [])]
    state = train_loop(acc, trainable=trainable, optimizer=opt, loader=loader, step=step,
                       epochs=int(cfg.stage2_epochs), lr_scheduler=method.lr_schedule(opt), evaluate=evaluate,
                       checkpoint_dir=ctx.checkpoint_dir("stage2"), checkpoint_every=cfg.checkpoint_every,
                       keep_last=cfg.keep_last, resume=cfg.resume, callbacks=callbacks, batch_size_of=_batch_len,
                       desc=f"stage 2 ({method.name})", extra_state=extra, progress=ctx.progress)
    unwrapped = acc.unwrap_model(trainable)
    if not state.stopped:
        load_best(unwrapped, state)
        if cfg.stage2_mode == "online" and state.best_epoch >= 0:
            snapshots.restore(state.best_epoch)  # the head was selected with these statistics
    backbone.eval()
    return state, unwrapped


def _cached_step(trainable: nn.Module, loss_fn: nn.Module, fuse: Callable | None, dual: bool) -> Callable:
    def step(batch: Any) -> torch.Tensor:
        if not dual:
            xf, yf = batch[:2]
            return loss_fn(trainable(xf.float()), yf)
        fused, fusing = batch["fused"], batch["fusing"]
        xf, yf, xg = fused[0], fused[1], fusing[0]
        row_values = {} if len(fused) == 2 else {"fused_rho": fused[2]}
        return loss_fn(trainable(cached_fused_features(xf, xg, yf, fuse, **row_values)), yf)

    return step


def _online_step(ctx: RunContext, trainable: nn.Module, loss_fn: nn.Module, fuse: Callable | None) -> Callable:
    backbone, method, shift_bn = ctx.model.pih2t, ctx.method, ctx.cfg.shift_bn

    def step(batch: Any) -> torch.Tensor:
        if method.dual_branch:
            xf, yf, xg = batch["fused"]["pixel_values"], batch["fused"]["labels"], batch["fusing"]["pixel_values"]
        else:
            xf, yf, xg = batch["pixel_values"], batch["labels"], None
        pooled = online_fused_features(backbone, xf, xg, yf, fuse, method.fusion_site, shift_bn)
        return loss_fn(trainable(pooled), yf)

    return step


def _online_evaluate(ctx: RunContext, trainable: nn.Module, snapshots: BufferSnapshots) -> Callable:
    backbone, acc = ctx.model.pih2t, ctx.accelerator
    val_loader = ctx.image_loader("val")

    def evaluate(epoch: int) -> dict[str, float]:
        average_buffers(acc, backbone)  # one set of re-estimated BN statistics across ranks
        snapshots.take(epoch)
        backbone.eval()
        trainable.eval()
        logits, y = predict_logits(acc, lambda x: trainable(backbone(x).pooler_output), val_loader)
        return summarize(longtail_metrics(logits, y, ctx.counts))

    return evaluate


__all__ = ["run_stage2", "method_context"]
