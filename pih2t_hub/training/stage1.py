"""Stage 1, representation learning: the backbone (+PIF) and head end to end on images, or a linear probe of the
frozen pretrained backbone on its cached features. Either way the best-on-validation weights are kept."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from ..data.row_batches import batch_fetching, collate_rows
from ..data.samplers import InstanceSampler
from ..losses import build_loss
from ..schedules import cosine_schedule
from .context import RunContext, loader_generator
from .loop import LoopState, SeededFetch, load_best, train_loop
from .predict import predict_logits, summarize
from ..evaluation.metrics import longtail_metrics


def finetune_stage1(ctx: RunContext) -> LoopState:
    """End to end on augmented images (optional mixup), CE loss; the model is left unwrapped with its best weights."""
    cfg, acc = ctx.cfg, ctx.accelerator
    loss_fn = build_loss("ce")
    train_ds = ctx.images("train", True)
    loader = DataLoader(SeededFetch(train_ds, cfg.seed), batch_size=cfg.batch_size,
                        sampler=InstanceSampler(len(train_ds), seed=cfg.seed), num_workers=cfg.num_workers,
                        generator=loader_generator(cfg.seed))
    opt = ctx.sgd(ctx.model.parameters(), cfg.stage1_lr, cfg.weight_decay)
    model, opt, loader = acc.prepare(ctx.model, opt, loader)
    val_loader = ctx.image_loader("val")
    beta = torch.distributions.Beta(cfg.mixup_alpha, cfg.mixup_alpha) if cfg.mixup_alpha > 0 else None

    def step(batch: Any) -> torch.Tensor:
        x, y = batch["pixel_values"], batch["labels"]
        if beta is None:
            return loss_fn(model(x).logits, y)
        lam = float(beta.sample())  # λ ~ Beta(α, α); partner = a permutation of the batch (H2T/MiSLAS stage 1)
        perm = torch.randperm(x.shape[0], generator=ctx.fusion_generator).to(x.device)
        logits = model(lam * x + (1 - lam) * x[perm]).logits
        return lam * loss_fn(logits, y) + (1 - lam) * loss_fn(logits, y[perm])

    def evaluate(_epoch: int) -> dict[str, float]:
        model.eval()
        logits, y = predict_logits(acc, lambda x: model(x).logits, val_loader)
        return summarize(longtail_metrics(logits, y, ctx.counts))

    state = train_loop(acc, trainable=model, optimizer=opt, loader=loader, step=step, epochs=cfg.stage1_epochs,
                       lr_scheduler=cosine_schedule(opt, cfg.stage1_epochs), evaluate=evaluate,
                       checkpoint_dir=ctx.checkpoint_dir("stage1"), checkpoint_every=cfg.checkpoint_every,
                       keep_last=cfg.keep_last, resume=cfg.resume, batch_size_of=lambda b: len(b["labels"]),
                       desc="stage 1", callbacks=ctx.callbacks, extra_state=ctx.extra_state, progress=ctx.progress)
    if not state.stopped:
        load_best(acc.unwrap_model(model), state)
    ctx.model = acc.unwrap_model(model)
    return state


def linear_stage1(ctx: RunContext) -> LoopState:
    """The head alone on cached features of the frozen pretrained backbone (a linear probe), CE loss."""
    cfg, acc = ctx.cfg, ctx.accelerator
    head = ctx.model.classifier
    loss_fn = build_loss("ce")
    ds = batch_fetching(ctx.features["train"])
    loader = DataLoader(ds, batch_size=cfg.batch_size, sampler=InstanceSampler(len(ds), seed=cfg.seed),
                        generator=loader_generator(cfg.seed), collate_fn=collate_rows)
    opt = ctx.sgd(head.parameters(), cfg.stage1_lr, cfg.weight_decay)
    head_p, opt, loader = acc.prepare(head, opt, loader)
    state = train_loop(
        acc, trainable=head_p, optimizer=opt, loader=loader, step=lambda b: loss_fn(head_p(b[0].float()), b[1]),
        epochs=cfg.stage1_epochs, lr_scheduler=cosine_schedule(opt, cfg.stage1_epochs),
        evaluate=lambda e: summarize(ctx.eval_head(head_p, "val")), checkpoint_dir=ctx.checkpoint_dir("stage1"),
        checkpoint_every=cfg.checkpoint_every, keep_last=cfg.keep_last, resume=cfg.resume,
        batch_size_of=lambda b: len(b[1]), desc="stage 1 (linear)", callbacks=ctx.callbacks,
        extra_state=ctx.extra_state, progress=ctx.progress)
    if not state.stopped:
        load_best(head, state)
    return state


__all__ = ["finetune_stage1", "linear_stage1"]
