"""Decoupling (Kang et al. 2020): tau-norm, tau selection, LWS, NCM, cRT re-initialisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pih2t_hub.methods.decoupling import LWSHead, NCMClassifier, crt_reinit, select_tau, tau_norm_logits, tau_normalize


# --------------------------------------------------------------------------- tau-norm
def test_tau_normalize_norms():
    w = torch.tensor([[3.0, 4.0], [0.6, 0.8], [0.0, 2.0]])  # norms 5, 1, 2
    for tau in (0.0, 0.5, 1.0, 2.0):
        out = tau_normalize(w, tau)
        expected_norms = [n ** (1 - tau) for n in (5.0, 1.0, 2.0)]
        assert out.norm(dim=1).tolist() == pytest.approx(expected_norms, rel=1e-6)
        # direction unchanged
        assert torch.allclose(out / out.norm(dim=1, keepdim=True), w / w.norm(dim=1, keepdim=True))
    assert torch.equal(tau_normalize(w, 0.0), w)
    zero_row = tau_normalize(torch.tensor([[0.0, 0.0], [1.0, 0.0]]), 1.0)
    assert zero_row[0].tolist() == [0.0, 0.0]


def test_tau_errors():
    w = torch.ones(2, 3)
    with pytest.raises(ValueError, match="tau"):
        tau_normalize(w, -0.5)
    with pytest.raises(ValueError, match="tau"):
        tau_normalize(w, float("nan"))
    with pytest.raises(ValueError, match="tau"):
        select_tau(w, None, torch.ones(2, 3), torch.tensor([0, 1]), taus=[0.5, -1.0])
    with pytest.raises(ValueError, match="NaN"):
        select_tau(w, None, torch.full((2, 3), float("nan")), torch.tensor([0, 1]))


def test_select_tau_on_hand_made_example():
    """Head class 0 has norm 2, tail class 1 norm 0.5. Logits = (2^{1-t} x1, 0.5^{1-t} x2).
    Tail point (0.6, 1.0) is right iff 0.25^{1-t} > 0.6, i.e. t > 1 - ln0.6/ln0.25 = 0.6315;
    head point (1.0, 0.6) is right iff 4^{1-t} > 0.6, i.e. t < 1 + ln0.6/ln0.25 = 1.3685.
    On the grid 0, 0.1, ..., 2 the smallest perfect tau is 0.7."""
    w = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    feats = torch.tensor([[1.0, 0.6], [0.6, 1.0]])
    labels = torch.tensor([0, 1])
    sel = select_tau(w, None, feats, labels)
    assert sel.tau == pytest.approx(0.7)
    assert sel.score == pytest.approx(1.0)
    scores = dict(sel.scores)
    lo, hi = 1 - math.log(0.6) / math.log(0.25), 1 + math.log(0.6) / math.log(0.25)
    for t, s in scores.items():
        assert s == pytest.approx(1.0 if lo < t < hi else 0.5), t
    # tau = 0 reproduces the plain linear head
    assert torch.allclose(tau_norm_logits(feats, w, 0.0), feats @ w.T)


def test_select_tau_balanced_accuracy_differs_from_accuracy():
    """9 head points, 1 tail point. tau=0: all predicted head -> acc 0.9, balanced 0.5.
    tau=1 gets the tail point right and 8 of 9 head points -> acc 0.9, balanced (8/9 + 1)/2."""
    w = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    head = [[1.0, 0.1]] * 8 + [[0.5, 0.9]]
    feats = torch.tensor(head + [[0.6, 1.0]])
    labels = torch.tensor([0] * 9 + [1])
    sel = select_tau(w, None, feats, labels, taus=[0.0, 1.0], metric="balanced_accuracy")
    assert sel.tau == 1.0 and sel.score == pytest.approx((8 / 9 + 1) / 2)
    acc = select_tau(w, None, feats, labels, taus=[0.0, 1.0], metric="accuracy")
    assert acc.tau == 0.0 and acc.score == pytest.approx(0.9)  # tie at 0.9 goes to the smaller tau


# --------------------------------------------------------------------------- LWS
def test_lws_only_trains_scales():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(4, 3)
    crt_reinit(lin, generator=g)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    head = LWSHead(lin)
    assert [n for n, p in head.named_parameters() if p.requires_grad] == ["scales"]
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    x = torch.randn(16, 4, generator=g)
    y = torch.randint(0, 3, (16,), generator=g)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(head(x), y).backward()
        opt.step()
    assert torch.equal(lin.weight, w0) and torch.equal(lin.bias, b0)
    assert not torch.allclose(head.scales, torch.ones(3))
    # logits are f_c * (w_c . x + b_c), computed by hand
    expected = (x @ w0.T + b0) * head.scales.detach()
    assert torch.allclose(head(x), expected, atol=1e-6)
    assert torch.allclose(head.to_linear()(x), expected, atol=1e-6)
    with pytest.raises(TypeError):
        LWSHead(nn.Conv2d(1, 1, 1))


# --------------------------------------------------------------------------- NCM
def test_ncm_hand_made_points():
    feats = torch.tensor([[9.0, 0.0], [11.0, 0.0], [0.0, 0.5], [0.0, 1.5]])  # means (10, 0) and (0, 1)
    labels = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[2.0, 0.5]])
    # raw Euclidean: |q-(10,0)| = 8.02 > |q-(0,1)| = 2.06 -> class 1
    raw = NCMClassifier(2, metric="euclidean", normalize=False).fit(feats, labels)
    assert raw.class_means.tolist() == [[10.0, 0.0], [0.0, 1.0]]
    assert raw.predict(query).item() == 1
    assert raw(query)[0].tolist() == pytest.approx([-math.hypot(8.0, 0.5), -math.hypot(2.0, 0.5)], rel=1e-6)
    # cosine: cos to (1,0) = 2/sqrt(4.25) = 0.970, to (0,1) = 0.5/sqrt(4.25) = 0.243 -> class 0
    cos = NCMClassifier(2, metric="cosine").fit(feats, labels)
    assert cos(query)[0].tolist() == pytest.approx([2 / math.sqrt(4.25), 0.5 / math.sqrt(4.25)], rel=1e-6)
    assert cos.predict(query).item() == 0
    # Euclidean on L2-normalised features/means agrees with cosine
    assert NCMClassifier(2, metric="euclidean", normalize=True).fit(feats, labels).predict(query).item() == 0
    assert "class_means" in cos.state_dict()


def test_ncm_errors():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="class"):
        NCMClassifier(3).fit(feats, torch.tensor([0, 1]))  # class 2 has no sample
    with pytest.raises(ValueError, match="NaN"):
        NCMClassifier(2).fit(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    ncm = NCMClassifier(2).fit(feats, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        ncm(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(RuntimeError):
        NCMClassifier(2)(feats)


# --------------------------------------------------------------------------- cRT
def test_crt_reinit_is_seeded_bounded_and_trainable():
    head = nn.Linear(16, 5)
    head.requires_grad_(False)
    before = head.weight.detach().clone()
    crt_reinit(head, generator=torch.Generator().manual_seed(3))
    first = head.weight.detach().clone(), head.bias.detach().clone()
    assert not torch.equal(first[0], before)
    bound = 1 / math.sqrt(16)
    assert float(head.weight.detach().abs().max()) <= bound and float(head.bias.detach().abs().max()) <= bound
    # a uniform on [-1/4, 1/4] over 80 draws spreads out (not all near zero)
    assert float(head.weight.detach().abs().max()) > 0.5 * bound
    assert head.weight.requires_grad and head.bias.requires_grad
    crt_reinit(head, generator=torch.Generator().manual_seed(3))
    assert torch.equal(head.weight, first[0]) and torch.equal(head.bias, first[1])
    with pytest.raises(TypeError):
        crt_reinit(nn.ReLU())


def test_default_tau_grid():
    w = torch.eye(2)
    sel = select_tau(w, torch.zeros(2), torch.eye(2), torch.tensor([0, 1]))
    assert [t for t, _ in sel.scores] == pytest.approx(list(np.linspace(0, 2, 21)))


def test_crt_reinit_redraws_a_cosine_head_from_the_generator():
    """cRT after a stage 1 with a cosine head (lightweight fine-tuning's head): the class vectors are drawn afresh
    from N(0, 0.01²) with the given generator, the same draw as the generator gives directly."""
    from pih2t_hub.models.pih2t.heads import CosineHead

    head = CosineHead(6, 4, scale=25.0)
    with torch.no_grad():
        head.weight.fill_(1.0)
    crt_reinit(head, generator=torch.Generator().manual_seed(5))
    expected = torch.empty(4, 6).normal_(0.0, 0.01, generator=torch.Generator().manual_seed(5))
    assert torch.equal(head.weight.detach(), expected) and head.weight.requires_grad
    assert head.scale == 25.0
