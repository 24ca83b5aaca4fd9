"""make_long_tailed: exact CIFAR-LT counts, seeded choice, zero-copy subset, clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Image, Value

from pih2t_hub.data import class_counts, label_array, long_tail_counts, make_long_tailed


def balanced(num_classes: int = 100, per_class: int = 500, shuffle_rows: bool = True) -> Dataset:
    labels = np.repeat(np.arange(num_classes), per_class)
    if shuffle_rows:  # rows not grouped by class, as in real datasets
        labels = np.random.default_rng(123).permutation(labels)
    features = Features({"label": ClassLabel(num_classes=num_classes), "row": Value("int64")})
    return Dataset.from_dict({"label": labels, "row": np.arange(len(labels))}, features=features)


@pytest.fixture(scope="module")
def cifar_like() -> Dataset:
    return balanced()


def stored_labels(ds: Dataset) -> np.ndarray:
    """Labels read through the public row API (independent of label_array's Arrow fast path)."""
    return np.asarray(ds.with_format("numpy")["label"][:])


# ---------------------------------------------------------------------------------------------- counts


@pytest.mark.parametrize("ratio, total", [(100, 10_847), (50, 12_608), (200, 9_502)])
def test_exp_profile_matches_cifar100_lt(cifar_like, ratio, total):
    subset = make_long_tailed(cifar_like, ratio)
    expected = [int(500 * (1.0 / ratio) ** (c / 99.0)) for c in range(100)]  # the official codes' expression
    assert len(subset.dataset) == total
    assert subset.class_counts == expected
    assert np.bincount(stored_labels(subset.dataset), minlength=100).tolist() == expected
    assert subset.class_counts[0] == 500 and subset.class_counts[-1] == 500 // ratio


@pytest.mark.parametrize("ratio, total", [(100, 50 * 500 + 50 * 5), (50, 50 * 500 + 50 * 10), (200, 50 * 500 + 50 * 2)])
def test_step_profile(cifar_like, ratio, total):
    subset = make_long_tailed(cifar_like, ratio, profile="step")
    assert len(subset.dataset) == total
    assert subset.class_counts == [500] * 50 + [500 // ratio] * 50


def test_step_profile_odd_class_count():
    subset = make_long_tailed(balanced(5, 40), 4, profile="step")
    assert subset.class_counts == [40, 40, 10, 10, 10]


def test_long_tail_counts_formula():
    assert long_tail_counts(3, 100, 100) == [100, 10, 1]  # 100 * 0.01**0.5 = 10
    assert long_tail_counts(1, 7, 50) == [7]
    assert long_tail_counts(4, 10, 1) == [10, 10, 10, 10]


def test_max_per_class_and_class_order(cifar_like):
    subset = make_long_tailed(cifar_like, 10, max_per_class=200, class_order=list(range(99, -1, -1)))
    expected_by_rank = [math.floor(200 * 0.1 ** (r / 99.0)) for r in range(100)]
    assert subset.class_counts[99] == 200 and subset.class_counts[0] == 20
    assert subset.class_counts == expected_by_rank[::-1]
    assert subset.class_order[0] == 99


def test_class_order_by_name():
    ds = balanced(3, 20).cast_column("label", ClassLabel(names=["cat", "dog", "emu"]))
    subset = make_long_tailed(ds, 4, class_order=["emu", "cat", "dog"])
    assert subset.class_counts == [10, 5, 20]  # emu is the head, dog the tail


def test_default_n_max_is_smallest_head_class():
    labels = np.concatenate([np.full(n, c) for c, n in enumerate([50, 40, 30, 30])])
    ds = Dataset.from_dict({"label": labels}, features=Features({"label": ClassLabel(num_classes=4)}))
    assert make_long_tailed(ds, 10, profile="step").class_counts == [40, 40, 4, 4]
    assert make_long_tailed(ds, 10).class_counts[0] == 50


# ---------------------------------------------------------------------------------------------- the choice


def test_rows_and_zero_copy(cifar_like):
    subset = make_long_tailed(cifar_like, 100, seed=3)
    idx = subset.indices
    assert np.all(np.diff(idx) > 0)  # ascending, no duplicates
    out = subset.dataset.with_format("numpy")
    assert np.array_equal(out["row"][:], idx)  # the subset's rows are the reported rows
    assert np.array_equal(out["label"][:], stored_labels(cifar_like)[idx])
    assert subset.dataset._indices is not None  # an indices mapping ...
    def buffer(ds):  # address of the "row" column's value buffer
        return ds.data.column("row").chunk(0).buffers()[1].address

    assert buffer(subset.dataset) == buffer(cifar_like)  # ... over the very same Arrow memory


def test_same_seed_same_rows_other_seed_differs(cifar_like):
    a = make_long_tailed(cifar_like, 100, seed=0).indices
    b = make_long_tailed(cifar_like, 100, seed=0).indices
    c = make_long_tailed(cifar_like, 100, seed=1).indices
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_choice_follows_documented_keys():
    """Each class keeps its rows with the smallest PCG64(seed).random() keys (the cross-machine contract)."""
    ds = balanced(4, 30)
    labels = stored_labels(ds)
    keys = np.random.Generator(np.random.PCG64(7)).random(len(labels))
    targets = [30, 12, 4, 2]  # floor(30 * 15 ** (-c / 3)): 30, 12.16, 4.93, 2
    expected = []
    for c, n in enumerate(targets):
        rows = [r for r in range(len(labels)) if labels[r] == c]
        expected += sorted(rows, key=lambda r: keys[r])[:n]
    subset = make_long_tailed(ds, 15, seed=7)
    assert subset.class_counts == targets
    assert subset.indices.tolist() == sorted(expected)


def test_larger_ratio_is_nested(cifar_like):
    small = set(make_long_tailed(cifar_like, 200, seed=5).indices.tolist())
    large = set(make_long_tailed(cifar_like, 50, seed=5).indices.tolist())
    assert small < large


def test_already_selected_dataset(cifar_like):
    shuffled = cifar_like.shuffle(seed=0).select(range(40_000))
    assert np.array_equal(label_array(shuffled), stored_labels(shuffled))
    counts = class_counts(shuffled)
    subset = make_long_tailed(shuffled, 10, max_per_class=int(counts.min()))
    assert np.bincount(stored_labels(subset.dataset), minlength=100).tolist() == subset.class_counts


def test_string_and_integer_label_columns():
    names = np.repeat(np.array(["b", "a", "c"]), 20)
    ds = Dataset.from_dict({"name": names, "y": np.repeat([0, 1, 2], 20)})
    by_name = make_long_tailed(ds, 4, label_column="name")
    assert by_name.dataset.features["name"].names == ["a", "b", "c"]
    assert by_name.class_counts == [20, 10, 5]
    by_int = make_long_tailed(ds, 4, label_column="y")
    assert by_int.class_counts == [20, 10, 5]


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("ratio", [0.5, 0.0, -3, float("inf"), float("nan")])
def test_bad_ratio(cifar_like, ratio):
    with pytest.raises(ValueError, match="imbalance_ratio"):
        make_long_tailed(cifar_like, ratio)


def test_ratio_must_be_a_number(cifar_like):
    with pytest.raises(TypeError, match="imbalance_ratio"):
        make_long_tailed(cifar_like, "100")


def test_imb_factor_convention_gets_a_hint(cifar_like):
    with pytest.raises(ValueError, match="did you mean 100"):
        make_long_tailed(cifar_like, 0.01)


def test_needs_one_split(cifar_like):
    from datasets import DatasetDict

    with pytest.raises(TypeError, match="one split"):
        make_long_tailed(DatasetDict({"train": cifar_like}), 10)


def test_no_label_column():
    ds = Dataset.from_dict({"x": [1.0, 2.0]})
    with pytest.raises(ValueError, match="no ClassLabel column"):
        make_long_tailed(ds, 10)
    with pytest.raises(ValueError, match="not in the dataset"):
        make_long_tailed(ds, 10, label_column="label")


def test_ambiguous_label_columns():
    features = Features({"fine": ClassLabel(num_classes=2), "coarse": ClassLabel(num_classes=2)})
    ds = Dataset.from_dict({"fine": [0, 1], "coarse": [1, 0]}, features=features)
    with pytest.raises(ValueError, match="several ClassLabel"):
        make_long_tailed(ds, 1)
    assert make_long_tailed(ds, 1, label_column="coarse").class_counts == [1, 1]


@pytest.mark.parametrize("column", ["x", "img"])
def test_not_a_label_column(column):
    features = Features({"x": Value("float32"), "img": Image(), "label": ClassLabel(num_classes=1)})
    ds = Dataset.from_dict({"x": [0.5], "img": [np.zeros((2, 2), np.uint8)], "label": [0]}, features=features)
    with pytest.raises(TypeError, match="not a label column"):
        make_long_tailed(ds, 2, label_column=column)


def test_class_with_zero_images():
    features = Features({"label": ClassLabel(names=["a", "b", "c"])})
    ds = Dataset.from_dict({"label": [0, 0, 2, 2]}, features=features)
    with pytest.raises(ValueError, match=r"zero images.*1 \('b'\)"):
        make_long_tailed(ds, 1)


def test_max_per_class_too_large(cifar_like):
    with pytest.raises(ValueError, match=r"class 0 .*has 500 images but needs 600.*max_per_class <= 500"):
        make_long_tailed(cifar_like, 100, max_per_class=600)


def test_tail_class_too_small_is_named():
    labels = np.concatenate([np.full(n, c) for c, n in enumerate([100, 100, 3])])
    ds = Dataset.from_dict({"label": labels}, features=Features({"label": ClassLabel(num_classes=3)}))
    with pytest.raises(ValueError, match=r"class 2 .*has 3 images but needs 10.*max_per_class <= 39"):
        make_long_tailed(ds, 10)  # targets 100, 31, 10; class 2 fits n_max <= 39 (floor(39 / 10) = 3)


def test_target_of_zero_images(cifar_like):
    with pytest.raises(ValueError, match="would keep 0 images"):
        make_long_tailed(cifar_like, 1000)


def test_bad_profile_and_order(cifar_like):
    with pytest.raises(ValueError, match="profile"):
        make_long_tailed(cifar_like, 10, profile="linear")
    with pytest.raises(ValueError, match="permutation"):
        make_long_tailed(cifar_like, 10, class_order=[0, 1, 2])
