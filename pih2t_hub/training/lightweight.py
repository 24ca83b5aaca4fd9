"""Stage 1 by lightweight fine-tuning (LIFT, Shi et al., ICML 2024): a small module inside the frozen backbone.

LIFT's recipe: the pretrained backbone stays frozen (and in eval mode: its normalisation statistics and dropout
are the pretrained model's); a LoRA, AdaptFormer, BitFit or VPT module is trained together with a cosine head
(scale 25) initialised from the class means of the frozen backbone's features, with the logit-adjusted loss
(τ = 1), SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 128, 10 epochs, cosine schedule. The best epoch on
the validation split is kept; LoRA is then merged into the weights, so the saved model carries no ``peft`` layer.
Stage 2 then runs on the adapted backbone's cached features, as after any stage 1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..data.samplers import InstanceSampler
from ..data.transforms import ImageTransform, apply_transform
from ..evaluation.metrics import longtail_metrics
from ..losses import build_loss
from ..models.adapt import adapt, resolve_spec
from ..models.pih2t.heads import CosineHead, LinearHead
from .cache import extract_features
from .context import RunContext, loader_generator
from ..schedules import cosine_schedule
from .loop import LoopState, SeededFetch, load_best, train_loop
from .predict import predict_logits, summarize


class _Tuned(nn.Module):
    """The model as stage 1 trains it: ``train()`` switches only the head and the tuning modules to training mode
    (the frozen backbone keeps its pretrained statistics); forward gives the logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values).logits

    def train(self, mode: bool = True) -> "_Tuned":
        self.training = mode
        self.model.eval()
        self.model.classifier.train(mode)
        if self.model.pih2t.tuning is not None:
            self.model.pih2t.tuning.train(mode)
        return self


@torch.no_grad()
def class_mean_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, kind: str,
                    scale: float) -> nn.Module:
    """LIFT's head initialisation: each class's weight is the normalised mean of its frozen features.

    ``cosine``: ``s·cos(μ̂_c, f)``. ``linear``: ``(s / r̄)·μ̂_c·f`` with ``r̄`` the mean feature norm, the same
    logits at a feature of typical norm; no bias (a linear head keeps the export to plain timm open).
    """
    x, y = features.float(), labels.long()
    counts = torch.bincount(y, minlength=num_classes)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"class-mean head initialisation needs a training image per class; {missing[:10]} have none")
    means = torch.zeros(num_classes, x.shape[1]).index_add_(0, y, x) / counts[:, None].float()
    weight = F.normalize(means, dim=1)
    if kind == "cosine":
        head: nn.Module = CosineHead(x.shape[1], num_classes, scale=scale)
        head.weight.copy_(weight)
        return head
    head = LinearHead(x.shape[1], num_classes, bias=True)
    head.weight.copy_(weight * (scale / float(x.norm(dim=1).mean().clamp_min(1e-12))))
    head.bias.zero_()
    return head


def _start_head(ctx: RunContext) -> nn.Module:
    """Features of the frozen pretrained backbone on the training split (the run's feature cache, so a linear
    probe of the same backbone reuses them), their class means as the head; the model's config records it."""
    cfg, model = ctx.cfg, ctx.model
    x, y = extract_features(ctx, ("train",))["train"].tensors
    head = class_mean_head(torch.as_tensor(x), torch.as_tensor(y), model.config.num_labels, cfg.peft_head,
                           cfg.peft_scale)
    ctx.features.clear()  # these are the un-adapted backbone's: stage 2 extracts the adapted one's
    model.config.head_type = cfg.peft_head
    if cfg.peft_head == "cosine":
        model.config.cosine_scale = float(cfg.peft_scale)
    else:
        model.config.head_bias = True
    return head.to(next(model.parameters()).device)


def peft_stage1(ctx: RunContext) -> LoopState:
    """Train the tuning module and the head on augmented images; the model is left with its best weights, LoRA
    merged, and ``config.tuning`` recording the kind, its sizes and the trainable parameters."""
    cfg, acc = ctx.cfg, ctx.accelerator
    if getattr(ctx.model.config, "tuning", None):  # before any extraction (the CLI refuses it earlier still)
        raise ValueError(f"the start model was already adapted ({ctx.model.config.tuning.get('kind')}); lightweight "
                         "fine-tuning starts from a model without a tuning module")
    ctx.model.classifier = _start_head(ctx)
    targets = [t.strip() for t in cfg.peft_targets.split(",") if t.strip()] if cfg.peft_targets else None
    spec = resolve_spec(ctx.model, cfg.peft, rank=cfg.peft_rank, alpha=cfg.peft_alpha, targets=targets,
                        prompts=cfg.peft_prompts)
    adapted = adapt(ctx.model, spec)
    acc.print(f"stage 1 (peft {spec['kind']}): {adapted.spec['trainable_params']:,} trainable backbone parameters "
              f"({adapted.spec['trainable_percent']:.3g} % of {adapted.spec['backbone_params']:,}) + the head")
    loss_fn = build_loss("logit_adjusted", class_counts=ctx.counts.tolist(), tau=cfg.peft_tau)
    train_ds = ctx.images("train", True)
    loader = DataLoader(SeededFetch(train_ds, cfg.seed), batch_size=cfg.batch_size,
                        sampler=InstanceSampler(len(train_ds), seed=cfg.seed), num_workers=cfg.num_workers,
                        generator=loader_generator(cfg.seed))
    tuned = _Tuned(ctx.model)
    opt = ctx.sgd(tuned.parameters(), cfg.peft_lr, cfg.weight_decay)
    tuned_p, opt, loader = acc.prepare(tuned, opt, loader)
    val_loader = ctx.image_loader("val")

    def evaluate(_epoch: int) -> dict[str, float]:
        tuned_p.eval()
        logits, y = predict_logits(acc, tuned_p, val_loader)
        return summarize(longtail_metrics(logits, y, ctx.counts))

    state = train_loop(acc, trainable=tuned_p, optimizer=opt, loader=loader,
                       step=lambda b: loss_fn(tuned_p(b["pixel_values"]), b["labels"]), epochs=cfg.stage1_epochs,
                       lr_scheduler=cosine_schedule(opt, cfg.stage1_epochs), evaluate=evaluate,
                       checkpoint_dir=ctx.checkpoint_dir("stage1"), checkpoint_every=cfg.checkpoint_every,
                       keep_last=cfg.keep_last, resume=cfg.resume, batch_size_of=lambda b: len(b["labels"]),
                       desc=f"stage 1 (peft {spec['kind']})", callbacks=ctx.callbacks, extra_state=ctx.extra_state,
                       progress=ctx.progress)
    if state.stopped:
        return state
    load_best(acc.unwrap_model(tuned_p), state)
    ctx.model = adapted.finish()
    ctx.model.requires_grad_(False)
    ctx.model.classifier.requires_grad_(True)
    ctx.model.eval()
    return state


class FiveCrops:
    """LIFT's test-time ensemble input: resize the short side to the input size + ``expand`` pixels, take the four
    corner crops and the centre crop at the input size, normalise each: a ``5×C×H×W`` tensor per image."""

    def __init__(self, data_config: dict[str, Any], expand: int = 24) -> None:
        from torchvision import transforms as T

        _, h, w = (int(v) for v in data_config["input_size"])
        mode = str(data_config.get("interpolation", "bilinear"))
        modes = {"bicubic": T.InterpolationMode.BICUBIC, "nearest": T.InterpolationMode.NEAREST}
        self.resize = T.Resize(min(h, w) + int(expand), interpolation=modes.get(mode, T.InterpolationMode.BILINEAR))
        self.crops = T.FiveCrop((h, w))
        self.normalize = T.Compose([T.ToTensor(), T.Normalize(data_config["mean"], data_config["std"])])

    def __call__(self, image: Any) -> torch.Tensor:
        return torch.stack([self.normalize(crop) for crop in self.crops(self.resize(image))])

    def __repr__(self) -> str:
        return f"FiveCrops({self.resize!r}, {self.crops!r}, {self.normalize!r})"


@torch.no_grad()
def tta_metrics(ctx: RunContext, split: str = "test") -> dict[str, Any]:
    """Long-tail metrics of the saved model with LIFT's test-time ensemble: the logits of five crops averaged."""
    ds = apply_transform(ctx.data[split], ImageTransform(FiveCrops(ctx.data_config), "LIFT five crops"),
                         image_column=ctx.cfg.image_column, label_column=ctx.data["label_column"])
    loader = ctx.accelerator.prepare(DataLoader(ds, batch_size=ctx.cfg.batch_size, num_workers=ctx.cfg.num_workers))
    model = ctx.model.eval()

    def ensemble(x: torch.Tensor) -> torch.Tensor:
        return model(x.flatten(0, 1)).logits.view(x.shape[0], x.shape[1], -1).mean(1)

    logits, y = predict_logits(ctx.accelerator, ensemble, loader)
    return longtail_metrics(logits, y, ctx.counts)


__all__ = ["peft_stage1", "class_mean_head", "FiveCrops", "tta_metrics"]
