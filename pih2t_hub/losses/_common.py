"""Private helpers shared by the losses: class-count validation, input checks and reductions.

Why a module of its own: every count-based loss must reject the same bad inputs with the same clear message
(missing counts, zeros, wrong shape), and every loss must reduce per-sample values the same way, so that the
losses are comparable side by side.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["as_class_counts", "check_logits_labels", "reduce_loss", "REDUCTIONS", "CountsLike"]

CountsLike = Sequence[int] | Sequence[float] | np.ndarray | torch.Tensor

#: ``"mean"``: Σ w_i·l_i / B (Cui et al. / focal convention); ``"weighted_mean"``: Σ w_i·l_i / Σ w_i (what
#: ``F.cross_entropy(weight=...)`` does, used by the LDAM-DRW code); ``"sum"``; ``"none"`` (per-sample vector).
REDUCTIONS = ("mean", "weighted_mean", "sum", "none")


def as_class_counts(
    class_counts: CountsLike | None,
    *,
    loss_name: str,
    allow_zero: bool = False,
) -> torch.Tensor:
    """Validate training class counts and return them as a 1-D float64 tensor.

    Raises ``ValueError`` when counts are missing (the loss cannot be built without them), not 1-D, negative,
    non-integral, or zero where the loss takes a logarithm or a power of them (``allow_zero=False``).
    """
    if class_counts is None:
        raise ValueError(
            f"loss '{loss_name}' needs class_counts (the number of training samples per class); "
            "pass class_counts=[n_0, n_1, ...]"
        )
    if isinstance(class_counts, torch.Tensor):
        counts = class_counts.detach().to("cpu", torch.float64)
    else:
        try:
            counts = torch.as_tensor(np.asarray(class_counts, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise ValueError(f"loss '{loss_name}': class_counts must be numbers, got {class_counts!r}") from err
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(f"loss '{loss_name}': class_counts must be a non-empty 1-D sequence, got shape {tuple(counts.shape)}")
    if not torch.isfinite(counts).all():
        raise ValueError(f"loss '{loss_name}': class_counts contain NaN or inf")
    if (counts < 0).any():
        raise ValueError(f"loss '{loss_name}': class_counts must be non-negative")
    if (counts != counts.round()).any():
        raise ValueError(f"loss '{loss_name}': class_counts must be whole numbers")
    if not allow_zero and (counts == 0).any():
        zeros = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(
            f"loss '{loss_name}': class_counts are zero for classes {zeros[:10]}{'...' if len(zeros) > 10 else ''}; "
            "this loss takes a log or power of the counts, so every class needs at least one training sample"
        )
    return counts


def check_logits_labels(logits: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> None:
    """Raise a clear error for malformed loss inputs instead of silently producing wrong numbers.

    Checks shape (B, C) logits against (B,) integer labels, the class dimension against ``num_classes``,
    label range, and NaN/inf in the logits. The value checks synchronise with the device once per call; losses
    take ``check_inputs=False`` to skip them in a hot loop that is known to be sane.
    """
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("logits and labels must be torch.Tensor")
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (batch, num_classes), got {tuple(logits.shape)}")
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor of class indices, got {labels.dtype}")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(f"logits have {logits.shape[1]} classes but the loss was built for {num_classes}")
    if labels.numel() and (bool((labels < 0).any()) or bool((labels >= logits.shape[1]).any())):
        raise ValueError(f"labels must lie in [0, {logits.shape[1] - 1}]")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits contain NaN or inf")


def check_reduction(reduction: str) -> str:
    """Return ``reduction`` if it is one of :data:`REDUCTIONS`, else raise ``ValueError``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def reduce_loss(per_sample: torch.Tensor, weights: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Apply optional per-sample ``weights`` and reduce (see :data:`REDUCTIONS`)."""
    values = per_sample if weights is None else per_sample * weights
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    if reduction == "mean" or weights is None:
        return values.mean() if values.numel() else values.sum()
    if reduction == "weighted_mean":
        return values.sum() / weights.sum()
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
