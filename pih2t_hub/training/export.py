"""What a run leaves behind: the model folder (weights, config, processor, code, card, plot) and ``results.json``.

The saved model is the exported one — the method has already put its inference head into it — and the reported
test numbers were computed with that same model, so re-evaluating the folder gives the card's numbers.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .context import RunContext

PLOT = "accuracy_vs_frequency.png"

#: the run's own values on the card; the method adds its parameters (``Method.card_params``)
RUN_HPARAMS = ("loss", "sampler", "stage1_mode", "stage2_mode", "shift_bn", "stage1_epochs", "stage1_lr",
               "stage2_epochs", "stage2_lr", "stage2_batch_size", "stage2_weight_decay", "weight_decay", "momentum",
               "batch_size", "mixup_alpha", "loss_kwargs")


def write_outputs(ctx: RunContext, results: dict[str, Any]) -> None:
    """Model folder (weights, config, processor, code, plot, card), ``results.json`` and the recorded
    ``run_config.yaml`` written as one unit (:func:`~pih2t_hub.hub.save.save_run_outputs`: a failed save leaves the
    previous outputs intact); then the timm export and the push, if asked for."""
    import yaml

    from ..hub.save import save_run_outputs
    from .record import recorded_config

    model, out = ctx.model, ctx.out
    derived = results.get("derived_loss_kwargs")  # e.g. LDAM-DRW's re-weighting epoch, derived from the epochs
    cfg = ctx.cfg = recorded_config(ctx.cfg, image_size=results["image_size"],
                                    mixed_precision=results["mixed_precision"],
                                    loss_kwargs={**ctx.cfg.loss_kwargs, **derived} if derived else None)
    extra: dict[str, Any] = {}
    if "per_class" in results:
        from ..evaluation.plots import plot_accuracy_vs_frequency

        extra[PLOT] = lambda path: plot_accuracy_vs_frequency(
            {results["method"]: np.asarray(results["per_class"])}, ctx.counts, path)
    card = _render_card(ctx, results) if "test" in results else None
    if card is not None:
        extra["README.md"] = card
    side = {"results.json": json.dumps(results, indent=2, sort_keys=True, default=str),
            "run_config.yaml": yaml.safe_dump(cfg.to_dict(), sort_keys=False)}
    model_dir = save_run_outputs(out, model, extra_files=extra, side_files=side)
    if cfg.export == "timm":  # also as a plain timm folder (loads without pih2t_hub and without remote code)
        from ..hub.timm_export import export_timm

        export_timm(model, out / "timm", overwrite=True)
    if cfg.push_to_hub:
        _push(ctx, results, model_dir)


def _card_config(ctx: RunContext, results: dict[str, Any]) -> dict[str, Any]:
    """The card is rendered from the resolved run config, the method's recipe source and the run's facts."""
    cfg = ctx.cfg
    recipe = ctx.method.recipe
    hparams = {k: getattr(cfg, k) for k in RUN_HPARAMS}
    hparams.update(ctx.method.card_params())
    hparams["recipe_source"] = recipe.source if recipe is not None else "no stage-2 training"
    return {**cfg.to_dict(), "global_batch_size": results["global_batch"], "hyperparameters": hparams,
            "hardware": f"{results['num_processes']} process(es), {platform.machine()}, torch {torch.__version__}",
            "backbone_tag": ctx.model.config.backbone_tag, "class_counts": ctx.counts.tolist(),
            "tuning": getattr(ctx.model.config, "tuning", None)}


def _render_card(ctx: RunContext, results: dict[str, Any]) -> str | None:
    """The model card's text, or None (with the reason printed) when the results cannot fill it."""
    from ..hub.model_card import render_model_card

    plot = PLOT if "per_class" in results else None
    try:
        return str(render_model_card(_card_config(ctx, results), results["test"], plot_path=plot,
                                     allow_empty_groups=True))
    except (TypeError, ValueError) as err:  # a group without classes (e.g. no few-shot class) etc.
        print(f"model card not written: {err}")
        return None


def _push(ctx: RunContext, results: dict[str, Any], model_dir: Path) -> None:
    """Push the saved folder (``hub_format="pih2t"``, its README.md is the card above) or the timm export."""
    from ..hub.push import push_to_hub

    cfg = ctx.cfg
    if cfg.hub_format == "timm":
        push_to_hub(ctx.model, cfg.hub_model_id, hub_format="timm", config=_card_config(ctx, results),
                    results=results["test"], plot=model_dir / PLOT, allow_empty_groups=True)
    else:  # push_to_hub validates everything before uploading
        push_to_hub(model_dir, cfg.hub_model_id, allow_empty_groups=True)
    print(f"pushed {model_dir if cfg.hub_format == 'pih2t' else 'the timm export'} to the Hub as {cfg.hub_model_id}")


__all__ = ["write_outputs"]
