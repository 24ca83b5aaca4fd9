"""A whole run, left to right: data → long-tailed subset → model → stage 1 → stage 2 → metrics → save / push.

Both stages go through :func:`pih2t_hub.training.loop.train_loop`; what differs is the ``step`` (batch → loss):

* stage 1 ``finetune``: images through backbone (+PIF) and head, end to end (optional mixup);
* stage 1 ``linear``: the head alone on cached pooled features of the frozen pretrained backbone;
* stage 2 ``cached``: the head on cached pooled features, with the method's sampler, fusion and loss;
* stage 2 ``online``: the faithful recipe — two branches forwarded separately through the frozen backbone
  (train mode with shift-BN, so BN statistics are re-estimated), fusion on the un-pooled features.
"""

from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..data.features import load_or_extract
from ..data.longtail import make_long_tailed, resolve_label_column
from ..data.samplers import (
    ClassBalancedSampler,
    DualBranchDataset,
    DualBranchSampler,
    InstanceSampler,
    SquareRootSampler,
)
from ..data.sources import load_dataset_any
from ..data.splits import balanced_holdout, stratified_split
from ..data.transforms import apply_transform, build_transform
from ..evaluation.metrics import longtail_metrics
from ..losses import build_loss
from ..models.factory import create_model
from ..models.pih2t.fusion import PrototypeDistance, class_prototypes, h2t_fuse, h2tf_fuse
from .checkpoint import write_atomic_json
from .config import RunConfig
from .loop import GeneratorState, SeededFetch, cosine_per_epoch, load_best, train_loop
from .methods import MethodSpec, get_method
from .steps import cached_fused_features, online_fused_features

SUMMARY_KEYS = ("overall", "balanced", "many", "medium", "few", "ece")


# ---------------------------------------------------------------------------------------------- data


def load_splits(cfg: RunConfig) -> dict[str, Any]:
    """Train (long-tailed), validation (carved from it, stratified) and a balanced test split."""
    train_pool = load_dataset_any(cfg.dataset, split="train")
    label_col = resolve_label_column(train_pool, cfg.label_column)
    try:
        test = load_dataset_any(cfg.dataset, split="test")
    except (ValueError, KeyError, FileNotFoundError):
        test = None  # no test split: hold out a balanced one before making the training set long-tailed
    if test is None:
        labels = np.asarray(train_pool[label_col])
        rest, test_idx = balanced_holdout(labels, cfg.test_per_class, seed=cfg.seed)
        test = train_pool.select(test_idx)
        train_pool = train_pool.select(rest)
    if cfg.imbalance_ratio is None:
        # the train split is already long-tailed (ImageNet-LT, Places-LT, iNat-2018): use it whole
        lt_ds = _encode_labels(train_pool, label_col)
    else:
        lt = make_long_tailed(train_pool, cfg.imbalance_ratio, profile=cfg.profile, max_per_class=cfg.max_per_class,
                              label_column=cfg.label_column, seed=cfg.seed)
        lt_ds, label_col = lt.dataset, lt.label_column
    lt_labels = np.asarray(lt_ds[label_col])
    num_classes = int(lt_labels.max()) + 1
    feature = lt_ds.features[label_col]
    num_classes = max(num_classes, getattr(feature, "num_classes", 0) or 0)
    keep, val_idx = stratified_split(lt_labels, cfg.val_fraction, seed=cfg.seed)
    train, val = lt_ds.select(keep), lt_ds.select(val_idx)
    counts = np.bincount(lt_labels[keep], minlength=num_classes)
    names = getattr(train.features[label_col], "names", None) or [str(i) for i in range(num_classes)]
    return {"train": train, "val": val, "test": test, "label_column": label_col, "class_counts": counts,
            "id2label": dict(enumerate(names)), "num_classes": num_classes,
            "lt_counts": np.bincount(lt_labels, minlength=num_classes).tolist()}


def _encode_labels(ds: Any, column: str) -> Any:
    """String labels become a ``ClassLabel`` column (as ``make_long_tailed`` does)."""
    from datasets import ClassLabel

    return ds if isinstance(ds.features[column], ClassLabel) else ds.class_encode_column(column)


def _sampler(kind: str, labels: torch.Tensor, seed: int) -> Any:
    if kind == "instance":
        return InstanceSampler(len(labels), seed=seed)
    if kind == "balanced":
        return ClassBalancedSampler(labels, seed=seed)
    if kind == "sqrt":
        return SquareRootSampler(labels, seed=seed)
    if kind == "dual":
        return DualBranchSampler(labels, seed=seed)
    raise ValueError(f"unknown sampler {kind!r}")


# ---------------------------------------------------------------------------------------------- fusion


def make_fusion(spec: MethodSpec, cfg: RunConfig, generator: torch.Generator,
                prototypes: tuple[torch.Tensor, float] | None) -> Callable | None:
    """``fuse(fused, fusing, labels, channel_dim) -> fused features`` for the method, or None."""
    if spec.fusion is None:
        return None
    if spec.fusion == "h2t":
        return lambda f, g, y, cd: h2t_fuse(f, g, cfg.fusion_ratio, channel_dim=cd, generator=generator)[0]
    if spec.fusion == "h2tf":
        if prototypes is None:
            raise ValueError("H2TF needs class prototypes from stage-1 features")
        dist = PrototypeDistance(*prototypes)
        return lambda f, g, y, cd: h2tf_fuse(f, g, y, dist, mode=cfg.h2tf_mode, channel_dim=cd, generator=generator)[0]
    raise ValueError(f"unknown fusion {spec.fusion!r}")


# ---------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict_logits(accelerator: Any, fn: Callable[[Any], torch.Tensor], loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels over a prepared loader, gathered across processes without duplicates."""
    all_logits, all_labels = [], []
    for batch in loader:
        x, y = (batch["pixel_values"], batch["labels"]) if isinstance(batch, dict) else batch
        logits = fn(x)
        logits, y = accelerator.gather_for_metrics((logits.float(), y))
        all_logits.append(logits.cpu())
        all_labels.append(y.cpu())
    return torch.cat(all_logits).numpy(), torch.cat(all_labels).numpy()


def summarize(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(metrics[k]) for k in SUMMARY_KEYS if k in metrics}


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A plain-text results table (percentages)."""
    head = f"{'':<22}" + "".join(f"{k:>10}" for k in SUMMARY_KEYS)
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        cells = "".join(f"{100 * m[k]:>10.2f}" if k in m and not math.isnan(m[k]) else f"{'n/a':>10}"
                        for k in SUMMARY_KEYS)
        lines.append(f"{name:<22}{cells}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the run


def run(cfg: RunConfig, accelerator: Any | None = None, stop_after_steps: int | None = None) -> dict[str, Any]:
    """Execute a run and return its results (also written to ``<output_dir>/results.json``)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cfg.validate()
    spec = get_method(cfg.method)
    out = Path(cfg.output_dir)
    accelerator = accelerator or Accelerator(gradient_accumulation_steps=cfg.grad_accum,
                                             mixed_precision=cfg.mixed_precision, log_with=cfg.report_to,
                                             project_dir=str(out))
    if cfg.report_to:  # accelerate trackers (e.g. tensorboard): every epoch record goes through accelerator.log
        accelerator.init_trackers("pih2t", config={k: v for k, v in cfg.to_dict().items()
                                                   if isinstance(v, (int, float, str, bool))})
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "run_config.yaml")
    accelerator.wait_for_everyone()

    data = load_splits(cfg)  # seeded explicitly by cfg.seed; touches no global RNG
    # Seed the global RNGs (model init, augmentation) only now: loading a dataset may import modules lazily, and
    # some draw from the global RNG at import (sklearn -> rich), which made the first run in a process differ.
    set_seed(cfg.seed)
    counts = data["class_counts"]
    finetune = cfg.stage1_mode == "finetune" and cfg.stage in ("1", "both")
    if cfg.init_from:
        model = _load_initial_model(cfg.init_from, data["num_classes"], counts, spec.name, cfg.fusion_ratio)
    else:
        model = create_model(cfg.backbone, num_labels=data["num_classes"], pretrained=cfg.pretrained,
                             id2label=data["id2label"], class_counts=counts.tolist(), head_type=cfg.head_type,
                             method=spec.name, fusion_ratio=cfg.fusion_ratio, pif=spec.stage1_pif and finetune)
    size = cfg.image_size
    dc = dict(model.config.backbone_data_config)
    if size:
        dc["input_size"] = [3, size, size]
        model.config.backbone_data_config = dc
    eval_tf = build_transform(dc, train=False)
    train_tf = build_transform(dc, train=True)
    fusion_gen = torch.Generator().manual_seed(cfg.seed + 1)
    fusion_state = {"fusion_generator": GeneratorState(fusion_gen)}  # checkpointed by train_loop (safetensors)
    global_batch = cfg.batch_size * accelerator.num_processes * cfg.grad_accum
    results: dict[str, Any] = {"method": spec.name, "global_batch": global_batch, "num_processes":
                               accelerator.num_processes, "class_counts": counts.tolist()}
    label_col, image_col = data["label_column"], cfg.image_column

    def images(split: str, train: bool):
        return apply_transform(data[split], train_tf if train else eval_tf, image_column=image_col,
                               label_column=label_col)

    def image_loader(split: str, train: bool = False) -> DataLoader:
        return accelerator.prepare(DataLoader(images(split, train), batch_size=cfg.batch_size,
                                              num_workers=cfg.num_workers))

    def sgd(params, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in params if p.requires_grad], lr=lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)

    # ---------------- stage 1
    stage1_state = None
    if cfg.stage in ("1", "both") and finetune:
        loss_fn = build_loss("ce")
        train_ds = images("train", True)
        loader = DataLoader(SeededFetch(train_ds, cfg.seed), batch_size=cfg.batch_size,
                            sampler=InstanceSampler(len(train_ds), seed=cfg.seed), num_workers=cfg.num_workers,
                            drop_last=False, generator=_loader_generator(cfg.seed))
        opt = sgd(model.parameters(), cfg.stage1_lr)
        model, opt, loader = accelerator.prepare(model, opt, loader)
        val_loader = image_loader("val")
        beta = torch.distributions.Beta(cfg.mixup_alpha, cfg.mixup_alpha) if cfg.mixup_alpha > 0 else None

        def step1(batch):
            x, y = batch["pixel_values"], batch["labels"]
            if beta is None:
                return loss_fn(model(x).logits, y)
            lam = float(beta.sample())  # λ ~ Beta(α, α); partner = a permutation of the batch (H2T/MiSLAS stage 1)
            perm = torch.randperm(x.shape[0], generator=fusion_gen).to(x.device)
            logits = model(lam * x + (1 - lam) * x[perm]).logits
            return lam * loss_fn(logits, y) + (1 - lam) * loss_fn(logits, y[perm])

        def eval1(_epoch):
            model.eval()
            logits, y = predict_logits(accelerator, lambda x: model(x).logits, val_loader)
            return summarize(longtail_metrics(logits, y, counts))

        stage1_state = train_loop(accelerator, trainable=model, optimizer=opt, loader=loader, step=step1,
                                  epochs=cfg.stage1_epochs, lr_at_epoch=cosine_per_epoch(cfg.stage1_lr, cfg.stage1_epochs),
                                  evaluate=eval1, checkpoint_dir=out / "checkpoints" / "stage1",
                                  checkpoint_every=cfg.checkpoint_every, keep_last=cfg.keep_last, resume=cfg.resume,
                                  batch_size_of=lambda b: len(b["labels"]), desc="stage 1",
                                  stop_after_steps=stop_after_steps, extra_state=fusion_state)
        if stage1_state.epoch < cfg.stage1_epochs:
            return results  # interrupted on purpose (tests): stop the whole run, as a kill would
        load_best(accelerator.unwrap_model(model), stage1_state)
        model = accelerator.unwrap_model(model)

    # ---------------- features (frozen backbone, eval mode)
    model.eval()
    backbone = model.pih2t

    def encode(x: torch.Tensor) -> torch.Tensor:
        return backbone.pool(backbone.forward_features(x.to(accelerator.device)))

    weights_id = _weights_fingerprint(backbone)
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else out / "features"
    feats: dict[str, TensorDataset] = {}
    # H2TF needs class prototypes of stage-1 features, so it caches them even on the online path
    needs_cache = (cfg.stage2_mode == "cached" or not finetune or spec.tau_norm or spec.name == "dlsa"
                   or spec.fusion == "h2tf")
    if needs_cache:
        for split in ("train", "val", "test"):
            manifest = {"backbone": model.config.backbone, "weights": weights_id, "transform": repr(eval_tf),
                        "split": split, "seed": cfg.seed, "ir": cfg.imbalance_ratio,
                        # the split's exact rows (select() fingerprints are deterministic): a shared cache_dir
                        # must never serve features of other rows (e.g. another test_per_class or max_per_class)
                        "dataset": f"{cfg.dataset}:{data[split]._fingerprint}"}
            with accelerator.main_process_first():
                cache = load_or_extract(encode, images(split, False), cache_root / split, manifest,
                                        batch_size=cfg.batch_size, dtype=cfg.feature_dtype,
                                        progress=accelerator.is_local_main_process)
            feats[split] = cache.as_tensor_dataset()

    head = model.classifier

    def feature_loader(split: str) -> DataLoader:
        return accelerator.prepare(DataLoader(feats[split], batch_size=max(cfg.batch_size, 256)))

    def eval_head(h: nn.Module, split: str) -> dict[str, Any]:
        h.eval()
        logits, y = predict_logits(accelerator, lambda x: h(x.float()), feature_loader(split))
        return longtail_metrics(logits, y, counts)

    # ---------------- stage 1, linear probe on cached features
    if cfg.stage in ("1", "both") and not finetune:
        loss_fn = build_loss("ce")
        ds = feats["train"]
        loader = DataLoader(ds, batch_size=cfg.batch_size, sampler=InstanceSampler(len(ds), seed=cfg.seed),
                            generator=_loader_generator(cfg.seed))
        opt = sgd(head.parameters(), cfg.stage1_lr)
        head_p, opt, loader = accelerator.prepare(head, opt, loader)
        stage1_state = train_loop(
            accelerator, trainable=head_p, optimizer=opt, loader=loader,
            step=lambda b: loss_fn(head_p(b[0].float()), b[1]), epochs=cfg.stage1_epochs,
            lr_at_epoch=cosine_per_epoch(cfg.stage1_lr, cfg.stage1_epochs),
            evaluate=lambda e: summarize(eval_head(head_p, "val")), checkpoint_dir=out / "checkpoints" / "stage1",
            checkpoint_every=cfg.checkpoint_every, keep_last=cfg.keep_last, resume=cfg.resume,
            batch_size_of=lambda b: len(b[1]), desc="stage 1 (linear)", stop_after_steps=stop_after_steps,
            extra_state=fusion_state)
        if stage1_state.epoch < cfg.stage1_epochs:
            return results  # interrupted on purpose (tests)
        load_best(head, stage1_state)
    if stage1_state is not None:
        results["stage1"] = {"best_epoch": stage1_state.best_epoch, "history": stage1_state.history}
        if needs_cache:
            results["stage1"]["test"] = summarize(eval_head(head, "test"))

    # ---------------- stage 2
    stage2_state = None
    rows: dict[str, dict[str, float]] = {}
    if stage1_state is not None and needs_cache:
        rows["stage 1 (ce)"] = results["stage1"]["test"]
    if cfg.stage in ("2", "both") and spec.stage2:
        stage2_state, head = _stage2(accelerator, cfg, spec, model, head, feats, counts, data, images, fusion_gen,
                                     out, eval_head, image_loader, sgd, stop_after_steps)
        if stage2_state is None:
            return results  # interrupted on purpose (tests)
        results["stage2"] = {"best_epoch": stage2_state.best_epoch, "history": stage2_state.history}
    elif cfg.stage in ("2", "both") and spec.tau_norm:
        head = _apply_tau_norm(head, feats, results)
    elif cfg.stage in ("2", "both") and spec.name == "dlsa":
        rows[spec.name] = _run_dlsa(cfg, feats, counts, head, results, model)

    # ---------------- final evaluation on test
    if spec.name != "dlsa":
        model.classifier = head
        if needs_cache and cfg.stage2_mode == "cached":
            final = eval_head(head, "test")
        else:
            model.eval()
            logits, y = predict_logits(accelerator, lambda x: model(x).logits, image_loader("test"))
            final = longtail_metrics(logits, y, counts)
        rows[spec.name] = summarize(final)
        results["test"] = summarize(final)
        results["per_class"] = [float(a) for a in final["per_class"]]
        if stage2_state is not None and stage2_state.history:
            results["last_epoch_val"] = {k[4:]: v for k, v in stage2_state.history[-1].items() if k.startswith("val_")}
    results["table"] = rows
    if accelerator.is_main_process:
        _write_outputs(cfg, model, results, counts, out)
    accelerator.wait_for_everyone()
    accelerator.print(format_table(rows))
    accelerator.print(f"model, card and plot written to {out / 'model'}")
    if cfg.report_to:
        accelerator.end_training()
    return results


def _batch_len(batch: Any) -> int:
    """Samples in a batch of any of the loaders (dual-branch or not, images or cached features)."""
    if isinstance(batch, dict):
        batch = batch.get("fused", batch)
    if isinstance(batch, dict):
        return len(batch["labels"])
    return len(batch[1])


def _load_initial_model(path: str, num_classes: int, counts: np.ndarray, method: str, ratio: float) -> nn.Module:
    """A saved PI-H2T model (e.g. the ``model/`` folder of a stage-1 run) to continue from."""
    from ..models.pih2t import PIH2TForImageClassification

    model = PIH2TForImageClassification.from_pretrained(path)
    if model.config.num_labels != num_classes:
        raise ValueError(f"--init-from {path} has {model.config.num_labels} classes but the dataset has {num_classes}")
    model.config.class_counts = counts.tolist()
    model.config.method, model.config.fusion_ratio = method, float(ratio)
    return model


def _loader_generator(seed: int) -> torch.Generator:
    """A training loader's own generator: creating its iterator then draws the worker base seed from it instead
    of the global torch RNG, so a resumed run (one extra iterator mid-epoch) keeps the global stream in step."""
    return torch.Generator().manual_seed(seed)


class _BufferState:
    """Checkpoints a frozen module's buffers (BN running statistics re-estimated by shift-BN in stage 2 online)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: buf for name, buf in self.module.named_buffers()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        buffers = dict(self.module.named_buffers())
        if set(state) != set(buffers):
            raise KeyError(f"buffer names differ from the checkpoint: {sorted(set(state) ^ set(buffers))[:5]}")
        with torch.no_grad():
            for name, value in state.items():
                buffers[name].copy_(value)


class _BufferSnapshots:
    """Float buffers (BN running statistics) of a module at the end of each epoch, checkpointable.

    Shift-BN re-estimates the frozen backbone's statistics every step; the head chosen on validation was scored
    with the statistics of its own epoch, so those are the ones the saved model must carry.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.saved: dict[int, dict[str, torch.Tensor]] = {}

    def take(self, epoch: int) -> None:
        self.saved[epoch] = {n: b.detach().cpu().clone() for n, b in self.module.named_buffers()
                             if b.is_floating_point()}

    def restore(self, epoch: int) -> None:
        if epoch not in self.saved:
            raise KeyError(f"no BN statistics were kept for epoch {epoch}")
        buffers = dict(self.module.named_buffers())
        with torch.no_grad():
            for name, value in self.saved[epoch].items():
                buffers[name].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"epochs": torch.tensor(sorted(self.saved), dtype=torch.int64)}
        for e, bufs in self.saved.items():
            out.update({f"{e}/{n}": b for n, b in bufs.items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.saved = {}
        for e in state["epochs"].tolist():
            prefix = f"{e}/"
            self.saved[e] = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _average_buffers(accelerator: Any, module: nn.Module) -> None:
    """Average float buffers across processes (each rank re-estimates shift-BN statistics on its own shard)."""
    if accelerator.num_processes == 1:
        return
    with torch.no_grad():
        for buf in module.buffers():
            if buf.is_floating_point():
                buf.copy_(accelerator.reduce(buf.detach().clone(), reduction="mean"))


def _weights_fingerprint(backbone: nn.Module) -> str:
    """SHA-256 of the backbone's state (weights and buffers), so a fine-tuned or re-estimated backbone never
    reuses features cached from other weights."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _stage2(accelerator, cfg, spec, model, head, feats, counts, data, images, fusion_gen, out, eval_head,
            image_loader, sgd, stop_after_steps):
    """Classifier retraining with the method's sampler, fusion and loss; returns ``(state, trained head)``."""
    from ..methods.decoupling import LWSHead, crt_reinit

    if spec.reinit_head:
        head = crt_reinit(head, generator=torch.Generator().manual_seed(cfg.seed + 2))
    trainable = LWSHead(head) if spec.lws else head
    loss_fn = build_loss(spec.loss, class_counts=counts.tolist(), **{**spec.loss_kwargs, **cfg.loss_kwargs})
    prototypes = None
    if spec.fusion == "h2tf":
        x, y = feats["train"].tensors
        prototypes = class_prototypes(x.float(), y, len(counts))
    fuse = make_fusion(spec, cfg, fusion_gen, prototypes)
    dual = spec.sampler == "dual"
    label_col = data["label_column"]
    if cfg.stage2_mode == "cached":
        base = feats["train"]
        labels = base.tensors[1]
        ds = DualBranchDataset(base) if dual else base
    else:
        base = images("train", True)
        labels = torch.as_tensor(np.asarray(data["train"][label_col]))
        ds = SeededFetch(DualBranchDataset(base) if dual else base, cfg.seed)
    loader = DataLoader(ds, batch_size=cfg.batch_size, sampler=_sampler(spec.sampler, labels, cfg.seed),
                        num_workers=cfg.num_workers, generator=_loader_generator(cfg.seed))
    opt = sgd(trainable.parameters(), cfg.lr)
    trainable, opt, loader = accelerator.prepare(trainable, opt, loader)
    backbone = model.pih2t.to(accelerator.device)
    backbone.requires_grad_(False)
    extra = {"fusion_generator": GeneratorState(fusion_gen)}
    if cfg.stage2_mode == "online":
        extra["backbone_buffers"] = _BufferState(backbone)  # not in a prepared model when stage 1 was linear
        snapshots = _BufferSnapshots(backbone)  # BN statistics of every epoch, to go with the best epoch's head
        extra["bn_snapshots"] = snapshots

    def step_cached(batch):
        if dual:
            (xf, yf), (xg, _) = batch["fused"], batch["fusing"]
        else:
            (xf, yf), xg = batch, None
        return loss_fn(trainable(cached_fused_features(xf, xg, yf, fuse)), yf)

    def step_online(batch):
        if dual:
            xf, yf, xg = batch["fused"]["pixel_values"], batch["fused"]["labels"], batch["fusing"]["pixel_values"]
        else:
            xf, yf, xg = batch["pixel_values"], batch["labels"], None
        pooled = online_fused_features(backbone, xf, xg, yf, fuse, spec.fusion, cfg.shift_bn)
        return loss_fn(trainable(pooled), yf)

    if cfg.stage2_mode == "cached":
        evaluate = lambda e: summarize(eval_head(trainable, "val"))  # noqa: E731
        step = step_cached
    else:
        val_loader = image_loader("val")

        def evaluate(epoch):
            _average_buffers(accelerator, backbone)  # one set of re-estimated BN statistics across ranks
            snapshots.take(epoch)
            backbone.eval()
            trainable.eval()
            logits, y = predict_logits(accelerator, lambda x: trainable(backbone(x).pooler_output), val_loader)
            return summarize(longtail_metrics(logits, y, counts))

        step = step_online
    hooks = [loss_fn] if hasattr(loss_fn, "set_epoch") else []
    state = train_loop(accelerator, trainable=trainable, optimizer=opt, loader=loader, step=step, epochs=cfg.epochs,
                       lr_at_epoch=cosine_per_epoch(cfg.lr, cfg.epochs), evaluate=evaluate,
                       checkpoint_dir=out / "checkpoints" / "stage2", checkpoint_every=cfg.checkpoint_every,
                       keep_last=cfg.keep_last, resume=cfg.resume, set_epoch_hooks=hooks,
                       batch_size_of=_batch_len, desc=f"stage 2 ({spec.name})", stop_after_steps=stop_after_steps,
                       extra_state=extra)
    if stop_after_steps is not None and state.global_step >= stop_after_steps and state.epoch < cfg.epochs:
        return None, None
    unwrapped = accelerator.unwrap_model(trainable)
    load_best(unwrapped, state)
    if cfg.stage2_mode == "online" and state.best_epoch >= 0:
        snapshots.restore(state.best_epoch)  # the head was selected with these statistics
    final_head = unwrapped.to_linear() if spec.lws else unwrapped
    backbone.eval()
    return state, final_head


def _apply_tau_norm(head: nn.Module, feats: dict[str, TensorDataset], results: dict[str, Any]) -> nn.Module:
    from ..methods.decoupling import select_tau, tau_normalize

    x, y = feats["val"].tensors
    bias = getattr(head, "bias", None)
    sel = select_tau(head.weight.detach(), bias.detach() if bias is not None else None, x.float(), y)
    with torch.no_grad():
        head.weight.copy_(tau_normalize(head.weight, sel.tau))
    results["tau"] = sel.tau
    return head


def _run_dlsa(cfg: RunConfig, feats, counts, head, results, model) -> dict[str, float]:
    from ..methods.dlsa import DLSAConfig, fit_dlsa, install_head

    xtr, ytr = feats["train"].tensors
    xva, yva = feats["val"].tensors
    xte, yte = feats["test"].tensors
    dl_cfg = DLSAConfig(**cfg.loss_kwargs) if cfg.loss_kwargs else DLSAConfig()
    dl = fit_dlsa(xtr.float(), ytr, xva.float(), yva, dl_cfg, seed=cfg.seed,
                  stage1_weight=head.weight.detach(), stage1_bias=getattr(head, "bias", None))
    with torch.no_grad():
        logits = dl.logits(xte.float())  # logits, not argmax: hard predictions have no ECE (summarize failed on None)
    final = longtail_metrics(logits.float().numpy(), yte.numpy(), counts)
    m = summarize(final)
    results["test"] = m
    results["per_class"] = [float(a) for a in final["per_class"]]
    results["dlsa"] = {"config": dl_cfg.to_dict(), "history": dl.history}  # flow lr used, restarts, routed counts
    install_head(model, dl)  # the saved model is the one these numbers come from
    return m


def _write_outputs(cfg: RunConfig, model: nn.Module, results: dict[str, Any], counts: np.ndarray, out: Path) -> None:
    """Model folder (weights, config, processor, code), results JSON, frequency plot, model card."""
    model_dir = out / "model"
    model.save_pretrained(model_dir)
    write_atomic_json(out / "results.json", results)
    try:
        from ..evaluation.plots import plot_accuracy_vs_frequency

        if "per_class" in results:
            plot_accuracy_vs_frequency({results["method"]: np.asarray(results["per_class"])}, counts,
                                       model_dir / "accuracy_vs_frequency.png")
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        pass
    if "test" in results:
        from ..hub.model_card import render_model_card, write_model_card

        hparams = {k: getattr(cfg, k) for k in ("fusion_ratio", "h2tf_mode", "stage1_mode", "stage2_mode", "shift_bn",
                                                 "stage1_epochs", "stage1_lr", "lr", "weight_decay", "momentum",
                                                 "batch_size", "mixup_alpha", "loss_kwargs")}
        card_cfg = {**cfg.to_dict(), "global_batch_size": results["global_batch"], "hyperparameters": hparams,
                    "hardware": f"{results['num_processes']} process(es), {platform.machine()}, torch {torch.__version__}",
                    "backbone_tag": model.config.backbone_tag, "class_counts": counts.tolist()}
        try:
            card = render_model_card(card_cfg, results["test"], plot_path="accuracy_vs_frequency.png",
                                     allow_empty_groups=True)
            write_model_card(card, model_dir)
        except (TypeError, ValueError) as err:  # a group without classes (e.g. no few-shot class) etc.
            print(f"model card not written: {err}")
    if cfg.push_to_hub:
        from ..hub.push import push_to_hub

        # the folder's README.md is the card rendered above; push_to_hub validates everything before uploading
        push_to_hub(model_dir, cfg.hub_model_id, allow_empty_groups=True)
        print(f"pushed {model_dir} to the Hub as {cfg.hub_model_id}")


__all__ = ["run", "load_splits", "format_table", "make_fusion", "predict_logits"]
