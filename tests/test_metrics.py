"""Long-tailed metrics against hand-computed values and independent implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pih2t_hub.data.shots import fixed_range_groups
from pih2t_hub.evaluation import (
    LONGTAIL_METRIC_PATH,
    confusion_matrix,
    expected_calibration_error,
    longtail_metrics,
    per_class_accuracy,
    reliability_diagram_data,
)

# Four classes: training counts put class 0 in many (>100), 1 in medium, 2 and 3 in few (<20).
# Class 3 has NO test images.
COUNTS = [150, 50, 10, 5]
LABELS = [0, 0, 0, 1, 1, 2]
PREDS = [0, 0, 1, 1, 3, 2]
# Probability rows whose argmax is PREDS; confidences 0.9, 0.62, 0.5, 0.7, 0.41, 1.0 fall in distinct 15-bins
# (13, 9, 7, 10, 6, 14), away from bin edges.
PROBS = [
    [0.90, 0.05, 0.05, 0.00],
    [0.62, 0.18, 0.20, 0.00],
    [0.30, 0.50, 0.20, 0.00],
    [0.10, 0.70, 0.10, 0.10],
    [0.19, 0.20, 0.20, 0.41],
    [0.00, 0.00, 1.00, 0.00],
]


def test_hand_computed_example():
    res = longtail_metrics(PREDS, LABELS, COUNTS)
    # class 0: 2/3 right, class 1: 1/2, class 2: 1/1, class 3: no test image
    assert res["overall"] == pytest.approx(4 / 6)
    assert res["balanced"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert res["many"] == pytest.approx(2 / 3)
    assert res["medium"] == pytest.approx(1 / 2)
    assert res["few"] == pytest.approx(1.0)  # class 3 (few, no test images) is left out, not counted as 0
    np.testing.assert_allclose(res["per_class"][:3], [2 / 3, 1 / 2, 1.0])
    assert math.isnan(res["per_class"][3])
    np.testing.assert_array_equal(
        res["confusion_matrix"], [[2, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(res["test_class_counts"], [3, 2, 1, 0])
    assert res["group_sizes"] == {"many": 1, "medium": 1, "few": 1}
    assert list(res["groups"]) == ["many", "medium", "few", "few"]
    assert res["ece"] is None  # hard predictions carry no confidence
    assert res["num_samples"] == 6


def test_ece_hand_computed_from_probs():
    res = longtail_metrics(np.array(PROBS), LABELS, COUNTS)
    assert res["overall"] == pytest.approx(4 / 6)  # argmax of PROBS is PREDS
    # one sample per bin -> ECE = mean |correct - confidence|
    correct = [1, 1, 0, 1, 0, 1]
    conf = [0.9, 0.62, 0.5, 0.7, 0.41, 1.0]
    assert res["ece"] == pytest.approx(np.mean(np.abs(np.subtract(correct, conf))))


def test_ece_shared_bin():
    # Both samples land in bin (0.8667, 0.9333]: |mean acc - mean conf| weighted by 2/3; the third is alone.
    probs = np.array([[0.91, 0.09], [0.92, 0.08], [0.3, 0.7]])
    labels = np.array([0, 1, 1])
    expected = (2 / 3) * abs(0.5 - 0.915) + (1 / 3) * abs(1 - 0.7)
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)
    data = reliability_diagram_data(probs, labels)
    assert data["bin_count"].sum() == 3 and data["bin_count"][13] == 2 and data["bin_count"][10] == 1
    assert data["bin_accuracy"][13] == pytest.approx(0.5)
    assert data["bin_confidence"][13] == pytest.approx(0.915)
    assert np.isnan(data["bin_accuracy"][0])  # empty bin
    np.testing.assert_allclose(data["bin_edges"], np.arange(16) / 15)


def test_logits_are_softmaxed_for_ece():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.5]])
    labels = np.array([0, 0, 1])
    conf = np.exp(logits).max(1) / np.exp(logits).sum(1)  # independent softmax
    idx = np.ceil(conf * 15).astype(int) - 1
    assert len(set(idx)) == 3  # distinct bins, so ECE is the mean gap
    correct = np.array([1, 0, 1])
    res = longtail_metrics(logits, labels, [200, 5], kind="logits")
    assert res["ece"] == pytest.approx(np.mean(np.abs(correct - conf)))
    assert longtail_metrics(logits, labels, [200, 5])["ece"] == pytest.approx(res["ece"])  # auto detects logits


def test_torch_inputs_match_numpy():
    logits = torch.tensor(PROBS, dtype=torch.float32).log().clamp_min(-30)
    res_t = longtail_metrics(logits, torch.tensor(LABELS), torch.tensor(COUNTS), kind="logits")
    assert res_t["overall"] == pytest.approx(4 / 6)
    assert res_t["balanced"] == pytest.approx(13 / 18)
    res_p = longtail_metrics(torch.tensor(PREDS), torch.tensor(LABELS), COUNTS)
    assert res_p["few"] == pytest.approx(1.0)


def test_empty_group_is_nan_not_zero():
    res = longtail_metrics([0, 1, 1], [0, 1, 0], [500, 300])  # both classes many-shot
    assert res["many"] == pytest.approx((1 / 2 + 1) / 2)
    assert math.isnan(res["medium"]) and math.isnan(res["few"])
    assert res["group_sizes"] == {"many": 2, "medium": 0, "few": 0}


def test_fixed_range_groups_override_thresholds():
    groups = fixed_range_groups(COUNTS, many_end=2, medium_end=3)  # ranks: 0,1 many; 2 medium; 3 few
    res = longtail_metrics(PREDS, LABELS, COUNTS, groups=groups)
    assert res["many"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert res["medium"] == pytest.approx(1.0)
    assert math.isnan(res["few"])  # class 3 is the only few class and has no test images


def test_random_against_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, size=300)
    preds = np.where(rng.random(300) < 0.6, labels, rng.integers(0, 7, size=300))
    counts = [400, 250, 90, 60, 30, 12, 3]
    res = longtail_metrics(preds, labels, counts)
    assert res["overall"] == pytest.approx(sklearn_metrics.accuracy_score(labels, preds))
    assert res["balanced"] == pytest.approx(sklearn_metrics.balanced_accuracy_score(labels, preds))
    np.testing.assert_array_equal(
        res["confusion_matrix"], sklearn_metrics.confusion_matrix(labels, preds, labels=range(7))
    )
    recall = sklearn_metrics.recall_score(labels, preds, average=None, labels=range(7), zero_division=0)
    np.testing.assert_allclose(per_class_accuracy(preds, labels, 7), recall)
    assert res["many"] == pytest.approx(recall[:2].mean())
    assert res["medium"] == pytest.approx(recall[2:5].mean())
    assert res["few"] == pytest.approx(recall[5:].mean())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(outputs=[0, 1], labels=[0], train_class_counts=[5, 5]), "differ in length"),
        (dict(outputs=[0, 2], labels=[0, 1], train_class_counts=[5, 5]), r"\[0, 2\)"),
        (dict(outputs=[0, 1], labels=[0, 1], train_class_counts=[5, 5], num_classes=3), "num_classes=3"),
        (dict(outputs=np.zeros((2, 3)), labels=[0, 1], train_class_counts=[5, 5]), "columns"),
        (dict(outputs=[], labels=[], train_class_counts=[5, 5]), "empty"),
        (dict(outputs=[[0.2, 0.2]], labels=[0], train_class_counts=[5, 5], kind="probs"), "sum to 1"),
        (dict(outputs=[0, 1], labels=[0, 1], train_class_counts=[5, 5], groups=["many", "tail"]), "groups"),
    ],
)
def test_bad_input_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        longtail_metrics(**kwargs)


def test_float_labels_must_be_integral():
    with pytest.raises(TypeError, match="integer"):
        confusion_matrix([0.5, 1.0], [0, 1], 2)


def test_evaluate_module_loads_offline_and_agrees():
    evaluate = pytest.importorskip("evaluate")
    metric = evaluate.load(str(LONGTAIL_METRIC_PATH))
    out = metric.compute(predictions=PREDS, references=LABELS, train_class_counts=COUNTS)
    assert out["overall"] == pytest.approx(4 / 6)
    assert out["balanced"] == pytest.approx(13 / 18)
    assert (out["many"], out["medium"], out["few"]) == pytest.approx((2 / 3, 1 / 2, 1.0))
    assert math.isnan(out["per_class"][3])
    probs_metric = evaluate.load(str(LONGTAIL_METRIC_PATH / "longtail_metric.py"), "probs")
    out = probs_metric.compute(predictions=PROBS, references=LABELS, train_class_counts=COUNTS)
    gaps = np.abs(np.subtract([1, 1, 0, 1, 0, 1], [0.9, 0.62, 0.5, 0.7, 0.41, 1.0]))
    assert out["ece"] == pytest.approx(gaps.mean())
    with pytest.raises(ValueError, match="train_class_counts"):
        metric.compute(predictions=PREDS, references=LABELS)
