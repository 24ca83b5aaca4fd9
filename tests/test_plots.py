"""The PNG plots decode and show something."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pih2t_hub.evaluation.plots import plot_accuracy_vs_frequency, plot_reliability


def _decode(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"), dtype=np.float64)


def test_accuracy_vs_frequency_png(tmp_path):
    rng = np.random.default_rng(0)
    counts = np.round(500 * 0.01 ** (np.arange(30) / 29)).astype(int)  # exponential profile 500 -> 5
    acc_a = np.clip(np.log(counts) / np.log(500) + rng.normal(0, 0.05, 30), 0, 1)
    acc_b = np.clip(0.6 + rng.normal(0, 0.05, 30), 0, 1)
    acc_b[3] = np.nan  # a class without test images is skipped, not drawn at 0
    out = plot_accuracy_vs_frequency({"CE": acc_a, "H2T": acc_b}, counts, tmp_path / "sub" / "freq.png")
    assert out == tmp_path / "sub" / "freq.png"
    pixels = _decode(out)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.var() > 100.0  # not blank
    assert [p.name for p in out.parent.iterdir()] == ["freq.png"]  # no temp file left behind


def test_single_method_and_fixed_groups(tmp_path):
    counts = [300, 120, 60, 25, 8, 0]
    groups = ["many", "many", "medium", "medium", "few", "few"]
    out = plot_accuracy_vs_frequency({"m": [0.9, 0.8, 0.5, 0.4, 0.1, np.nan]}, counts, tmp_path / "f.png",
                                     groups=groups)
    assert _decode(out).var() > 100.0


def test_reliability_png(tmp_path):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(200, 5)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 5, 200)
    out = plot_reliability(probs, labels, tmp_path / "rel.png")
    assert _decode(out).var() > 100.0


def test_plot_input_errors(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        plot_accuracy_vs_frequency({"m": [0.5, 0.5]}, [10, 20, 30], tmp_path / "a.png")
    with pytest.raises(ValueError, match="fractions"):
        plot_accuracy_vs_frequency({"m": [50.0, 60.0]}, [10, 20], tmp_path / "a.png")
    with pytest.raises(ValueError, match="png"):
        plot_accuracy_vs_frequency({"m": [0.5, 0.6]}, [10, 20], tmp_path / "a.jpg")
    with pytest.raises(ValueError, match="non-empty"):
        plot_accuracy_vs_frequency({}, [10, 20], tmp_path / "a.png")
    assert not list(tmp_path.iterdir())
