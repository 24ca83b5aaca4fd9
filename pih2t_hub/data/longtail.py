"""Long-tailed subsets of any Hugging Face ``datasets.Dataset``.

The long-tailed benchmarks (CIFAR-LT and friends) are built by keeping ``n_c`` images of class ``c`` out of a
balanced dataset. This module reproduces that construction for any dataset with a label column:

* ``profile="exp"`` (CIFAR-LT / LDAM / MiSLAS / H2T codes): ``n_c = floor(n_max * (1/IR) ** (c / (C - 1)))``,
  where ``c`` is the class's *rank* in ``class_order`` (label-id order by default). The float expression is the
  one of the official codes, so the counts match theirs bit for bit (10,847 / 12,608 / 9,502 images for
  CIFAR-100 at IR 100 / 50 / 200).
* ``profile="step"``: the first ``max(1, C // 2)`` classes keep ``n_max``, the others get ``floor(n_max / IR)``.

The subset is a ``Dataset.select`` view (an indices mapping over the same Arrow table): nothing is copied, so a
million-row dataset is subset in well under a second. Only the label column is read, as one NumPy array.

Which images are kept is decided by one random key per row, drawn from ``numpy.random.Generator(PCG64(seed))``
(a bit stream NumPy keeps fixed across platforms): each class keeps its rows with the smallest keys. Two useful
consequences: the same seed gives the same rows on every machine, and, for one seed, the subset at a larger
imbalance ratio is contained in the subset at a smaller one (nested benchmarks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:  # datasets is imported inside the functions: importing it costs about a second
    from datasets import Dataset

__all__ = [
    "LongTailedSubset",
    "class_counts",
    "label_array",
    "long_tail_counts",
    "make_long_tailed",
    "resolve_label_column",
]

Profile = Literal["exp", "step"]

_INT_KINDS = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
_STRING_KINDS = ("string", "large_string")


@dataclass(frozen=True)
class LongTailedSubset:
    """Result of :func:`make_long_tailed`.

    Attributes:
        dataset: the long-tailed subset (a zero-copy ``select`` view of the input, label column possibly
            encoded to ``ClassLabel`` when it held strings).
        class_counts: images kept per class, indexed by class id (not by rank), so it can be passed straight to
            :func:`pih2t_hub.data.shots.shot_groups` or a logit-adjustment prior.
        indices: the kept rows of the input dataset, ascending.
        label_column: the column the classes were read from.
        class_order: class ids from head (rank 0, ``n_max`` images) to tail.
    """

    dataset: Dataset
    class_counts: list[int]
    indices: np.ndarray
    label_column: str
    class_order: list[int]

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)

    @property
    def imbalance(self) -> float:
        """Realised imbalance factor max(n_c) / min(n_c) (may differ from the request by the floor)."""
        return max(self.class_counts) / min(self.class_counts)


# ---------------------------------------------------------------------------------------------- label column


def resolve_label_column(ds, label_column: str | None = None) -> str:
    """Return the name of the label column of ``ds``.

    With ``label_column=None`` the dataset must have exactly one ``ClassLabel`` column (guessing between
    e.g. CIFAR-100's ``fine_label`` and ``coarse_label`` would silently give the wrong benchmark).
    A named column must be a ``ClassLabel``, an integer ``Value`` (values are class ids) or a string ``Value``
    (encoded by :func:`make_long_tailed`); anything else is not a label and raises ``TypeError``.
    """
    from datasets import ClassLabel, Value

    features = ds.features
    if label_column is None:
        found = [name for name, feat in features.items() if isinstance(feat, ClassLabel)]
        if len(found) == 1:
            return found[0]
        if not found:
            hint = ("; an image folder needs one sub-folder per class (at least two classes) to get a label column"
                    if list(features) == ["image"] else "")
            raise ValueError(
                f"no ClassLabel column in the dataset (columns: {list(features)}); pass label_column=...{hint}"
            )
        raise ValueError(f"several ClassLabel columns {found}; pass label_column=... to choose one")
    if label_column not in features:
        raise ValueError(f"label column {label_column!r} not in the dataset (columns: {list(features)})")
    feat = features[label_column]
    if isinstance(feat, ClassLabel):
        return label_column
    if isinstance(feat, Value) and (feat.dtype in _INT_KINDS or feat.dtype in _STRING_KINDS):
        return label_column
    raise TypeError(
        f"column {label_column!r} is not a label column (feature {feat!r}); "
        "expected ClassLabel, an integer Value or a string Value"
    )


def label_array(ds, label_column: str | None = None) -> np.ndarray:
    """Labels of ``ds`` as one int64 NumPy array, honouring an existing indices mapping.

    Reads the Arrow column directly: formatting a selected dataset row by row is ~10x slower, and this function
    is on the path of the million-row benchmark. String columns must be encoded first (see
    :func:`make_long_tailed`).
    """
    column = resolve_label_column(ds, label_column)
    arrow = ds.data.column(column)
    if arrow.null_count:
        raise ValueError(f"label column {column!r} has {arrow.null_count} missing values")
    import pyarrow as pa

    if pa.types.is_string(arrow.type) or pa.types.is_large_string(arrow.type):
        raise TypeError(f"label column {column!r} holds strings; encode it with Dataset.class_encode_column")
    labels = arrow.to_numpy()
    mapping = getattr(ds, "_indices", None)  # set by Dataset.select / shuffle; None for a contiguous dataset
    if mapping is not None:
        labels = labels[mapping.column(0).to_numpy()]
    return np.asarray(labels, dtype=np.int64)


def _num_classes(ds, column: str, labels: np.ndarray) -> int:
    from datasets import ClassLabel

    feat = ds.features[column]
    if isinstance(feat, ClassLabel):
        return feat.num_classes
    return int(labels.max()) + 1 if labels.size else 0


def class_counts(ds, label_column: str | None = None) -> np.ndarray:
    """Images per class id (length = number of classes of the ``ClassLabel``, or max id + 1)."""
    column = resolve_label_column(ds, label_column)
    labels = label_array(ds, column)
    if labels.size and labels.min() < 0:
        raise ValueError(f"label column {column!r} has negative class ids")
    return np.bincount(labels, minlength=_num_classes(ds, column, labels))


# ---------------------------------------------------------------------------------------------- the formula


def _check_ratio(imbalance_ratio: float) -> float:
    if isinstance(imbalance_ratio, bool) or not isinstance(imbalance_ratio, (int, float, np.integer, np.floating)):
        raise TypeError(f"imbalance_ratio must be a number, got {type(imbalance_ratio).__name__}")
    ratio = float(imbalance_ratio)
    if not math.isfinite(ratio) or ratio < 1.0:
        hint = ""
        if 0 < ratio < 1:
            hint = f" (the official configs' imb_factor {ratio:g} is 1/IR: did you mean {1 / ratio:g}?)"
        raise ValueError(f"imbalance_ratio must be finite and >= 1 (max/min class size), got {imbalance_ratio}{hint}")
    return ratio


def _multipliers(num_classes: int, imbalance_ratio: float, profile: str) -> list[float]:
    """Fraction of ``n_max`` for each rank; exactly 1.0 for the head classes."""
    ratio = _check_ratio(imbalance_ratio)
    if num_classes < 1:
        raise ValueError(f"need at least one class, got {num_classes}")
    if profile == "exp":
        if num_classes == 1:
            return [1.0]
        factor = 1.0 / ratio  # the official codes take imb_factor = 1/IR and raise it to c/(C-1)
        return [factor ** (c / (num_classes - 1.0)) for c in range(num_classes)]
    if profile == "step":
        heads = max(1, num_classes // 2)
        return [1.0] * heads + [1.0 / ratio] * (num_classes - heads)
    raise ValueError(f"profile must be 'exp' or 'step', got {profile!r}")


def _largest_n_max(available: int, multiplier: float) -> int:
    """Largest n with floor(n * multiplier) <= available (for the error message's suggestion)."""
    n = int((available + 1) / multiplier)
    while n > 0 and math.floor(n * multiplier) > available:
        n -= 1
    return n


def long_tail_counts(num_classes: int, n_max: int, imbalance_ratio: float, profile: Profile = "exp") -> list[int]:
    """Target images per *rank* (rank 0 = head) for a long-tailed profile; see the module docstring."""
    if isinstance(n_max, bool) or not isinstance(n_max, (int, np.integer)) or n_max < 1:
        raise ValueError(f"n_max / max_per_class must be a positive integer, got {n_max!r}")
    return [int(math.floor(n_max * m)) for m in _multipliers(num_classes, imbalance_ratio, profile)]


# ---------------------------------------------------------------------------------------------- the subset


def _encode_if_strings(ds, column: str):
    from datasets import Value

    feat = ds.features[column]
    if isinstance(feat, Value) and feat.dtype in _STRING_KINDS:
        return ds.class_encode_column(column)
    return ds


def _resolve_order(class_order: Sequence[int | str] | None, num_classes: int, names: list[str] | None) -> list[int]:
    if class_order is None:
        return list(range(num_classes))
    order = []
    for item in class_order:
        if isinstance(item, str):
            if names is None or item not in names:
                raise ValueError(f"class_order has unknown class name {item!r}")
            order.append(names.index(item))
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            order.append(int(item))
        else:
            raise TypeError(f"class_order entries must be class ids or names, got {item!r}")
    if sorted(order) != list(range(num_classes)):
        raise ValueError(f"class_order must be a permutation of the {num_classes} classes, got {list(class_order)}")
    return order


def _class_name(c: int, names: list[str] | None) -> str:
    """A class as error messages name it: its id, and its ``ClassLabel`` name when there is one."""
    return f"{c} ({names[c]!r})" if names is not None else str(c)


def _checked_labels(ds, column: str) -> tuple[np.ndarray, list[str] | None, np.ndarray]:
    """The label of every row, the class names (``ClassLabel`` columns only) and the images per class.

    Refuses an empty split, ids outside ``[0, num_classes)`` and classes without any image: the profile assigns a
    target to every class, so each of them has to be there.
    """
    from datasets import ClassLabel

    labels = label_array(ds, column)
    if labels.size == 0:
        raise ValueError("the dataset is empty")
    if labels.min() < 0:
        raise ValueError(f"label column {column!r} has negative class ids")
    feat = ds.features[column]
    names = feat.names if isinstance(feat, ClassLabel) else None
    num_classes = _num_classes(ds, column, labels)
    if labels.max() >= num_classes:
        raise ValueError(f"label id {labels.max()} out of range for {num_classes} classes in {column!r}")
    available = np.bincount(labels, minlength=num_classes)
    empty = np.flatnonzero(available == 0)
    if empty.size:
        shown = ", ".join(_class_name(int(c), names) for c in empty[:10])
        raise ValueError(f"{empty.size} class(es) have zero images in {column!r}: {shown}")
    return labels, names, available


def _class_targets(
    available: np.ndarray,
    order: list[int],
    multipliers: list[float],
    n_max: int,
    imbalance_ratio: float,
    profile: Profile,
    names: list[str] | None,
) -> np.ndarray:
    """Images to keep per class id, checked against what each class has (the error suggests an n_max that fits)."""
    num_classes = available.size
    targets_by_rank = long_tail_counts(num_classes, n_max, imbalance_ratio, profile)
    targets = np.zeros(num_classes, dtype=np.int64)
    for rank, c in enumerate(order):
        targets[c] = targets_by_rank[rank]
    for rank, c in enumerate(order):
        if targets[c] == 0:
            raise ValueError(
                f"class {_class_name(c, names)} (rank {rank}) would keep 0 images with n_max={n_max} and "
                f"IR={imbalance_ratio}; raise max_per_class or lower the imbalance ratio"
            )
        if available[c] < targets[c]:
            fits = min(_largest_n_max(int(available[k]), multipliers[r]) for r, k in enumerate(order))
            raise ValueError(
                f"class {_class_name(c, names)} (rank {rank}) has {available[c]} images but needs {targets[c]} "
                f"(n_max={n_max}, IR={imbalance_ratio}, profile={profile!r}); use max_per_class <= {fits}"
            )
    return targets


def _kept_rows(labels: np.ndarray, available: np.ndarray, targets: np.ndarray, seed: int) -> np.ndarray:
    """Sorted row indices keeping ``targets[c]`` rows of each class ``c``, chosen by ``seed``.

    Every row draws one random key and each class keeps its rows with the lowest keys: the subset is reproducible
    from ``seed``, and a larger target keeps a superset of the rows a smaller one keeps.
    """
    keys = np.random.Generator(np.random.PCG64(seed)).random(labels.size)
    by_class = np.lexsort((keys, labels))  # rows grouped by class, each group by ascending key
    starts = np.concatenate(([0], np.cumsum(available)[:-1]))
    sorted_labels = labels[by_class]
    rank_in_class = np.arange(labels.size) - starts[sorted_labels]
    return np.sort(by_class[rank_in_class < targets[sorted_labels]])


def make_long_tailed(
    ds,
    imbalance_ratio: float,
    profile: Profile = "exp",
    max_per_class: int | None = None,
    label_column: str | None = None,
    seed: int = 0,
    class_order: Sequence[int | str] | None = None,
) -> LongTailedSubset:
    """Subset ``ds`` to a long-tailed class distribution (see the module docstring for the profiles).

    Args:
        ds: a ``datasets.Dataset`` (one split).
        imbalance_ratio: IR = n_max / n_min, finite and >= 1 (1 gives a balanced subset).
        profile: ``"exp"`` (CIFAR-LT) or ``"step"``.
        max_per_class: ``n_max``, the head size. Default: the size of the smallest head class (the classes that
            get ``n_max``: rank 0 for ``exp``, the first half for ``step``), i.e. CIFAR's 500.
        label_column: defaults to the only ``ClassLabel`` column; string columns are encoded with
            ``class_encode_column`` (this one case copies the column).
        seed: selects which rows of each class are kept.
        class_order: class ids (or ``ClassLabel`` names) from head to tail; default label-id order.

    Raises:
        ValueError: bad ratio/profile, missing label column, a class with zero images, or a class with fewer
            images than its target (the message names the class and the largest ``max_per_class`` that fits).
        TypeError: a column that is not a label.
    """
    from datasets import Dataset

    if not isinstance(ds, Dataset):
        raise TypeError(f"make_long_tailed takes one split (a datasets.Dataset), got {type(ds).__name__}")
    column = resolve_label_column(ds, label_column)
    _check_ratio(imbalance_ratio)
    ds = _encode_if_strings(ds, column)
    labels, names, available = _checked_labels(ds, column)
    num_classes = int(available.size)

    order = _resolve_order(class_order, num_classes, names)
    multipliers = _multipliers(num_classes, imbalance_ratio, profile)
    if max_per_class is None:
        n_max = int(min(available[order[r]] for r, m in enumerate(multipliers) if m == 1.0))
    else:
        n_max = max_per_class
    targets = _class_targets(available, order, multipliers, n_max, imbalance_ratio, profile, names)
    indices = _kept_rows(labels, available, targets, seed)

    return LongTailedSubset(
        dataset=ds.select(indices),
        class_counts=[int(t) for t in targets],
        indices=indices,
        label_column=column,
        class_order=order,
    )
