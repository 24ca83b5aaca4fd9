"""What a run leaves behind: the model folder (weights, config, processor, code, card, plot) and ``results.json``.

The saved model is the exported one — the method has already put its inference head into it — and the reported
test numbers were computed with that same model, so re-evaluating the folder gives the card's numbers.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import write_atomic_json
from .context import RunContext

CARD_HPARAMS = ("loss", "sampler", "fusion_ratio", "h2tf_mode", "stage1_mode", "stage2_mode", "shift_bn",
                "stage1_epochs", "stage1_lr", "stage2_epochs", "stage2_lr", "stage2_batch_size", "stage2_weight_decay",
                "weight_decay", "momentum", "batch_size", "mixup_alpha", "loss_kwargs", "method_kwargs")


def write_outputs(ctx: RunContext, results: dict[str, Any]) -> None:
    """Model folder, results JSON, frequency plot and model card; then the push, if asked for."""
    cfg, model, out = ctx.cfg, ctx.model, ctx.out
    model_dir = out / "model"
    model.save_pretrained(model_dir)
    write_atomic_json(out / "results.json", results)
    if "per_class" in results:
        from ..evaluation.plots import plot_accuracy_vs_frequency

        plot_accuracy_vs_frequency({results["method"]: np.asarray(results["per_class"])}, ctx.counts,
                                   model_dir / "accuracy_vs_frequency.png")
    if "test" in results:
        _write_card(ctx, results, model_dir)
    if cfg.export == "timm":  # also as a plain timm folder (loads without pih2t_hub and without remote code)
        from ..hub.timm_export import export_timm

        export_timm(model, out / "timm", overwrite=True)
    if cfg.push_to_hub:
        _push(ctx, results, model_dir)


def _card_config(ctx: RunContext, results: dict[str, Any]) -> dict[str, Any]:
    """The card is rendered from the resolved run config, the method's recipe source and the run's facts."""
    cfg = ctx.cfg
    recipe = ctx.method.recipe
    hparams = {k: getattr(cfg, k) for k in CARD_HPARAMS}
    hparams["recipe_source"] = recipe.source if recipe is not None else "no stage-2 training"
    return {**cfg.to_dict(), "global_batch_size": results["global_batch"], "hyperparameters": hparams,
            "hardware": f"{results['num_processes']} process(es), {platform.machine()}, torch {torch.__version__}",
            "backbone_tag": ctx.model.config.backbone_tag, "class_counts": ctx.counts.tolist()}


def _write_card(ctx: RunContext, results: dict[str, Any], model_dir: Path) -> None:
    from ..hub.model_card import render_model_card, write_model_card

    try:
        card = render_model_card(_card_config(ctx, results), results["test"], plot_path="accuracy_vs_frequency.png",
                                 allow_empty_groups=True)
        write_model_card(card, model_dir)
    except (TypeError, ValueError) as err:  # a group without classes (e.g. no few-shot class) etc.
        print(f"model card not written: {err}")


def _push(ctx: RunContext, results: dict[str, Any], model_dir: Path) -> None:
    """Push the saved folder (``hub_format="pih2t"``, its README.md is the card above) or the timm export."""
    from ..hub.push import push_to_hub

    cfg = ctx.cfg
    if cfg.hub_format == "timm":
        push_to_hub(ctx.model, cfg.hub_model_id, hub_format="timm", config=_card_config(ctx, results),
                    results=results["test"], plot=model_dir / "accuracy_vs_frequency.png", allow_empty_groups=True)
    else:  # push_to_hub validates everything before uploading
        push_to_hub(model_dir, cfg.hub_model_id, allow_empty_groups=True)
    print(f"pushed {model_dir if cfg.hub_format == 'pih2t' else 'the timm export'} to the Hub as {cfg.hub_model_id}")


__all__ = ["write_outputs"]
