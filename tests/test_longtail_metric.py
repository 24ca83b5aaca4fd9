"""The offline ``evaluate`` module takes class ids, logits or probabilities, and agrees across the three."""

from __future__ import annotations

import numpy as np
import pytest

from pih2t_hub.evaluation import LONGTAIL_METRIC_PATH

evaluate = pytest.importorskip("evaluate")

COUNTS = [300, 40, 5]  # many, medium, few
LABELS = [0, 0, 1, 1, 2, 2]
LOGITS = np.array([[3.0, 0.0, 0.0], [0.1, 2.0, 0.0], [0.0, 1.0, 0.5], [2.0, 0.0, 1.0], [0.0, 0.0, 4.0], [1.0, 2.0, 0.0]])


def _ece(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """15 equal-width confidence bins, |accuracy - confidence| weighted by bin size."""
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            total += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return total


def test_logits_probabilities_and_ids_give_the_same_accuracies():
    metric = evaluate.load(str(LONGTAIL_METRIC_PATH))
    preds = LOGITS.argmax(1)  # [0, 1, 1, 0, 2, 1]: class 0 1/2, class 1 1/2, class 2 1/2
    probs = np.exp(LOGITS) / np.exp(LOGITS).sum(1, keepdims=True)
    by_ids = metric.compute(predictions=preds.tolist(), references=LABELS, train_class_counts=COUNTS)
    by_logits = metric.compute(predictions=LOGITS.tolist(), references=LABELS, train_class_counts=COUNTS)
    by_probs = metric.compute(predictions=probs.tolist(), references=LABELS, train_class_counts=COUNTS)
    for out in (by_ids, by_logits, by_probs):
        assert out["overall"] == pytest.approx(3 / 6)
        assert (out["many"], out["medium"], out["few"]) == pytest.approx((0.5, 0.5, 0.5))
    assert "ece" not in by_ids  # hard predictions carry no confidence
    expected = _ece(probs.max(1), (preds == np.asarray(LABELS)).astype(float))
    assert by_logits["ece"] == pytest.approx(expected)
    assert by_probs["ece"] == pytest.approx(expected)


def test_forced_readings():
    probs_like = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    labels = [0, 1, 2]
    as_logits = evaluate.load(str(LONGTAIL_METRIC_PATH), "logits").compute(
        predictions=probs_like.tolist(), references=labels, train_class_counts=COUNTS)
    soft = np.exp(probs_like) / np.exp(probs_like).sum(1, keepdims=True)
    assert as_logits["ece"] == pytest.approx(_ece(soft.max(1), np.ones(3)))  # softmax applied to the rows
    as_probs = evaluate.load(str(LONGTAIL_METRIC_PATH), "probs").compute(
        predictions=probs_like.tolist(), references=labels, train_class_counts=COUNTS)
    assert as_probs["ece"] == pytest.approx(_ece(probs_like.max(1), np.ones(3)))
    with pytest.raises(ValueError, match="probs"):
        evaluate.load(str(LONGTAIL_METRIC_PATH), "probs").compute(
            predictions=LOGITS.tolist(), references=LABELS, train_class_counts=COUNTS)
    with pytest.raises(ValueError):
        evaluate.load(str(LONGTAIL_METRIC_PATH), "preds").compute(
            predictions=LOGITS.tolist(), references=LABELS, train_class_counts=COUNTS)


def test_docs_say_what_is_accepted():
    metric = evaluate.load(str(LONGTAIL_METRIC_PATH))
    assert "logits" in metric.inputs_description and "probabilities" in metric.inputs_description
