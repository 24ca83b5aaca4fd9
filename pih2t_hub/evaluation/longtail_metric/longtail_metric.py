"""Long-tailed classification metrics as an ``evaluate`` module that loads offline.

``evaluate.load("accuracy")`` fetches its script from the Hub, so it fails without network. This module lives in
the repository instead and is loaded from its path::

    import evaluate
    from pih2t_hub.evaluation import LONGTAIL_METRIC_PATH
    metric = evaluate.load(str(LONGTAIL_METRIC_PATH))
    metric.compute(predictions=preds, references=labels, train_class_counts=counts)    # class ids
    metric.compute(predictions=logits, references=labels, train_class_counts=counts)   # logits -> also ECE
    metric.compute(predictions=probs, references=labels, train_class_counts=counts)    # probabilities -> ECE

The default configuration takes any of the three: a flat list of class ids, or one row of ``num_classes`` scores
per example, read as probabilities when every row is non-negative and sums to 1 and as logits otherwise (softmax
is applied for the calibration error; the prediction is the row's argmax either way). A row of logits that happens
to look like probabilities is read as probabilities, which changes nothing but the ECE; to force a reading, load
the ``"preds"``, ``"logits"`` or ``"probs"`` configuration instead.

The numbers come from :func:`pih2t_hub.evaluation.metrics.longtail_metrics`, so both paths agree by construction.
"""

from __future__ import annotations


import datasets
import evaluate
import numpy as np

from pih2t_hub.evaluation.metrics import longtail_metrics

_DESCRIPTION = """\
Accuracy of a long-tailed classifier, grouped by each class's number of *training* images: overall top-1,
balanced accuracy (mean per-class recall over classes with test images), many-shot (> many_threshold training
images), medium-shot and few-shot (< few_threshold) accuracy as the mean per-class accuracy inside each group
(NaN when a group has no class with test images), and per-class accuracy (NaN for classes without test images).
Predictions may be class ids, logits or probabilities (one row of scores per example); with scores the 15-bin
expected calibration error is added.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class indices, or one row of num_classes scores per example: logits or probabilities.
        The default configuration tells them apart (rows that are non-negative and sum to 1 are probabilities,
        other rows logits); the "preds", "logits" and "probs" configurations accept only that kind.
    references: true class indices.
    train_class_counts (list[int]): training images per class; defines the shot groups and the number of classes.
    many_threshold (int, default 100), few_threshold (int, default 20): shot-group thresholds.
    groups (list[str], optional): precomputed "many"/"medium"/"few" per class (fixed-range protocol).
    return_per_class (bool, default True): include the per-class accuracy list.
Returns:
    overall, balanced, many, medium, few (floats in [0, 1]; NaN for an empty group), ece (only when the
    predictions are scores), per_class (list of floats, NaN for classes without test images).
Examples:
    >>> metric = evaluate.load("path/to/longtail_metric")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0], train_class_counts=[200, 10])["overall"]
    0.6666666666666666
    >>> metric.compute(predictions=[[2.0, -1.0], [0.1, 0.3], [0.0, 1.5]], references=[0, 1, 0],
    ...                train_class_counts=[200, 10])["overall"]
    0.6666666666666666
"""

#: configuration name -> how ``longtail_metrics`` reads the predictions
_KINDS = {"default": "auto", "preds": "preds", "logits": "logits", "probs": "probs"}
_IDS = datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})
_SCORES = datasets.Features(
    {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
)

_CITATION = """\
@inproceedings{kang2020decoupling,
  title={Decoupling Representation and Classifier for Long-Tailed Recognition},
  author={Kang, Bingyi and Xie, Saining and Rohrbach, Marcus and Yan, Zhicheng and Gordo, Albert and Feng, Jiashi
          and Kalantidis, Yannis},
  booktitle={ICLR},
  year={2020}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LongtailMetric(evaluate.Metric):
    """``evaluate`` wrapper around :func:`longtail_metrics`."""

    def _info(self) -> evaluate.MetricInfo:
        kind = _KINDS.get(self.config_name)
        if kind is None:
            raise ValueError(f"unknown configuration {self.config_name!r}; use one of {sorted(_KINDS)}")
        # a list of feature sets: evaluate picks the one that matches the first batch (ids or score rows)
        features = {"auto": [_SCORES, _IDS], "preds": _IDS}.get(kind, _SCORES)
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=features,
            reference_urls=["https://arxiv.org/abs/1910.09217"],
        )

    def _compute(
        self,
        predictions,
        references,
        train_class_counts=None,
        many_threshold: int = 100,
        few_threshold: int = 20,
        groups=None,
        return_per_class: bool = True,
    ) -> dict:
        if train_class_counts is None:
            raise ValueError("train_class_counts is required: the shot groups are defined by training frequency")
        outputs = np.asarray(predictions)
        kind = _KINDS[self.config_name]
        res = longtail_metrics(
            outputs,
            np.asarray(references, dtype=np.int64),
            train_class_counts,
            many_threshold=many_threshold,
            few_threshold=few_threshold,
            groups=groups,
            kind=kind,
        )
        out = {k: float(res[k]) for k in ("overall", "balanced", "many", "medium", "few")}
        if res.get("ece") is not None:
            out["ece"] = float(res["ece"])
        if return_per_class:
            out["per_class"] = [float(v) for v in res["per_class"]]
        return out
