"""A run as a sequence of steps: data splits → model → stage 1 → features → stage 2 → export → evaluation.

The entry does every check once: :func:`run` checks the config against the machine
(:func:`~pih2t_hub.training.preflight.preflight`: dataset path, backbone weights, ...), :func:`run_checked`
resolves the method's recipe and guards the output folder (lock, resume check), then :func:`execute` walks the
steps. Each step is a function that takes and returns typed values (a :class:`RunConfig`, the data splits, a
:class:`~pih2t_hub.training.context.RunContext`, a loop state, a metrics mapping) and checks nothing again.
The comparison (:mod:`pih2t_hub.compare`) builds its bench with the same steps and retrains its final models with
the same stage 1 and stage 2, so a method trained by either gives the same head.
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
from .lightweight import peft_stage1
from .resume import clear_earlier_run
from .stage1 import finetune_stage1, linear_stage1
from .stage2 import method_context, run_stage2


# ---------------------------------------------------------------------------------------------- the entry


def run(cfg: RunConfig, accelerator: Any | None = None, callbacks: Iterable[LoopCallback] = ()) -> dict[str, Any]:
    """Execute a run from Python and return its results (also written to ``<output_dir>/results.json``).

    The config is validated and checked against the machine, then :func:`run_checked`. A callback that stops the
    loop (e.g. :class:`~pih2t_hub.training.loop.StopAfterSteps`) ends the whole run there, as a crash would:
    checkpoints are on disk and ``resume=True`` continues.
    """
    from .preflight import preflight

    return run_checked(preflight(cfg), accelerator, callbacks)


def run_checked(cfg: RunConfig, accelerator: Any | None = None,
                callbacks: Iterable[LoopCallback] = ()) -> dict[str, Any]:
    """A run whose config passed :func:`~pih2t_hub.training.preflight.preflight` (the command line checks it
    before its heavy imports): the method's recipe fills the stage-2 values left unset, the output directory is
    locked for the whole run and ``resume`` checked against the checkpoints' config
    (:func:`pih2t_hub.training.resume.run_guard`), then :func:`execute`."""
    from .resume import run_guard

    cfg = resolve_recipe(cfg)  # before the guard touches the output folder
    with run_guard(cfg):
        return execute(cfg, accelerator, list(callbacks))


def resolve_recipe(cfg: RunConfig) -> RunConfig:
    """The method's published recipe in the stage-2 values left unset; the recipe's values validated."""
    return get_method(cfg.method).resolve(cfg).validate()


# ---------------------------------------------------------------------------------------------- the steps


def execute(cfg: RunConfig, accelerator: Any | None = None,
            callbacks: list[LoopCallback] | None = None) -> dict[str, Any]:
    """The steps of a run, for a config that passed the entry (checked, resolved, guarded)."""
    accelerator, precision = start_accelerator(cfg, accelerator)
    ctx = build_context(cfg, accelerator, load_data(cfg), get_method(cfg.method), callbacks)
    ctx.mixed_precision = precision
    clear_earlier_run(ctx.cfg, ctx.accelerator)  # every check passed: only now may an earlier run's checkpoints go
    results = _header(ctx)
    rows: dict[str, dict[str, float]] = {}
    stage1 = train_stage1(ctx)
    if stage1 is not None and stage1.stopped:
        return results
    if stage1 is not None:
        results["stage1"] = {"best_epoch": stage1.best_epoch, "history": stage1.history}
        if ctx.features:
            results["stage1"]["test"] = rows[_stage1_label(ctx)] = summarize(
                ctx.eval_head(ctx.model.classifier, "test"))
    if cfg.stage in ("2", "both"):
        stage2 = train_stage2(ctx, results)
        if stage2 is not None and stage2.stopped:
            return results
        if stage2 is not None:
            results["stage2"] = {"best_epoch": stage2.best_epoch, "history": stage2.history}
    final = evaluate_saved_model(ctx)  # the test split, once, on the model that is saved
    label = ctx.method.name if cfg.stage in ("2", "both") else _stage1_label(ctx)  # no stage 2: not the method's row
    results["test"] = rows[label] = summarize(final)
    if cfg.tta:  # an extra row: the saved model itself classifies one crop
        from .lightweight import tta_metrics

        results["test_tta"] = rows[f"{label} + TTA"] = summarize(tta_metrics(ctx))
    results["per_class"] = [float(a) for a in final["per_class"]]
    results["table"] = rows
    _write(ctx, results, rows)
    return results


def _stage1_label(ctx: RunContext) -> str:
    """The stage-1 row of the results table: what stage 1 trained with."""
    return f"stage 1 (peft {ctx.cfg.peft})" if ctx.peft else "stage 1 (ce)"


def start_accelerator(cfg: RunConfig, accelerator: Any | None = None) -> tuple[Any, str]:
    """accelerate for the run (its trackers started), the output folder made; the mixed precision that really
    runs (recorded)."""
    from accelerate import Accelerator

    out = Path(cfg.output_dir)
    accelerator = accelerator or Accelerator(gradient_accumulation_steps=cfg.grad_accum,
                                             mixed_precision=cfg.mixed_precision, log_with=cfg.report_to,
                                             project_dir=str(out))
    if cfg.report_to:  # accelerate trackers (e.g. tensorboard): every epoch record goes through accelerator.log
        accelerator.init_trackers("pih2t", config={k: v for k, v in cfg.to_dict().items()
                                                   if isinstance(v, (int, float, str, bool))})
    precision = resolve_mixed_precision(accelerator, cfg.mixed_precision)
    if accelerator.is_main_process:  # the config itself is recorded with the outputs, at the end (what ran)
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return accelerator, precision


def load_data(cfg: RunConfig) -> dict[str, Any]:
    """The data splits: long-tailed train, validation carved from it, test (seeded explicitly by ``cfg.seed``)."""
    from ..data import splits

    return splits.load_splits(cfg)  # looked up when called: a wrapped load_splits (tests, benchmarks) is used


def build_context(cfg: RunConfig, accelerator: Any, data: dict[str, Any], method_cls: type,
                  callbacks: list[LoopCallback] | None = None) -> RunContext:
    """The model for ``data``, the method (an instance of ``method_cls``) and what every later step works on.

    The global RNGs (model init, augmentation) are seeded only now: loading a dataset may import modules lazily,
    and some draw from the global RNG at import (sklearn -> rich), which made the first run in a process differ.
    """
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    return make_context(cfg, accelerator, data, method_cls(cfg), callbacks)


def train_stage1(ctx: RunContext) -> LoopState | None:
    """Stage 1, representation (end to end) or a linear probe on cached features, with the features extracted
    where the run reads them; None when the run has no stage 1."""
    stage1: LoopState | None = None
    if ctx.finetune or ctx.peft:  # the backbone learns: its features are extracted once it has
        stage1 = peft_stage1(ctx) if ctx.peft else finetune_stage1(ctx)
        if stage1.stopped:
            return stage1
    if needs_features(ctx):
        extract_features(ctx)
    if ctx.cfg.stage in ("1", "both") and not (ctx.finetune or ctx.peft):
        stage1 = linear_stage1(ctx)
    return stage1


def train_stage2(ctx: RunContext, results: dict[str, Any]) -> LoopState | None:
    """Stage 2: the method retrains (or post-processes) the head, then exports it into ``ctx.model``; None when
    the method trains nothing (a post-hoc step)."""
    mctx = method_context(ctx, results)
    stage2, head = run_stage2(ctx, mctx)
    if stage2 is None or not stage2.stopped:
        ctx.model = ctx.method.export(ctx.model, head, mctx)
    return stage2


def _header(ctx: RunContext) -> dict[str, Any]:
    cfg = ctx.cfg
    return {"method": ctx.method.name, "num_processes": ctx.accelerator.num_processes,
            "global_batch": cfg.batch_size * ctx.accelerator.num_processes * cfg.grad_accum,
            "class_counts": ctx.counts.tolist(), "image_size": used_image_size(ctx.data_config),
            "mixed_precision": ctx.mixed_precision, "skipped_images": ctx.data["skipped_images"],
            "unreadable_images": ctx.data.get("unreadable_images", [])}


def _write(ctx: RunContext, results: dict[str, Any], rows: dict[str, dict[str, float]]) -> None:
    """The export step: model folder, card, results and plot (main process), then the table."""
    if ctx.accelerator.is_main_process:
        write_outputs(ctx, results)
    ctx.accelerator.wait_for_everyone()
    ctx.accelerator.print(format_table(rows))
    ctx.accelerator.print(f"model, card and plot written to {ctx.out / 'model'}")
    if ctx.cfg.report_to:
        ctx.accelerator.end_training()


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


def evaluate_saved_model(ctx: RunContext) -> dict[str, Any]:
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


__all__ = ["run", "run_checked", "resolve_recipe", "execute", "start_accelerator", "load_data", "build_context",
           "train_stage1", "train_stage2", "evaluate_saved_model", "load_splits", "make_context"]
