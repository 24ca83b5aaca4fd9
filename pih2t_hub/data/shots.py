"""Shot groups: which classes count as many-, medium- and few-shot.

Long-tailed papers report accuracy per group of classes split by their *training* frequency. Two protocols
exist and give different groups (docs/methods.md), so both are here and the caller says which one it reports:

* ``"threshold"`` (Kang et al. / DLSA code): many > 100, medium 20-100, few < 20 training images.
* ``"fixed_range"`` (MiSLAS / H2T code): fixed class-index ranges after sorting the classes by frequency.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

SHOT_NAMES = ("many", "medium", "few")

#: Class-index ranges used by the MiSLAS / H2T evaluation code, after sorting classes by training frequency.
FIXED_RANGES: dict[str, tuple[int, int]] = {
    "cifar100": (36, 71),
    "imagenet_lt": (390, 835),
    "inat18": (842, 4543),
    "places_lt": (131, 288),
}


def shot_groups(
    class_counts: Sequence[int] | np.ndarray,
    many_threshold: int = 100,
    few_threshold: int = 20,
) -> np.ndarray:
    """Return one of ``"many"``, ``"medium"``, ``"few"`` per class from its training count.

    many: count > ``many_threshold``; few: count < ``few_threshold``; medium otherwise (inclusive bounds,
    as in the DLSA / decoupling evaluation code).
    """
    counts = np.asarray(class_counts)
    if counts.ndim != 1:
        raise ValueError(f"class_counts must be 1-D, got shape {counts.shape}")
    if (counts < 0).any():
        raise ValueError("class_counts must be non-negative")
    if few_threshold > many_threshold:
        raise ValueError(f"few_threshold ({few_threshold}) must not exceed many_threshold ({many_threshold})")
    groups = np.full(counts.shape, "medium", dtype=object)
    groups[counts > many_threshold] = "many"
    groups[counts < few_threshold] = "few"
    return groups


def fixed_range_groups(class_counts: Sequence[int] | np.ndarray, many_end: int, medium_end: int) -> np.ndarray:
    """Shot groups by class rank: the ``many_end`` most frequent classes are many-shot, the next up to
    ``medium_end`` medium-shot, the rest few-shot (the MiSLAS/H2T protocol; see :data:`FIXED_RANGES`).

    Ties in frequency are broken by class id (stable sort), as the official codes use classes already sorted.
    """
    counts = np.asarray(class_counts)
    if not 0 <= many_end <= medium_end <= len(counts):
        raise ValueError(f"need 0 <= many_end <= medium_end <= {len(counts)}, got {many_end}, {medium_end}")
    order = np.argsort(-counts, kind="stable")
    groups = np.empty(len(counts), dtype=object)
    groups[order[:many_end]] = "many"
    groups[order[many_end:medium_end]] = "medium"
    groups[order[medium_end:]] = "few"
    return groups
