"""Methods that are a loss: the stage-1 head is retrained on frozen features with a long-tail-aware loss.

Their papers train networks end to end; on frozen features the loss has to move the head's biases by up to
log(n_max / n_min) (4.6 at imbalance 100), which H2T's short stage-2 schedule does not do. They therefore share a
longer recipe: cRT's optimiser for 30 epochs (the loss hyper-parameters stay the papers').
"""

from __future__ import annotations

from .base import Method, Recipe

LOSS_RECIPE = Recipe(epochs=30, lr=0.2, batch_size=512, weight_decay=5e-4,
                     source="cRT's optimiser (lr 0.2, batch 512, cosine) for 30 epochs, long enough for a "
                            "re-weighting loss to move the head's biases on frozen features")


class LossMethod(Method):
    recipe = LOSS_RECIPE
    loss_is_fixed = True


__all__ = ["LOSS_RECIPE", "LossMethod"]
