"""Evaluate a saved (or Hub) model on a labelled split: the check that what is saved is what was reported.

By default the split is the run's own test split, rebuilt from the ``run_config.yaml`` beside the model folder
(the same seeded subset and held-out test rows); any dataset ``load_dataset_any`` knows can be given instead.
Frequency groups use the training class counts recorded in the model's config. The model folder is checked
before it is built (:mod:`.model_source`), and a dataset's class names must be the model's, or be mapped
explicitly (:mod:`.label_names`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .label_names import dataset_class_names, label_translation, model_class_names
from .metrics import longtail_metrics
from .model_source import load_for_evaluation

__all__ = ["evaluate_saved_model", "load_evaluation_split"]

_RUN_SPLITS = ("train", "val", "test")


def _split_from_run(model_dir: Path, split: str) -> tuple[Any, str]:
    import yaml

    from ..data.splits import SplitSpec, load_splits

    config = model_dir.parent / "run_config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"no run_config.yaml beside {model_dir}: pass --dataset to say what to evaluate on")
    if split not in _RUN_SPLITS:
        raise ValueError(f"the run's data has no split {split!r}; its splits are {', '.join(_RUN_SPLITS)}")
    record = yaml.safe_load(config.read_text(encoding="utf-8"))
    if not isinstance(record, dict):
        raise ValueError(f"{config}: a recorded run config must be a YAML mapping")
    data = load_splits(SplitSpec.from_record(record, where=str(config)))
    return data[split], data["label_column"]


def _split_from_dataset(dataset: str, split: str, label_column: str | None) -> tuple[Any, str]:
    from ..data.longtail import resolve_label_column
    from ..data.sources import load_dataset_any

    try:
        ds = load_dataset_any(dataset, split=split)
    except KeyError as err:  # a DatasetDict-style lookup of a split that is not there
        raise ValueError(f"dataset {dataset} has no split {split!r} ({' '.join(str(err).split())})") from None
    except ValueError as err:
        if "split" not in str(err).lower():
            raise
        raise ValueError(f"dataset {dataset} has no split {split!r}: {' '.join(str(err).split())}") from None
    return ds, resolve_label_column(ds, label_column)


def load_evaluation_split(net: Any, model: str | Path, dataset: str | None, split: str,
                          label_column: str | None, label_map: dict[str, str] | None = None,
                          ignore_label_names: bool = False) -> tuple[Any, str, np.ndarray | None]:
    """The split to evaluate on, its label column, and the dataset-id -> model-id translation (None: same ids)."""
    if dataset is None:
        ds, label_col = _split_from_run(Path(model), split)
    else:
        ds, label_col = _split_from_dataset(dataset, split, label_column)
    names = dataset_class_names(ds, label_col)
    if names is not None:
        num_dataset = len(names)
    else:
        labels = np.asarray(ds[label_col])
        num_dataset = int(labels.max()) + 1 if labels.size else 0
    translation = label_translation(names, model_class_names(net.config), num_dataset, int(net.config.num_labels),
                                    label_map=label_map, ignore_names=ignore_label_names)
    return ds, label_col, translation


@torch.no_grad()
def evaluate_saved_model(model: str | Path, dataset: str | None = None, split: str = "test",
                         label_column: str | None = None, batch_size: int = 128,
                         trust_remote_code: bool = False, label_map: dict[str, str] | None = None,
                         ignore_label_names: bool = False, progress: bool = True) -> dict[str, Any]:
    """Long-tail metrics (overall, balanced, many / medium / few, ECE, per class) of a saved model.

    ``model`` is a local folder or a Hub id loadable by ``AutoModelForImageClassification``; the input
    pre-processing is the model's own (``preprocessor_config``/``backbone_data_config``). ``label_map`` (dataset
    class name -> model class name) and ``ignore_label_names`` decide how dataset classes meet model classes
    (:func:`~pih2t_hub.evaluation.label_names.label_translation`).
    """
    from .._progress import progress_bar
    from ..data.transforms import apply_transform, build_transform

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    net = load_for_evaluation(model, trust_remote_code=trust_remote_code)
    counts = getattr(net.config, "class_counts", None)
    if not counts:
        raise ValueError(f"{model}: the config records no training class counts, so there are no frequency groups")
    ds, label_col, translation = load_evaluation_split(net, model, dataset, split, label_column, label_map,
                                                       ignore_label_names)
    data = apply_transform(ds, build_transform(net.config.backbone_data_config, train=False), label_column=label_col)
    logits, labels = [], []
    bar = progress_bar(total=len(data), desc=f"evaluate {split}", unit="img", disable=not progress)
    try:
        for start in range(0, len(data), batch_size):
            batch = data[start:start + batch_size]
            x = batch["pixel_values"]
            x = torch.stack(list(x)) if isinstance(x, list) else x
            logits.append(net(pixel_values=x).logits.float())
            labels.append(torch.as_tensor(np.asarray(batch["labels"])))
            bar.update(len(x))
    finally:
        bar.close()
    if not labels:
        raise ValueError(f"the {split!r} split is empty: nothing to evaluate")
    y = torch.cat(labels).numpy()
    return longtail_metrics(torch.cat(logits).numpy(), y if translation is None else translation[y], counts)
