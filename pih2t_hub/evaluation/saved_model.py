"""Evaluate a saved (or Hub) model on a labelled split: the check that what is saved is what was reported.

By default the split is the run's own test split, rebuilt from the ``run_config.yaml`` beside the model folder
(the same seeded subset and held-out test rows); any dataset ``load_dataset_any`` knows can be given instead.
Frequency groups use the training class counts recorded in the model's config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .metrics import longtail_metrics


def _split_from_run(model_dir: Path, split: str) -> tuple[Any, str]:
    import yaml

    from ..data.splits import SplitSpec, load_splits

    config = model_dir.parent / "run_config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"no run_config.yaml beside {model_dir}: pass --dataset to say what to evaluate on")
    record = yaml.safe_load(config.read_text(encoding="utf-8"))
    if not isinstance(record, dict):
        raise ValueError(f"{config}: a recorded run config must be a YAML mapping")
    data = load_splits(SplitSpec.from_record(record, where=str(config)))
    return data[split], data["label_column"]


def _split_from_dataset(dataset: str, split: str, label_column: str | None) -> tuple[Any, str]:
    from ..data.longtail import resolve_label_column
    from ..data.sources import load_dataset_any

    ds = load_dataset_any(dataset, split=split)
    return ds, resolve_label_column(ds, label_column)


@torch.no_grad()
def evaluate_saved_model(model: str | Path, dataset: str | None = None, split: str = "test",
                         label_column: str | None = None, batch_size: int = 128,
                         trust_remote_code: bool = False) -> dict[str, Any]:
    """Long-tail metrics (overall, balanced, many / medium / few, ECE, per class) of a saved model.

    ``model`` is a local folder or a Hub id loadable by ``AutoModelForImageClassification``; the input
    pre-processing is the model's own (``preprocessor_config``/``backbone_data_config``).
    """
    from transformers import AutoModelForImageClassification

    from ..data.transforms import apply_transform, build_transform

    net = AutoModelForImageClassification.from_pretrained(str(model), trust_remote_code=trust_remote_code).eval()
    counts = getattr(net.config, "class_counts", None)
    if not counts:
        raise ValueError(f"{model}: the config records no training class counts, so there are no frequency groups")
    if dataset is None:
        ds, label_col = _split_from_run(Path(model), split)
    else:
        ds, label_col = _split_from_dataset(dataset, split, label_column)
    data = apply_transform(ds, build_transform(net.config.backbone_data_config, train=False), label_column=label_col)
    logits, labels = [], []
    for start in range(0, len(data), batch_size):
        batch = data[start:start + batch_size]
        x = batch["pixel_values"]
        x = torch.stack(list(x)) if isinstance(x, list) else x
        logits.append(net(pixel_values=x).logits.float())
        labels.append(torch.as_tensor(np.asarray(batch["labels"])))
    return longtail_metrics(torch.cat(logits).numpy(), torch.cat(labels).numpy(), counts)


__all__ = ["evaluate_saved_model"]
