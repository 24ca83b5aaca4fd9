"""Which model class each dataset class is: by name, by an explicit map, or by id when the user says so.

A model answers with class ids; a dataset's ids mean whatever its own class names say. Evaluating a digits model
on ``cat / dog / fox / owl`` by id gives a number that means nothing, so names are compared first:

* every dataset class name is a model class name: dataset ids are translated by name (the same order needs no
  translation; a dataset with fewer classes is fine);
* otherwise the evaluation is refused, unless ``label_map`` maps each differing dataset name to a model name, or
  ``ignore_names`` says to compare by id (then the dataset may not have more classes than the model);
* when either side has no names (an integer label column, a config with only ``LABEL_<i>`` placeholders), ids
  are compared, and the dataset may not have more classes than the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["dataset_class_names", "model_class_names", "label_translation", "read_label_map"]


def dataset_class_names(ds: Any, column: str) -> list[str] | None:
    """The ``ClassLabel`` names of ``column`` (None for a plain integer column)."""
    names = getattr(ds.features[column], "names", None)
    return [str(n) for n in names] if names else None


def model_class_names(config: Any) -> list[str] | None:
    """``id2label`` in id order, or None when it holds only transformers' ``LABEL_<i>`` placeholders."""
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    names = [id2label.get(i, f"LABEL_{i}") for i in range(int(config.num_labels))]
    return None if names == [f"LABEL_{i}" for i in range(len(names))] else names


def read_label_map(text: str) -> dict[str, str]:
    """A YAML mapping ``dataset name -> model name``, given inline or as the path of a YAML file."""
    import yaml

    path = Path(text)
    source = path.read_text(encoding="utf-8") if path.is_file() else text
    try:
        value = yaml.safe_load(source)
    except yaml.YAMLError as err:
        raise ValueError(f"--label-map is not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(value, dict) or not value:
        raise ValueError(f"--label-map must be a YAML mapping 'dataset name: model name' (or a file holding one), "
                         f"got {text!r}")
    return {str(k): str(v) for k, v in value.items()}


def _short(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)})"


def _by_count(num_dataset: int, num_model: int) -> None:
    if num_dataset > num_model:
        raise ValueError(f"the dataset has {num_dataset} classes, the model only {num_model}")


def _by_map(dataset: list[str] | None, model: list[str], label_map: dict[str, str]) -> np.ndarray:
    if dataset is None:
        raise ValueError("--label-map needs a dataset whose label column has class names (a ClassLabel)")
    unknown_keys = sorted(set(label_map) - set(dataset))
    if unknown_keys:
        raise ValueError(f"--label-map names dataset classes that do not exist: {_short(unknown_keys)}; the "
                         f"dataset's classes are {_short(dataset)}")
    targets = [label_map.get(name, name) for name in dataset]
    wrong = [f"{name} -> {target}" if name in label_map else name
             for name, target in zip(dataset, targets) if target not in model]
    if wrong:
        raise ValueError(f"dataset classes {_short(wrong)} meet no model class (unmapped, or mapped to a name the "
                         f"model lacks); the model's classes are {_short(model)}")
    index = {name: i for i, name in enumerate(model)}
    return np.array([index[t] for t in targets], dtype=np.int64)


def label_translation(dataset: list[str] | None, model: list[str] | None, num_dataset: int, num_model: int,
                      label_map: dict[str, str] | None = None, ignore_names: bool = False) -> np.ndarray | None:
    """Model class id of each dataset class id (None: the ids are the same), or ``ValueError`` on a mismatch."""
    if label_map and ignore_names:
        raise ValueError("give --label-map or --ignore-label-names, not both")
    if label_map:
        if model is None:
            raise ValueError("--label-map needs a model whose config names its classes (id2label)")
        return _by_map(dataset, model, label_map)
    if ignore_names or dataset is None or model is None:
        _by_count(num_dataset, num_model)
        return None
    if dataset == model[:len(dataset)]:
        return None
    missing = [name for name in dataset if name not in model]
    if missing:
        raise ValueError(f"the dataset's classes {_short(missing)} are not among the model's classes "
                         f"{_short(model)}: map them with --label-map '{{dataset name: model name}}', or pass "
                         "--ignore-label-names to compare class ids")
    index = {name: i for i, name in enumerate(model)}
    return np.array([index[name] for name in dataset], dtype=np.int64)
