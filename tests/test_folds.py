"""Cross-validation folds of the pooled long-tailed rows: a partition per repeat, stratified, tiny classes spread."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pih2t_hub.data.folds import cv_folds, stratified_folds

# a long tail with a few-shot end: classes of 40, 17, 9, 5, 3, 2 and 1 images, shuffled
COUNTS = [40, 17, 9, 5, 3, 2, 1]
LABELS = np.random.default_rng(7).permutation(np.repeat(np.arange(len(COUNTS)), COUNTS))


@pytest.mark.parametrize("k, repeats", [(5, 3), (2, 1), (7, 2)])
def test_every_row_validates_once_per_repeat(k: int, repeats: int) -> None:
    folds = cv_folds(LABELS, k, repeats, seed=3)
    assert len(folds) == k * repeats
    for r in range(repeats):
        mine = [f for f in folds if f.repeat == r]
        seen = Counter(int(i) for f in mine for i in f.val)
        assert sorted(seen) == list(range(len(LABELS))) and set(seen.values()) == {1}
        for f in mine:  # each fold trains on exactly the rows it does not validate on
            assert np.intersect1d(f.train, f.val).size == 0 and f.train.size + f.val.size == len(LABELS)


@pytest.mark.parametrize("k", [2, 5, 7])
def test_folds_are_stratified_and_tiny_classes_spread(k: int) -> None:
    fold = stratified_folds(LABELS, k, seed=11)
    sizes = np.bincount(fold, minlength=k)
    assert sizes.max() - sizes.min() <= 1
    for c, n in enumerate(COUNTS):
        per_fold = np.bincount(fold[LABELS == c], minlength=k)
        assert set(per_fold.tolist()) <= {n // k, -(-n // k)}  # floor or ceil of n_c / K in every fold
        if n < k:  # a few-shot class: each image validates in a different fold, the others hold none of it
            assert sorted(per_fold.tolist()) == [0] * (k - n) + [1] * n


def test_repeats_deal_differently_and_a_seed_deals_the_same() -> None:
    a, b = stratified_folds(LABELS, 5, seed=0), stratified_folds(LABELS, 5, seed=1)
    assert not np.array_equal(a, b)
    assert np.array_equal(a, stratified_folds(LABELS, 5, seed=0))


@pytest.mark.parametrize("k, message", [(1, "at least 2 folds"), (len(LABELS) + 1, "need at least")])
def test_bad_k_is_refused(k: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        stratified_folds(LABELS, k, seed=0)
