"""Losses for long-tailed recognition, and a small registry to build them by name.

Every loss is an ``nn.Module`` called as ``loss(logits, labels) -> scalar``. Losses whose behaviour changes over
training (``ldam_drw``, ``cb`` with ``drw_epoch``, ``harmonized``) expose ``set_epoch(epoch)`` and keep their
state in registered buffers, so it is saved and restored with the ``state_dict``. The training loop should call
``set_epoch`` when present::

    loss_fn = build_loss("ldam_drw", class_counts=counts, drw_epoch=160)
    for epoch in range(epochs):
        if hasattr(loss_fn, "set_epoch"):
            loss_fn.set_epoch(epoch)
        ...

Losses that need the training class counts raise ``ValueError`` when built without them.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from .._names import loss_key as _normalise
from ._common import CountsLike
from .class_balanced import ClassBalancedLoss, DeferredReweighting, class_balanced_weights, effective_number
from .focal import FocalLoss, focal_loss
from .harmonized import HarmonizedLoss, inter_class_weights_b1, per_class_bins
from .ldam import LDAMLoss, ldam_margins
from .logit_adjusted import BalancedSoftmaxLoss, LogitAdjustedLoss, log_prior, posthoc_logit_adjust

__all__ = [
    "build_loss",
    "register_loss",
    "list_losses",
    "BalancedSoftmaxLoss",
    "ClassBalancedLoss",
    "DeferredReweighting",
    "FocalLoss",
    "HarmonizedLoss",
    "LDAMLoss",
    "LogitAdjustedLoss",
    "class_balanced_weights",
    "effective_number",
    "focal_loss",
    "inter_class_weights_b1",
    "ldam_margins",
    "log_prior",
    "per_class_bins",
    "posthoc_logit_adjust",
]

_LOSSES: dict[str, Callable[..., nn.Module]] = {}


def register_loss(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a factory ``fn(class_counts, **kwargs) -> nn.Module`` under ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = _normalise(name)
        if key in _LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        _LOSSES[key] = fn
        return fn

    return deco


def list_losses() -> list[str]:
    """Names accepted by :func:`build_loss`."""
    return sorted(_LOSSES)


def build_loss(name: str, class_counts: CountsLike | None = None, epochs: int | None = None,
               **kwargs: Any) -> nn.Module:
    """Build a loss by name (case-insensitive, ``-`` and ``_`` interchangeable).

    ``class_counts`` (training samples per class) is required by every loss except ``ce``, ``focal`` and
    ``harmonized`` with ``bins_rule="constant"`` and ``inter`` in {``"b2"``, ``"none"``}. Extra keyword arguments go to
    the loss constructor; unknown ones raise ``TypeError``. ``epochs`` (the training stage's length) reaches the
    losses whose factory takes it (``ldam_drw`` defers its re-weighting to 80 % of it); the others ignore it.
    """
    if not isinstance(name, str):
        raise TypeError(f"loss name must be a string, got {type(name).__name__}")
    key = _normalise(name)
    if key not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; available: {', '.join(list_losses())}")
    factory = _LOSSES[key]
    if epochs is not None and "epochs" in inspect.signature(factory).parameters:
        kwargs["epochs"] = epochs
    return factory(class_counts, **kwargs)


@register_loss("ce")
def _ce(class_counts: CountsLike | None = None, **kwargs: Any) -> nn.Module:
    """Plain softmax cross-entropy (``torch.nn.CrossEntropyLoss``; kwargs such as ``label_smoothing`` pass through)."""
    return nn.CrossEntropyLoss(**kwargs)


@register_loss("focal")
def _focal(class_counts: CountsLike | None = None, **kwargs: Any) -> nn.Module:
    return FocalLoss(**kwargs)


@register_loss("balanced_softmax")
def _bsm(class_counts: CountsLike | None = None, **kwargs: Any) -> nn.Module:
    return BalancedSoftmaxLoss(class_counts, **kwargs)


@register_loss("logit_adjusted")
def _la(class_counts: CountsLike | None = None, **kwargs: Any) -> nn.Module:
    return LogitAdjustedLoss(class_counts, **kwargs)


@register_loss("ldam")
def _ldam(class_counts: CountsLike | None = None, **kwargs: Any) -> nn.Module:
    return LDAMLoss(class_counts, **kwargs)


@register_loss("ldam_drw")
def _ldam_drw(class_counts: CountsLike | None = None, drw_epoch: int | None = None, epochs: int | None = None,
              **kwargs: Any) -> nn.Module:
    """LDAM with class-balanced weights deferred to ``drw_epoch``; unset, 80 % of ``epochs`` (160 of 200 in the
    paper's recipe; 160 when the length is not known)."""
    if drw_epoch is None:
        drw_epoch = int(0.8 * int(epochs)) if epochs is not None else 160
    return LDAMLoss(class_counts, drw_epoch=drw_epoch, **kwargs)


@register_loss("cb")
def _cb(class_counts: CountsLike | None = None, **kwargs: Any) -> nn.Module:
    """Class-balanced CE or focal (``base="ce"|"focal"``); ``drw_epoch`` gives CE-DRW / focal-DRW."""
    return ClassBalancedLoss(class_counts, **kwargs)


@register_loss("harmonized")
def _harmonized(class_counts: CountsLike | None = None, **kwargs: Any) -> nn.Module:
    return HarmonizedLoss(class_counts=class_counts, **kwargs)
