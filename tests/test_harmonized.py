"""Gradient-harmonised loss [RECON] against independent loop implementations of its limits:
GHM-C with one class, plain class re-weighting when M_c = 1, per-class GHM when all class weights are 1."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from pih2t_hub.losses import HarmonizedLoss, build_loss, inter_class_weights_b1, per_class_bins


def _batches(num_classes: int, n_batches: int, batch: int, seed: int, labels_from: list[int] | None = None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        logits = 2.0 * torch.randn(batch, num_classes, generator=g)
        pool = torch.tensor(labels_from if labels_from is not None else list(range(num_classes)))
        labels = pool[torch.randint(0, len(pool), (batch,), generator=g)]
        out.append((logits, labels))
    return out


def _edges(m: int) -> list[float]:
    e = [k / m for k in range(m + 1)]
    e[-1] += 1e-6
    return e


class _RefGHMC:
    """GHM-C (Li et al. 2019) in its original binary form: g = |sigmoid(x) - t|, bins k/M (last edge + 1e-6),
    EMA over non-empty bins, beta = N / R_bin / n_nonempty, L = sum(beta * BCE) / N."""

    def __init__(self, bins: int, momentum: float) -> None:
        self.edges = _edges(bins)
        self.mmt = momentum
        self.acc = [0.0] * bins

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[float, torch.Tensor]:
        g = (torch.sigmoid(pred) - target).abs()
        tot = pred.numel()
        weights = torch.zeros_like(pred)
        n = 0
        for i in range(len(self.edges) - 1):
            inds = (g >= self.edges[i]) & (g < self.edges[i + 1])
            num = int(inds.sum())
            if num > 0:
                if self.mmt > 0:
                    self.acc[i] = self.mmt * self.acc[i] + (1 - self.mmt) * num
                    weights[inds] = tot / self.acc[i]
                else:
                    weights[inds] = tot / num
                n += 1
        if n > 0:
            weights = weights / n
        bce = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
        return float((weights * bce).sum() / tot), weights


@pytest.mark.parametrize("inter", ["none", "b2"])
def test_one_class_equals_ghmc_per_batch(inter):
    """All samples in class 0 of a 2-way softmax == binary GHM-C on x = z0 - z1 with target 1 (momentum 0)."""
    ref = _RefGHMC(bins=10, momentum=0.0)
    loss = HarmonizedLoss(num_classes=2, bins_rule="constant", num_bins=10, momentum=0.0, inter=inter)
    for logits, labels in _batches(2, 4, 64, seed=0, labels_from=[0]):
        expected, _ = ref(logits[:, 0] - logits[:, 1], torch.ones(len(labels)))
        assert loss(logits, labels).item() == pytest.approx(expected, rel=1e-5)


def test_one_class_equals_ghmc_with_ema_up_to_batch_normaliser():
    """With EMA (momentum 0.75) the per-sample weights are GHM-C's; the loss divides by sum(beta) instead of N."""
    ref = _RefGHMC(bins=10, momentum=0.75)
    loss = HarmonizedLoss(num_classes=2, bins_rule="constant", num_bins=10, momentum=0.75, inter="none")
    for logits, labels in _batches(2, 5, 48, seed=1, labels_from=[0]):
        expected, w_ref = ref(logits[:, 0] - logits[:, 1], torch.ones(len(labels)))
        got = loss(logits, labels).item()
        assert got == pytest.approx(expected * len(labels) / float(w_ref.sum()), rel=1e-5)


def test_single_bin_reduces_to_class_reweighting_even_with_ema():
    counts = [50, 10, 2]
    n_total = sum(counts)
    w = [n_total / (3 * n) for n in counts]  # kappa = 1: w_c = N / (C n_c) so that sum w_c n_c = N
    loss = build_loss("harmonized", class_counts=counts, bins_rule="constant", num_bins=1, momentum=0.75, inter="b1")
    for logits, labels in _batches(3, 4, 32, seed=2):
        ce = F.cross_entropy(logits, labels, reduction="none")
        wy = torch.tensor([w[int(c)] for c in labels])
        expected = float((wy * ce).sum() / wy.sum())
        assert loss(logits, labels).item() == pytest.approx(expected, rel=1e-5)


def test_b1_weights_formulas():
    counts = [40, 10, 5]
    n = sum(counts)
    # power, kappa = 0.5: w_c = N n_c^{-1/2} / sum_j n_j^{1/2}
    expected = [n * c**-0.5 / sum(x**0.5 for x in counts) for c in counts]
    assert inter_class_weights_b1(counts, kappa=0.5).tolist() == pytest.approx(expected, rel=1e-6)
    # effective number: w_c proportional to (1-b)/(1-b^n), scaled so sum w_c n_c = N
    b = 0.99
    raw = [(1 - b) / (1 - b**c) for c in counts]
    scale = n / sum(r * c for r, c in zip(raw, counts))
    got = inter_class_weights_b1(counts, weighting="effective_number", beta=b)
    assert got.tolist() == pytest.approx([r * scale for r in raw], rel=1e-6)


class _RefPerClassGHM:
    """GHM inside each class with its own bin count M_c: beta_i = n_hat_c / (R_{c,bin} * m_c), EMA as GHM-C."""

    def __init__(self, bins: list[int], momentum: float) -> None:
        self.bins = bins
        self.mmt = momentum
        self.acc = [[0.0] * m for m in bins]

    def weights(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(logits, dim=1)
        g = 1 - p[torch.arange(len(labels)), labels]
        beta = torch.zeros(len(labels))
        for c in sorted(set(labels.tolist())):
            in_c = labels == c
            edges = _edges(self.bins[c])
            members = []
            for j in range(self.bins[c]):
                inds = in_c & (g >= edges[j]) & (g < edges[j + 1])
                num = int(inds.sum())
                if num > 0:
                    self.acc[c][j] = self.mmt * self.acc[c][j] + (1 - self.mmt) * num if self.mmt > 0 else num
                    members.append((j, inds))
            n_hat = sum(self.acc[c]) if self.mmt > 0 else int(in_c.sum())
            for j, inds in members:
                beta[inds] = n_hat / (self.acc[c][j] * len(members))
        return beta


@pytest.mark.parametrize("momentum", [0.0, 0.6])
@pytest.mark.parametrize("inter", ["none", "b1_equal_counts"])
def test_unit_class_weights_equal_per_class_ghm(momentum, inter):
    bins = [6, 3, 1, 4]
    kwargs = dict(bins_per_class=bins, momentum=momentum)
    if inter == "none":
        loss = HarmonizedLoss(num_classes=4, inter="none", **kwargs)
    else:  # equal class sizes make every b1 weight exactly 1
        loss = HarmonizedLoss(class_counts=[7, 7, 7, 7], inter="b1", kappa=1.0, **kwargs)
    ref = _RefPerClassGHM(bins, momentum)
    for logits, labels in _batches(4, 4, 40, seed=3):
        beta = ref.weights(logits, labels)
        ce = F.cross_entropy(logits, labels, reduction="none")
        expected = float((beta * ce).sum() / beta.sum())
        assert loss(logits, labels).item() == pytest.approx(expected, rel=1e-5)


def test_intra_weights_keep_class_totals_per_batch():
    loss = HarmonizedLoss(num_classes=3, bins_rule="constant", num_bins=5, momentum=0.0, inter="none")
    logits, labels = _batches(3, 1, 60, seed=4)[0]
    _, beta = loss.compute_weights(logits, labels)
    for c in range(3):
        assert float(beta[labels == c].sum()) == pytest.approx(float((labels == c).sum()), rel=1e-5)


def test_b2_ghm_over_classes_matches_loop_with_ema():
    """b2: class-mean gradient norms (EMA, first value as is) histogrammed over classes; w_c = C_seen/(R m_ne)."""
    mu, inter_bins, c_num = 0.5, 4, 5
    loss = HarmonizedLoss(num_classes=c_num, bins_rule="constant", num_bins=1, momentum=0.0, inter="b2",
                          inter_bins=inter_bins, inter_momentum=mu)
    gbar: dict[int, float] = {}
    batches = _batches(c_num, 3, 12, seed=5, labels_from=[0, 1, 2]) + _batches(c_num, 2, 12, seed=6)
    for logits, labels in batches:
        p = torch.softmax(logits, dim=1)
        g = 1 - p[torch.arange(len(labels)), labels]
        for c in sorted(set(labels.tolist())):
            m = float(g[labels == c].mean())
            gbar[c] = mu * gbar[c] + (1 - mu) * m if c in gbar else m
        edges = _edges(inter_bins)
        bin_of = {c: next(j for j in range(inter_bins) if edges[j] <= v < edges[j + 1]) for c, v in gbar.items()}
        r = [sum(1 for b in bin_of.values() if b == j) for j in range(inter_bins)]
        m_ne = sum(1 for x in r if x > 0)
        w = {c: len(gbar) / (r[bin_of[c]] * m_ne) for c in gbar}
        wy = torch.tensor([w[int(c)] for c in labels])
        class_w, _ = loss.compute_weights(logits, labels, update=False)
        assert class_w.tolist() == pytest.approx(wy.tolist(), rel=1e-5)
        ce = F.cross_entropy(logits, labels, reduction="none")
        assert loss(logits, labels).item() == pytest.approx(float((wy * ce).sum() / wy.sum()), rel=1e-5)


def test_gradient_norm_on_an_edge_goes_to_the_upper_bin():
    """Bins are [k/M, (k+1)/M): g = 0.5 exactly (logits 0, 0) is in bin 1 of 2, g ~ 0.25 in bin 0."""
    loss = HarmonizedLoss(num_classes=2, bins_rule="constant", num_bins=2, momentum=0.0, inter="none")
    logits = torch.tensor([[0.0, 0.0]] + [[math.log(3.0), 0.0]] * 3)
    _, beta = loss.compute_weights(logits, torch.zeros(4, dtype=torch.long))
    # n = 4 samples, 2 non-empty bins: beta = 4 / (1 * 2) for the lone edge sample, 4 / (3 * 2) for the others
    assert beta.tolist() == pytest.approx([2.0, 2 / 3, 2 / 3, 2 / 3], rel=1e-6)


def test_bins_rules_by_hand():
    counts = [100, 25, 4, 1]
    assert per_class_bins(counts, 10, "power", gamma=0.5).tolist() == [10, 5, 2, 1]
    expected_log = [min(10, max(1, math.floor(10 * math.log(1 + n) / math.log(101) + 0.5))) for n in counts]
    assert per_class_bins(counts, 10, "log").tolist() == expected_log
    assert per_class_bins(None, 7, "constant", num_classes=3).tolist() == [7, 7, 7]
    loss = HarmonizedLoss(class_counts=counts, num_bins=10, bins_rule="power", bins_gamma=0.5)
    assert loss.bins_per_class.tolist() == [10, 5, 2, 1]


def test_state_eval_mode_resume_and_start_epoch():
    kwargs = dict(num_classes=3, bins_rule="constant", num_bins=6, momentum=0.75, inter="b2")
    batches = _batches(3, 4, 24, seed=7)
    a = HarmonizedLoss(**kwargs)
    for logits, labels in batches[:2]:
        a(logits, labels)
    snapshot = {k: v.clone() for k, v in a.state_dict().items()}
    a.eval()
    a(*batches[2])  # evaluation must not move the statistics
    assert all(torch.equal(snapshot[k], v) for k, v in a.state_dict().items())
    a.train()
    b = HarmonizedLoss(**kwargs)
    b.load_state_dict(snapshot)
    assert a(*batches[3]).item() == pytest.approx(b(*batches[3]).item(), rel=1e-6)
    warm = HarmonizedLoss(**kwargs, start_epoch=2)
    logits, labels = batches[0]
    assert warm(logits, labels).item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert warm.class_seen.any()  # statistics are still gathered during the warm-up
    warm.set_epoch(2)
    assert warm(logits, labels).item() != pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    warm.reset_state()
    assert not warm.class_seen.any() and not warm.bin_counts.any()


def test_bad_input_raises():
    with pytest.raises(ValueError, match="class_counts"):
        HarmonizedLoss(num_classes=3, bins_rule="power")
    with pytest.raises(ValueError, match="class_counts"):
        HarmonizedLoss(num_classes=3, bins_rule="constant", inter="b1")
    with pytest.raises(ValueError, match="momentum"):
        HarmonizedLoss(num_classes=3, bins_rule="constant", momentum=1.0)
    with pytest.raises(ValueError, match="inter"):
        HarmonizedLoss(num_classes=3, bins_rule="constant", inter="b3")
    with pytest.raises(ValueError, match="bins_rule"):
        HarmonizedLoss(class_counts=[3, 2], bins_rule="sqrt")
    with pytest.raises(ValueError, match="zero"):
        HarmonizedLoss(class_counts=[3, 0], bins_rule="power")
    loss = HarmonizedLoss(num_classes=2, bins_rule="constant")
    with pytest.raises(ValueError, match="NaN"):
        loss(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))
