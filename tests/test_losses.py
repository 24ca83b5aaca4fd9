"""Baseline losses against hand-written formulas (math module / torch CE), and their bad-input errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from pih2t_hub.losses import (
    BalancedSoftmaxLoss,
    ClassBalancedLoss,
    FocalLoss,
    LDAMLoss,
    LogitAdjustedLoss,
    build_loss,
    class_balanced_weights,
    ldam_margins,
    list_losses,
    posthoc_logit_adjust,
)


def _ce(logits: list[float], y: int) -> float:
    """Softmax cross-entropy of one example, by hand."""
    m = max(logits)
    return -(logits[y] - m - math.log(sum(math.exp(z - m) for z in logits)))


# --------------------------------------------------------------------------- balanced softmax / logit adjustment
def test_balanced_softmax_two_class_by_hand():
    counts = [90, 10]
    logits = torch.tensor([[0.3, 0.1], [0.3, 0.1]])
    labels = torch.tensor([0, 1])
    # CE on z + log n_c, written out for both examples
    a0 = 0.3 + math.log(90)
    a1 = 0.1 + math.log(10)
    l0 = -math.log(math.exp(a0) / (math.exp(a0) + math.exp(a1)))
    l1 = -math.log(math.exp(a1) / (math.exp(a0) + math.exp(a1)))
    loss = BalancedSoftmaxLoss(counts)(logits, labels)
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    assert build_loss("balanced_softmax", class_counts=counts)(logits, labels).item() == pytest.approx((l0 + l1) / 2, rel=1e-6)


def test_logit_adjusted_tau_by_hand_and_limits():
    counts = [50, 30, 20]
    prior = [c / 100 for c in counts]
    z = [1.0, -0.5, 0.25]
    for tau in (0.0, 0.5, 1.0, 2.0):
        adj = [zi + tau * math.log(p) for zi, p in zip(z, prior)]
        expected = _ce(adj, 2)
        got = LogitAdjustedLoss(counts, tau=tau)(torch.tensor([z]), torch.tensor([2]))
        assert got.item() == pytest.approx(expected, rel=1e-5)
    # tau = 0 is plain CE (torch's own implementation as the reference)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    assert LogitAdjustedLoss(counts, tau=0.0)(x, y).item() == pytest.approx(F.cross_entropy(x, y).item(), rel=1e-6)
    # tau = 1 and balanced softmax (log n_c instead of log prior) coincide
    bsm = x + torch.log(torch.tensor(counts, dtype=torch.float32))
    assert LogitAdjustedLoss(counts, tau=1.0)(x, y).item() == pytest.approx(F.cross_entropy(bsm, y).item(), rel=1e-5)


def test_posthoc_logit_adjust_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    counts = [70, 20, 10]
    out = posthoc_logit_adjust(logits, counts, tau=1.5)
    expected = [2.0 - 1.5 * math.log(0.7), 1.0 - 1.5 * math.log(0.2), 0.0 - 1.5 * math.log(0.1)]
    assert out[0].tolist() == pytest.approx(expected, rel=1e-6)
    # the tail class wins after adjustment: 0 - 1.5 log 0.1 = 3.45 > 2 - 1.5 log 0.7 = 2.53
    assert int(out.argmax()) == 2
    assert torch.equal(posthoc_logit_adjust(logits, counts, tau=0.0), logits)


# --------------------------------------------------------------------------- LDAM (+DRW)
def test_ldam_margins_formula():
    m = ldam_margins([10000, 16, 1], max_m=0.5)
    # n^{-1/4}: 0.1, 0.5, 1 -> scaled so the max is 0.5
    assert m.tolist() == pytest.approx([0.05, 0.25, 0.5], rel=1e-6)


def test_ldam_loss_by_hand():
    counts = [10000, 16, 1]
    z = [0.2, -0.1, 0.4]
    margins = [0.05, 0.25, 0.5]
    for y in range(3):
        shifted = [30 * (zi - (margins[y] if i == y else 0.0)) for i, zi in enumerate(z)]
        got = LDAMLoss(counts, max_m=0.5, s=30)(torch.tensor([z]), torch.tensor([y]))
        assert got.item() == pytest.approx(_ce(shifted, y), rel=1e-5)


def test_ldam_drw_switches_weights_at_drw_epoch_and_resumes():
    counts = [100, 10]
    beta = 0.9999
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    w = [r * 2 / sum(raw) for r in raw]
    z = torch.tensor([[0.5, 0.1], [0.2, 0.3], [0.9, -0.4]])
    y = torch.tensor([0, 1, 1])
    margins = [0.5 * (100 ** -0.25) / (10 ** -0.25), 0.5]
    per = []
    for row, lab in zip(z.tolist(), y.tolist()):
        per.append(_ce([30 * (v - (margins[lab] if i == lab else 0.0)) for i, v in enumerate(row)], lab))
    loss = build_loss("ldam_drw", class_counts=counts, drw_epoch=3)
    loss.set_epoch(2)
    assert loss(z, y).item() == pytest.approx(sum(per) / 3, rel=1e-5)
    loss.set_epoch(3)
    weighted = sum(w[lab] * p for lab, p in zip(y.tolist(), per)) / sum(w[lab] for lab in y.tolist())
    assert loss(z, y).item() == pytest.approx(weighted, rel=1e-5)
    # the phase is in the state_dict: a fresh loss loading it is in the DRW phase too
    fresh = build_loss("ldam_drw", class_counts=counts, drw_epoch=3)
    fresh.load_state_dict(loss.state_dict())
    assert fresh(z, y).item() == pytest.approx(weighted, rel=1e-5)
    # plain LDAM never re-weights
    plain = build_loss("ldam", class_counts=counts)
    plain.set_epoch(500)
    assert plain(z, y).item() == pytest.approx(sum(per) / 3, rel=1e-5)


# --------------------------------------------------------------------------- focal / class-balanced
def test_focal_gamma_zero_is_ce_and_gamma_two_by_hand():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 5, generator=g)
    y = torch.randint(0, 5, (16,), generator=g)
    assert FocalLoss(gamma=0.0)(x, y).item() == pytest.approx(F.cross_entropy(x, y).item(), rel=1e-6)
    z = [1.0, 0.0, -1.0]
    p = math.exp(1.0) / (math.exp(1.0) + 1.0 + math.exp(-1.0))
    expected = -((1 - p) ** 2) * math.log(p)
    assert FocalLoss(gamma=2.0)(torch.tensor([z]), torch.tensor([0])).item() == pytest.approx(expected, rel=1e-5)
    alpha = [0.25, 1.0, 1.0]
    got = FocalLoss(gamma=2.0, weight=alpha)(torch.tensor([z]), torch.tensor([0]))
    assert got.item() == pytest.approx(0.25 * expected, rel=1e-5)


def test_focal_gradient_is_finite_for_confident_examples():
    x = torch.tensor([[200.0, 0.0]], requires_grad=True)
    FocalLoss(gamma=0.5)(x, torch.tensor([0])).backward()
    assert torch.isfinite(x.grad).all()


def test_class_balanced_weights_formula():
    counts, beta = [10, 5, 1], 0.9
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    expected = [r * 3 / sum(raw) for r in raw]
    w = class_balanced_weights(counts, beta)
    assert w.tolist() == pytest.approx(expected, rel=1e-6)
    assert float(w.sum()) == pytest.approx(3.0, rel=1e-6)
    assert class_balanced_weights(counts, 0.0).tolist() == pytest.approx([1.0, 1.0, 1.0])
    # beta close to 1 approaches inverse frequency
    inv = [1 / n for n in counts]
    assert class_balanced_weights(counts, 0.999999).tolist() == pytest.approx([v * 3 / sum(inv) for v in inv], rel=1e-4)


def test_class_balanced_ce_and_focal_by_hand():
    counts, beta = [20, 2], 0.99
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    w = [r * 2 / sum(raw) for r in raw]
    rows, labs = [[0.4, 0.1], [0.0, 0.7], [1.0, 1.5]], [0, 1, 0]
    ce = [_ce(r, t) for r, t in zip(rows, labs)]
    x, y = torch.tensor(rows), torch.tensor(labs)
    assert build_loss("cb", class_counts=counts, beta=beta)(x, y).item() == pytest.approx(
        sum(w[t] * c for t, c in zip(labs, ce)) / 3, rel=1e-5
    )
    probs = [math.exp(-c) for c in ce]
    fl = [(1 - p) ** 2 * c for p, c in zip(probs, ce)]
    got = build_loss("cb", class_counts=counts, beta=beta, base="focal", gamma=2.0)(x, y)
    assert got.item() == pytest.approx(sum(w[t] * f for t, f in zip(labs, fl)) / 3, rel=1e-5)
    drw = ClassBalancedLoss(counts, beta=beta, drw_epoch=5)
    assert drw(x, y).item() == pytest.approx(sum(ce) / 3, rel=1e-5)  # CE-DRW before the switch


def test_losses_backpropagate():
    g = torch.Generator().manual_seed(2)
    counts = [40, 12, 5, 1]
    for name in list_losses():
        x = torch.randn(10, 4, generator=g, requires_grad=True)
        y = torch.randint(0, 4, (10,), generator=g)
        build_loss(name, class_counts=counts)(x, y).backward()
        assert x.grad is not None and torch.isfinite(x.grad).all(), name


# --------------------------------------------------------------------------- registry and bad input
def test_registry_names():
    assert set(list_losses()) == {"ce", "focal", "balanced_softmax", "logit_adjusted", "ldam", "ldam_drw", "cb", "harmonized"}
    assert isinstance(build_loss("Balanced-Softmax", class_counts=[3, 1]), BalancedSoftmaxLoss)
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("nope")
    with pytest.raises(TypeError):
        build_loss("focal", not_an_arg=1)


@pytest.mark.parametrize("name", ["balanced_softmax", "logit_adjusted", "ldam", "ldam_drw", "cb", "harmonized"])
def test_missing_counts_raise(name):
    with pytest.raises(ValueError, match="class_counts"):
        build_loss(name)


@pytest.mark.parametrize("name", ["balanced_softmax", "logit_adjusted", "ldam", "ldam_drw", "cb"])
def test_zero_or_bad_counts_raise(name):
    with pytest.raises(ValueError, match="zero"):
        build_loss(name, class_counts=[10, 0, 3])
    with pytest.raises(ValueError, match="non-negative"):
        build_loss(name, class_counts=[10, -1, 3])
    with pytest.raises(ValueError, match="whole"):
        build_loss(name, class_counts=[10, 2.5, 3])


def test_negative_tau_and_bad_hyper_parameters_raise():
    with pytest.raises(ValueError, match="tau"):
        LogitAdjustedLoss([5, 1], tau=-0.1)
    with pytest.raises(ValueError, match="tau"):
        posthoc_logit_adjust(torch.zeros(1, 2), [5, 1], tau=-1)
    with pytest.raises(ValueError, match="gamma"):
        FocalLoss(gamma=-1)
    with pytest.raises(ValueError, match="beta"):
        class_balanced_weights([5, 1], beta=1.0)
    with pytest.raises(ValueError, match="max_m"):
        ldam_margins([5, 1], max_m=0)


def test_bad_logits_and_labels_raise():
    loss = LogitAdjustedLoss([5, 3, 1])
    with pytest.raises(ValueError, match="NaN"):
        loss(torch.tensor([[0.0, float("nan"), 1.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="NaN"):
        posthoc_logit_adjust(torch.tensor([[0.0, float("nan"), 1.0]]), [5, 3, 1])
    with pytest.raises(ValueError, match="classes"):
        loss(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        loss(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="integer"):
        loss(torch.zeros(2, 3), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="NaN"):
        FocalLoss()(torch.tensor([[float("inf"), 0.0]]), torch.tensor([0]))
