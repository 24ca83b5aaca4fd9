"""A whole run, top to bottom: data → long-tailed subset → model → stage 1 → features → stage 2 → export → evaluate.

Each stage is a function of one :class:`~pih2t_hub.training.context.RunContext`; the method (a plug-in from
``pih2t_hub.methods``) decides what stage 2 does and what goes into the saved model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from ..data.splits import load_splits
from ..data.transforms import build_transform
from ..methods import get_method
from ..models.factory import create_model
from .cache import extract_features, needs_features
from .config import RunConfig
from .context import RunContext
from .export import write_outputs
from .loop import LoopCallback, LoopState
from .predict import format_table, summarize
from .record import resolve_mixed_precision, used_image_size
from .resume import clear_earlier_run
from .lightweight import peft_stage1
from .stage1 import finetune_stage1, linear_stage1
from .stage2 import method_context, run_stage2


def run(cfg: RunConfig, accelerator: Any | None = None, callbacks: Iterable[LoopCallback] = ()) -> dict[str, Any]:
    """Execute a run and return its results (also written to ``<output_dir>/results.json``).

    The method's recipe fills the stage-2 values left unset; the output directory is then locked for the whole run
    and ``resume`` is checked against the checkpoints' config (:func:`pih2t_hub.training.resume.run_guard`). A
    callback that stops the loop (e.g. :class:`~pih2t_hub.training.loop.StopAfterSteps`) ends the whole run there,
    as a crash would: checkpoints are on disk and ``resume=True`` continues.
    """
    from .resume import run_guard

    cfg = get_method(cfg.validate().method).resolve(cfg).validate()  # before the guard touches the output folder
    with run_guard(cfg):
        return _run(cfg, accelerator, list(callbacks))


def _run(cfg: RunConfig, accelerator: Any | None, callbacks: list[LoopCallback]) -> dict[str, Any]:
    ctx = _setup(cfg, accelerator, callbacks)
    cfg = ctx.cfg
    clear_earlier_run(cfg, ctx.accelerator)  # every check passed: only now may an earlier run's checkpoints go
    results: dict[str, Any] = {"method": ctx.method.name, "num_processes": ctx.accelerator.num_processes,
                               "global_batch": cfg.batch_size * ctx.accelerator.num_processes * cfg.grad_accum,
                               "class_counts": ctx.counts.tolist(), "image_size": used_image_size(ctx.data_config),
                               "mixed_precision": ctx.mixed_precision, "skipped_images": ctx.data["skipped_images"],
                               "unreadable_images": ctx.data.get("unreadable_images", [])}
    rows: dict[str, dict[str, float]] = {}

    # ---------------- stage 1: representation (end to end) or linear probe (on cached features)
    stage1: LoopState | None = None
    if ctx.finetune or ctx.peft:
        stage1 = peft_stage1(ctx) if ctx.peft else finetune_stage1(ctx)
        if stage1.stopped:
            return results
    if needs_features(ctx):
        extract_features(ctx)
    if cfg.stage in ("1", "both") and not (ctx.finetune or ctx.peft):
        stage1 = linear_stage1(ctx)
        if stage1.stopped:
            return results
    if stage1 is not None:
        results["stage1"] = {"best_epoch": stage1.best_epoch, "history": stage1.history}
        if ctx.features:
            results["stage1"]["test"] = rows[_stage1_label(ctx)] = summarize(
                ctx.eval_head(ctx.model.classifier, "test"))

    # ---------------- stage 2: the method retrains (or post-processes) the head, then exports it into the model
    if cfg.stage in ("2", "both"):
        mctx = method_context(ctx, results)
        stage2, head = run_stage2(ctx, mctx)
        if stage2 is not None and stage2.stopped:
            return results
        if stage2 is not None:
            results["stage2"] = {"best_epoch": stage2.best_epoch, "history": stage2.history}
        ctx.model = ctx.method.export(ctx.model, head, mctx)

    # ---------------- the test split, once, on the model that is saved
    final = _evaluate_saved_model(ctx)
    label = ctx.method.name if cfg.stage in ("2", "both") else _stage1_label(ctx)  # no stage 2: not the method's row
    results["test"] = rows[label] = summarize(final)
    if cfg.tta:  # an extra row: the saved model itself classifies one crop
        from .lightweight import tta_metrics

        results["test_tta"] = rows[f"{label} + TTA"] = summarize(tta_metrics(ctx))
    results["per_class"] = [float(a) for a in final["per_class"]]
    results["table"] = rows
    if ctx.accelerator.is_main_process:
        write_outputs(ctx, results)
    ctx.accelerator.wait_for_everyone()
    ctx.accelerator.print(format_table(rows))
    ctx.accelerator.print(f"model, card and plot written to {ctx.out / 'model'}")
    if cfg.report_to:
        ctx.accelerator.end_training()
    return results


def _stage1_label(ctx: RunContext) -> str:
    """The stage-1 row of the results table: what stage 1 trained with."""
    return f"stage 1 (peft {ctx.cfg.peft})" if ctx.peft else "stage 1 (ce)"


def _setup(cfg: RunConfig, accelerator: Any | None, callbacks: list[LoopCallback]) -> RunContext:
    """Resolve the method's recipe, start accelerate, write the resolved config, load the data, build the model."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from ..registry import check_backbone_available

    method_cls = get_method(cfg.validate().method)
    cfg = method_cls.resolve(cfg).validate()
    if not cfg.init_from:
        check_backbone_available(cfg.backbone, cfg.pretrained)  # one line, in seconds, before any data is read
    out = Path(cfg.output_dir)
    accelerator = accelerator or Accelerator(gradient_accumulation_steps=cfg.grad_accum,
                                             mixed_precision=cfg.mixed_precision, log_with=cfg.report_to,
                                             project_dir=str(out))
    if cfg.report_to:  # accelerate trackers (e.g. tensorboard): every epoch record goes through accelerator.log
        accelerator.init_trackers("pih2t", config={k: v for k, v in cfg.to_dict().items()
                                                   if isinstance(v, (int, float, str, bool))})
    precision = resolve_mixed_precision(accelerator, cfg.mixed_precision)  # recorded: what really ran
    if accelerator.is_main_process:  # the config itself is recorded with the outputs, at the end (what ran)
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    data = load_splits(cfg)  # seeded explicitly by cfg.seed; touches no global RNG
    # Seed the global RNGs (model init, augmentation) only now: loading a dataset may import modules lazily, and
    # some draw from the global RNG at import (sklearn -> rich), which made the first run in a process differ.
    set_seed(cfg.seed)
    ctx = make_context(cfg, accelerator, data, method_cls(cfg), callbacks)
    ctx.mixed_precision = precision
    return ctx


def make_context(cfg: RunConfig, accelerator: Any, data: dict[str, Any], method: Any,
                 callbacks: list[LoopCallback] | None = None) -> RunContext:
    """The model for ``data`` (created, or loaded with ``init_from``) with its input size, transforms and
    generators: what every stage of a run works on."""
    model = _build_model(cfg, data, type(method))
    dc = dict(model.config.backbone_data_config)
    if cfg.image_size:
        dc["input_size"] = [3, cfg.image_size, cfg.image_size]
        model.config.backbone_data_config = dc
    return RunContext(accelerator=accelerator, cfg=cfg, method=method, data=data, model=model, data_config=dc,
                      train_tf=build_transform(dc, train=True), eval_tf=build_transform(dc, train=False),
                      callbacks=list(callbacks or []), fusion_generator=torch.Generator().manual_seed(cfg.seed + 1))


def _build_model(cfg: RunConfig, data: dict[str, Any], method_cls: Any) -> nn.Module:
    counts = data["class_counts"]
    if cfg.init_from:
        return _load_initial_model(cfg.init_from, data["num_classes"], counts, method_cls.name)
    finetune = cfg.stage1_mode == "finetune" and cfg.stage in ("1", "both")
    return create_model(cfg.backbone, num_labels=data["num_classes"], pretrained=cfg.pretrained,
                        id2label=data["id2label"], class_counts=counts.tolist(), head_type=cfg.head_type,
                        method=method_cls.name, pif=method_cls.stage1_pif and finetune)


def _evaluate_saved_model(ctx: RunContext) -> dict[str, Any]:
    """Test metrics of the exported model: its head on the cached test features when those were extracted with
    the backbone the model carries, else the whole model on the test images."""
    if ctx.features and ctx.cfg.stage2_mode == "cached":
        return ctx.eval_head(ctx.model.classifier, "test")
    return ctx.eval_model("test")


def _load_initial_model(path: str, num_classes: int, counts: np.ndarray, method: str) -> nn.Module:
    """A saved PI-H2T model (e.g. the ``model/`` folder of a stage-1 run) to continue from."""
    from .._progress import quiet_transformers_bars
    from ..models.pih2t import PIH2TForImageClassification

    with quiet_transformers_bars():
        model = PIH2TForImageClassification.from_pretrained(path)
    if model.config.num_labels != num_classes:
        raise ValueError(f"--init-from {path} has {model.config.num_labels} classes but the dataset has {num_classes}")
    model.config.class_counts = counts.tolist()
    model.config.method = method  # the method's parameters (a fusion ratio) are recorded by its export
    return model


__all__ = ["run", "load_splits", "make_context"]
