"""H2T trained with the balanced-softmax loss: the combination the H2T paper reports as its strongest."""

from __future__ import annotations

from .base import register_method
from .h2t import H2T


@register_method("h2t_bsm")
class H2TBalancedSoftmax(H2T):
    paper = "Li et al., AAAI 2024 with Ren et al., NeurIPS 2020"
    summary = "H2T fusion with the balanced-softmax loss"
    loss = "balanced_softmax"
    loss_is_fixed = True
