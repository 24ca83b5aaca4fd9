"""Cross-entropy retraining with instance sampling: the baseline every long-tailed method is measured against."""

from __future__ import annotations

from .base import Method, Recipe, register_method

# The H2T paper's stage-2 optimiser (CIFAR-100-LT, imbalance 100): CE shares it so that "H2T vs CE" isolates the
# fusion, nothing else.
H2T_RECIPE = Recipe(epochs=10, lr=0.02, batch_size=128, weight_decay=5e-4,
                    source="H2T official CIFAR-100-LT (IF 100) stage-2 config: 10 epochs, peak lr 0.1 x 0.2, "
                           "batch 128, weight decay 5e-4, cosine per epoch")


@register_method("ce")
class CrossEntropy(Method):
    paper = "—"
    summary = "cross-entropy retraining of the stage-1 head with instance sampling (the baseline)"
    recipe = H2T_RECIPE
