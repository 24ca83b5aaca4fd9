"""Tests for DLSA (pih2t_hub.methods.dlsa) against computations written here from the method's equations."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.autograd.functional import jacobian

from pih2t_hub.methods.dlsa import (
    MADE,
    MAF,
    BatchNormFlow,
    DLSAConfig,
    DLSAHead,
    DualHead,
    FlowGMM,
    cluster_prior,
    fit_dlsa,
    install_head,
    likelihood_threshold,
    split_by_likelihood,
    train_flowgmm,
)
from pih2t_hub.methods.dlsa.flowgmm import (
    BalanceLoss,
    FlowDiverged,
    FlowObjective,
    FlowSelection,
    ClassPairSampler,
    class_pair_weights,
    cluster_purity_score,
    likelihood_loss,
    purity_loss,
)
from pih2t_hub.methods.dlsa.pipeline import _balanced_softmax_ce


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomise_flow(flow: MAF, seed: int = 1) -> MAF:
    """Give BN layers non-trivial running stats, log γ and β, so that the checks cannot pass by identity."""
    g = _gen(seed)
    flow.train()
    with torch.no_grad():
        for _ in range(3):
            flow(torch.randn(32, flow.dim, generator=g, dtype=torch.float64) * 2 + 1)
        for layer in flow.layers:
            if isinstance(layer, BatchNormFlow):
                layer.log_gamma.copy_(torch.randn(flow.dim, generator=g, dtype=torch.float64) * 0.3)
                layer.beta.copy_(torch.randn(flow.dim, generator=g, dtype=torch.float64) * 0.3)
    return flow.eval()


# ---------------------------------------------------------------------------------------------------------------
# flow


def test_made_is_autoregressive_in_its_degree_order():
    d = 6
    for made in (MADE(d, 9, 1, generator=_gen()), MADE(d, 9, 1, torch.arange(d).flip(0), generator=_gen())):
        made = made.double()
        x = torch.randn(d, generator=_gen(2), dtype=torch.float64)
        jac = jacobian(lambda v: made(v[None])[0][0], x)
        deg = made.input_degrees
        upper = deg[None, :] > deg[:, None]  # u_i must not depend on x_j with deg_j > deg_i (nor on itself via m)
        assert torch.all(jac[upper] == 0)
        lower = deg[None, :] < deg[:, None]
        assert (jac[lower].abs() > 0).any()  # it does depend on earlier inputs
        log_a = -made(x[None])[1][0]
        torch.testing.assert_close(torch.diagonal(jac), torch.exp(-log_a))


def test_batchnorm_flow_train_mode_formula_and_running_stats():
    bn = BatchNormFlow(3).double()
    with torch.no_grad():
        bn.log_gamma.copy_(torch.tensor([0.1, -0.2, 0.3]))
        bn.beta.copy_(torch.tensor([1.0, 0.0, -1.0]))
    x = torch.tensor([[1.0, 2.0, 3.0], [2.0, 0.0, 3.5], [4.0, 1.0, 2.0], [0.0, 5.0, 1.0]], dtype=torch.float64)
    y, log_det = bn.train()(x)
    n = x.shape[0]
    mean = x.sum(0) / n
    var = ((x - mean) ** 2).sum(0) / (n - 1)  # unbiased
    gamma = torch.exp(torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))
    torch.testing.assert_close(y, gamma * (x - mean) / torch.sqrt(var + 1e-5) + torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(log_det[0], torch.log(gamma) - 0.5 * torch.log(var + 1e-5))
    torch.testing.assert_close(bn.running_mean, 0.1 * mean)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * var)


@pytest.mark.parametrize("batch_norm", [True, False])
def test_maf_logdet_matches_autograd_jacobian(batch_norm):
    d = 5
    flow = _randomise_flow(MAF(d, n_blocks=2, hidden_size=7, n_hidden=1, batch_norm=batch_norm, generator=_gen()).double())
    xs = torch.randn(4, d, generator=_gen(3), dtype=torch.float64)
    _, log_det = flow(xs)
    for i in range(xs.shape[0]):
        jac = jacobian(lambda v: flow(v[None])[0][0], xs[i])
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign != 0
        torch.testing.assert_close(log_det[i], logabs, rtol=1e-9, atol=1e-9)


def test_maf_is_invertible():
    flow = _randomise_flow(MAF(6, n_blocks=2, hidden_size=10, generator=_gen()).double())
    x = torch.randn(20, 6, generator=_gen(4), dtype=torch.float64)
    u, _ = flow(x)
    assert not torch.allclose(u, x)
    torch.testing.assert_close(flow.inverse(u), x, rtol=1e-8, atol=1e-8)


def test_flow_rejects_one_dimensional_features():
    with pytest.raises(ValueError, match="at least 2"):
        MAF(1)


# ---------------------------------------------------------------------------------------------------------------
# FlowGMM


def test_flowgmm_log_likelihood_is_logsumexp_of_gaussians_plus_logdet():
    d, k = 3, 4
    model = FlowGMM(d, k, hidden_size=5, mean_std=0.5, generator=_gen()).double()
    _randomise_flow(model.flow)
    xs = torch.randn(6, d, generator=_gen(5), dtype=torch.float64)
    with torch.no_grad():
        comp, llh = model(xs)
    for i in range(xs.shape[0]):
        u = model.flow(xs[i : i + 1])[0][0]
        logdet = torch.linalg.slogdet(jacobian(lambda v: model.flow(v[None])[0][0], xs[i]))[1]
        gauss = torch.stack(
            [
                torch.distributions.MultivariateNormal(model.means[j], torch.eye(d, dtype=torch.float64)).log_prob(u)
                for j in range(k)
            ]
        )
        torch.testing.assert_close(comp[i], gauss + logdet)
        expected = math.log(sum(math.exp(float(v)) for v in (gauss + logdet).detach())) - math.log(k)
        assert abs(float(llh[i]) - expected) < 1e-9
        nearest = int(torch.argmin(((u[None, :] - model.means) ** 2).sum(1)))
        assert int(comp[i].argmax()) == nearest
        post = torch.exp(gauss - gauss.max()) / torch.exp(gauss - gauss.max()).sum()
        torch.testing.assert_close(model.posterior(xs[i : i + 1])[0], post)


def test_flowgmm_means_are_fixed_buffer_with_requested_std():
    model = FlowGMM(16, 400, mean_std=0.05, generator=_gen())
    assert "means" in dict(model.named_buffers())
    assert all(p is not model.means for p in model.parameters())
    assert abs(float(model.means.std()) - 0.05) < 0.0025
    assert abs(float(model.means.mean())) < 0.005


# ---------------------------------------------------------------------------------------------------------------
# sampler and losses


def test_class_pair_weights_hand_computed():
    w = class_pair_weights(torch.tensor([6, 3, 1, 0]), q=2.0)
    torch.testing.assert_close(w, torch.tensor([1 / 41, 4 / 41, 36 / 41, 0.0], dtype=torch.float64))


def test_pair_sampler_draws_distinct_uniform_classes_and_carries_weights():
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    sampler = ClassPairSampler(labels, q=2.0)
    pos, neg, w = sampler.sample(30000, _gen())
    pc, nc = labels[pos], labels[neg]
    assert torch.all(pc != nc)
    for freq in (torch.bincount(pc, minlength=3) / 30000, torch.bincount(nc, minlength=3) / 30000):
        assert torch.all((freq - 1 / 3).abs() < 0.02)
    within = torch.bincount(pos[pc == 0], minlength=6)[:6].double()
    assert torch.all((within / within.sum() - 1 / 6).abs() < 0.02)
    expected_w = torch.tensor([1 / 41, 4 / 41, 36 / 41], dtype=torch.float64)[pc]
    torch.testing.assert_close(w, expected_w)


def test_pair_sampler_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        ClassPairSampler(torch.zeros(10, dtype=torch.long))


def test_likelihood_and_purity_losses_hand_computed():
    llh = torch.tensor([-1.0, -3.0])
    assert abs(float(likelihood_loss(llh, torch.tensor([0.25, 0.75]))) - (0.25 * 1 + 0.75 * 3) / 2) < 1e-6

    comp_pos = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]], requires_grad=True)
    comp_neg = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]], requires_grad=True)
    expected = 0.0
    for i in range(2):
        zp = [math.exp(v) for v in comp_pos[i].tolist()]
        zn = [math.exp(v) for v in comp_neg[i].tolist()]
        expected += sum(zp[k] / sum(zp) * math.log(zn[k] / sum(zn)) for k in range(3))
    loss = purity_loss(comp_neg, comp_pos, freeze=True)
    assert abs(float(loss.detach()) - expected / 2) < 1e-6
    loss.backward()
    assert comp_pos.grad is None and comp_neg.grad is not None


def test_balance_loss_bias_corrected_ema_two_steps():
    k, m = 3, 0.7
    loss_fn = BalanceLoss(k, m)
    a = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    b = torch.tensor([[0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])

    def batch_mean_posterior(t):
        rows = [[math.exp(v) / sum(math.exp(u) for u in r) for v in r] for r in t.tolist()]
        return [sum(r[j] for r in rows) / len(rows) + 1e-7 for j in range(k)]

    def kl_uniform(p):
        return sum(v * math.log(v) for v in p) + math.log(k)

    p1 = batch_mean_posterior(a)
    assert abs(float(loss_fn(a)) - kl_uniform(p1)) < 1e-6  # step 1: (1-m)π / (1-m) = π
    p2 = batch_mean_posterior(b)
    ema2 = [m * (1 - m) * x + (1 - m) * y for x, y in zip(p1, p2)]
    assert abs(float(loss_fn(b)) - kl_uniform([v / (1 - m**2) for v in ema2])) < 1e-6
    assert abs(float(BalanceLoss(k, m)(torch.zeros(4, k)))) < 1e-5  # uniform posterior: no penalty


def test_cluster_purity_score_hand_computed():
    clusters = torch.tensor([0, 0, 0, 1, 1, 2])
    labels = torch.tensor([1, 1, 2, 0, 0, 1])
    # cluster 0: size 3, purity 2/3; cluster 1: size 2, purity 1; cluster 2: size 1; cluster 3: empty
    assert cluster_purity_score(clusters, labels, 4, min_purity=0.6, min_size=1) == (2, 3)
    assert cluster_purity_score(clusters, labels, 4, min_purity=0.7, min_size=1) == (1, 3)
    assert cluster_purity_score(clusters, labels, 4, min_purity=0.6, min_size=2) == (1, 3)


def test_balanced_softmax_hand_computed():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    target = torch.tensor([0, 2])
    counts = torch.tensor([10.0, 5.0, 1.0])
    expected = 0.0
    for z, y in zip(logits.tolist(), target.tolist()):
        num = counts[y].item() * math.exp(z[y])
        den = sum(counts[j].item() * math.exp(z[j]) for j in range(3))
        expected += -math.log(num / den)
    assert abs(float(_balanced_softmax_ce(logits, target, counts)) - expected / 2) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# filtering, prior, classifier heads


@pytest.mark.parametrize("n, rho", [(100, 0.3), (37, 0.3), (50, 0.5), (10, 0.75)])
def test_likelihood_threshold_selects_top_rho_fraction(n, rho):
    llh = torch.randperm(n, generator=_gen(n)).double() * 0.37 - 5.0
    tau = likelihood_threshold(llh, rho)
    selected = llh >= tau
    assert int(selected.sum()) == n - math.floor(n * (1 - rho))
    assert float(llh[selected].min()) > float(llh[~selected].max())


def test_split_by_likelihood_only_uses_remaining_samples():
    llh = torch.randn(80, generator=_gen(1), dtype=torch.float64)
    remaining = torch.zeros(80, dtype=torch.bool)
    remaining[torch.randperm(80, generator=_gen(2))[:57]] = True
    take, _ = split_by_likelihood(llh, remaining, 0.3)
    assert int(take.sum()) == 57 - math.floor(57 * 0.7) == 18
    assert not (take & ~remaining).any()
    assert float(llh[take].min()) > float(llh[remaining & ~take].max())


def test_likelihood_threshold_rejects_bad_rho():
    for rho in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="rho"):
            likelihood_threshold(torch.arange(5.0), rho)


def test_cluster_prior_is_normalised_class_histogram():
    clusters = torch.tensor([0, 0, 1, 1, 1, 3])
    labels = torch.tensor([2, 0, 1, 1, 2, 0])
    expected = torch.tensor(
        [[0.5, 0.0, 0.5], [0.0, 2 / 3, 1 / 3], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(cluster_prior(clusters, labels, 4, 3), expected)


def test_dual_head_linear_and_cosine_formulas():
    x = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    prior = torch.tensor([[0.2, 0.8, 0.0], [1.0, 0.0, 0.0]])
    z = torch.cat([x, prior], 1)
    head = DualHead(2, 5, 3, "linear", generator=_gen())
    expected = x @ head.weight_x.T + head.bias_x + z @ head.weight_z.T + head.bias_z
    torch.testing.assert_close(head(x, z), expected)

    cos = DualHead(2, 5, 3, "cosine", scale=16.0, generator=_gen())

    def cos_term(v, w):
        out = torch.zeros(v.shape[0], w.shape[0])
        for i in range(v.shape[0]):
            nv = math.sqrt(sum(t * t for t in v[i].tolist()))
            for c in range(w.shape[0]):
                nw = math.sqrt(sum(t * t for t in w[c].tolist()))
                out[i, c] = 16.0 * (nv / (1 + nv)) * float(v[i] @ w[c]) / (nv * nw)
        return out

    torch.testing.assert_close(cos(x, z), cos_term(x, cos.weight_x.detach()) + cos_term(z, cos.weight_z.detach()))


# ---------------------------------------------------------------------------------------------------------------
# flow training and the pipeline


def _mixture(counts, means, generator):
    xs, ys = [], []
    for c, n in enumerate(counts):
        xs.append(means[c] + torch.randn(n, means.shape[1], generator=generator))
        ys.append(torch.full((n,), c, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


@pytest.fixture(scope="module")
def lt_data():
    g = _gen(1)
    means = torch.randn(5, 8, generator=g) * 4
    train = _mixture([200, 100, 50, 25, 12], means, g)
    val = _mixture([10] * 5, means, g)
    test = _mixture([40] * 5, means, g)
    return train, val, test


def _small_config(**kw) -> DLSAConfig:
    base = dict(
        num_clusters=6, max_depth=2, flow_epochs=5, flow_batch_size=64, flow_lr=0.05,
        cls_epochs=50, cacls_lr=0.1, regcls_lr=0.1,
    )
    return DLSAConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def fitted(lt_data):
    (tx, ty), (vx, vy), _ = lt_data
    return fit_dlsa(tx, ty, vx, vy, _small_config(), seed=0)


def test_train_flowgmm_keeps_best_qualifying_epoch(lt_data):
    (tx, ty), (vx, vy), _ = lt_data
    model = FlowGMM(8, 6, generator=_gen())
    res = train_flowgmm(model, tx, ty, FlowObjective(epochs=4, batch_size=64, lr=0.05),
                        FlowSelection(vx, vy, min_cluster_size=1, max_cluster_size=1000), generator=_gen(1))
    assert res.best_epoch == 1 + max(range(4), key=lambda e: (res.epoch_scores[e], -e))
    # the reloaded weights reproduce the best epoch's score (purity recomputed here by hand)
    model.eval()
    with torch.no_grad():
        clusters = model.component_log_prob(vx).argmax(1)
    score = 0
    for k in range(6):
        members = vy[clusters == k]
        if members.numel() > 1 and torch.bincount(members).max().item() / members.numel() > 0.7:
            score += 1
    assert score == res.best_score == res.epoch_scores[res.best_epoch - 1]
    assert torch.equal(model.means, FlowGMM(8, 6, generator=_gen()).means)  # means never trained


def test_train_flowgmm_warns_when_no_epoch_qualifies(lt_data, caplog):
    (tx, ty), _, _ = lt_data
    with caplog.at_level(logging.WARNING):
        res = train_flowgmm(FlowGMM(8, 6, generator=_gen()), tx, ty, FlowObjective(epochs=1, batch_size=64, lr=0.05),
                            FlowSelection(tx, ty, max_cluster_size=0), generator=_gen(1))
    assert res.best_epoch is None
    assert "keeping the last epoch" in caplog.text


def test_end_to_end_beats_chance_by_wide_margin(fitted, lt_data):
    _, _, (sx, sy) = lt_data
    acc = float((fitted.predict(sx) == sy).double().mean())
    assert acc > 0.6, acc  # chance is 0.2


def test_filter_sizes_per_depth(fitted, lt_data):
    (tx, _), _, _ = lt_data
    n1 = tx.shape[0]
    n2 = n1 - (n1 - math.floor(n1 * 0.7))
    d1, d2, reg = fitted.history
    assert d1["n_train_remaining"] == n1 and d1["n_train_filtered"] == n1 - math.floor(n1 * 0.7)
    assert d2["n_train_remaining"] == n2 and d2["n_train_filtered"] == n2 - math.floor(n2 * 0.7)
    assert reg["n_train"] == n2 - d2["n_train_filtered"]
    assert sum(d1["filtered_class_counts"]) + sum(d1["remaining_class_counts"]) == n1


def test_stored_prior_is_histogram_of_all_train_samples(fitted, lt_data):
    (tx, ty), _, _ = lt_data
    for d in range(2):
        with torch.no_grad():
            clusters = fitted.flows[d].component_log_prob(tx).argmax(1)
        for k in range(6):
            members = ty[clusters == k]
            expected = torch.zeros(5)
            for c in members.tolist():
                expected[c] += 1.0 / members.numel()
            torch.testing.assert_close(fitted.priors[d, k], expected)


def test_routing_gives_every_sample_exactly_one_classifier(fitted, lt_data):
    _, _, (sx, _) = lt_data
    routes, logits = fitted.route_and_logits(sx)
    pred = fitted.predict(sx)
    assert routes.shape == pred.shape == (sx.shape[0],)
    assert set(routes.tolist()) <= {0, 1, 2} and fitted.regular_route == 2
    assert int(torch.bincount(routes, minlength=3).sum()) == sx.shape[0]
    assert ((pred >= 0) & (pred < 5)).all()
    # recompute the route of every sample from the thresholds, and its prediction from the claiming classifier
    with torch.no_grad():
        llh = [f.log_prob(sx) for f in fitted.flows]
        clus = [f.component_log_prob(sx).argmax(1) for f in fitted.flows]
        for i in range(sx.shape[0]):
            x = sx[i : i + 1]
            if llh[0][i] >= fitted.thresholds[0]:
                d = 0
            elif llh[1][i] >= fitted.thresholds[1]:
                d = 1
            else:
                d = 2
            assert int(routes[i]) == d
            if d < 2:
                out = fitted.cacls[d](x, torch.cat([x, fitted.priors[d][clus[d][i]][None]], 1))
            else:
                out = fitted.regcls(x, x)
            assert int(out.argmax()) == int(pred[i])


def test_fit_is_deterministic_with_a_seed(fitted, lt_data):
    (tx, ty), (vx, vy), (sx, _) = lt_data
    again = fit_dlsa(tx, ty, vx, vy, _small_config(), seed=0)
    for (name, a), (_, b) in zip(fitted.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    other = fit_dlsa(tx, ty, vx, vy, _small_config(max_depth=1, cls_epochs=5), seed=1)
    assert not torch.equal(other.flows[0].means, fitted.flows[0].means)


def test_fit_without_validation_split_runs(lt_data):
    (tx, ty), _, (sx, _) = lt_data
    model = fit_dlsa(tx, ty, config=_small_config(max_depth=1, flow_epochs=2, cls_epochs=5), seed=0)
    assert model.history[0]["flow_selection_split"] == "train"
    assert model.predict(sx).shape == (sx.shape[0],)


# ---------------------------------------------------------------------------------------------------------------
# bad input


def test_config_rejects_bad_values():
    for kw in ({"rho": 0.0}, {"rho": 1.0}, {"rho": 1.2}, {"rho": -0.3}):
        with pytest.raises(ValueError, match="rho"):
            DLSAConfig(**kw)
    with pytest.raises(ValueError, match="max_depth"):
        DLSAConfig(max_depth=0)
    with pytest.raises(ValueError, match="select_flow_on"):
        DLSAConfig(select_flow_on="test")
    with pytest.raises(ValueError, match="unknown DLSA preset"):
        DLSAConfig.from_preset("cifar")
    assert DLSAConfig.from_preset("imagenet_lt_paco_r50_bsm").max_depth == 3


def test_fit_rejects_bad_input(lt_data, fitted):
    (tx, ty), (vx, vy), (sx, _) = lt_data
    cfg = _small_config(flow_epochs=1, cls_epochs=1)
    with pytest.raises(ValueError, match="clusters"):
        fit_dlsa(tx[:5], ty[:5], config=cfg)
    with pytest.raises(ValueError, match="depth 3"):
        fit_dlsa(tx[:12], ty[:12], config=_small_config(max_depth=3))
    bad = tx.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fit_dlsa(bad, ty, config=cfg)
    with pytest.raises(ValueError, match="NaN"):
        fit_dlsa(tx, ty, bad[:50], vy, config=cfg)
    with pytest.raises(ValueError, match="feature dim"):
        fit_dlsa(tx, ty, torch.randn(50, 9), vy, config=cfg)
    with pytest.raises(ValueError, match="shape"):
        fit_dlsa(tx, ty[:-1], config=cfg)
    with pytest.raises(TypeError, match="integer"):
        fit_dlsa(tx, ty.float(), config=cfg)
    with pytest.raises(ValueError, match="both"):
        fit_dlsa(tx, ty, vx, None, config=cfg)
    with pytest.raises(ValueError, match="feature dim"):
        fitted.predict(torch.randn(4, 9))
    with pytest.raises(ValueError, match="NaN"):
        fitted.predict(bad[:4])


# ---------------------------------------------------------------------------------------------------------------
# stable defaults


def _relu6_features(protos, counts, generator):
    """Class clusters through ReLU6, like pooled EfficientNet-Lite features: many exact zeros, a few saturated."""
    xs = [(protos[c] + 0.8 * torch.randn(n, protos.shape[1], generator=generator)).clamp(0, 6)
          for c, n in enumerate(counts)]
    ys = [torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)]
    return torch.cat(xs), torch.cat(ys)


@pytest.fixture(scope="module")
def relu6_data():
    g = _gen(0)
    protos = torch.randn(5, 256, generator=g) - 0.5
    # 590 training samples: just above the default K = 500, like the default demo run (755)
    return _relu6_features(protos, [300, 150, 80, 40, 20], g), _relu6_features(protos, [20] * 5, g)


def test_released_flow_lr_diverges_on_relu6_features(relu6_data):
    """The features of the next test are hard: the released optimiser (lr 0.2, no clipping) blows up on them."""
    (tx, ty), (vx, vy) = relu6_data
    cfg = DLSAConfig.from_preset("imagenet_lt_ce_r50_bsm", flow_nan_restarts=0, flow_epochs=10, cls_epochs=1)
    assert (cfg.flow_lr, cfg.flow_grad_clip) == (0.2, None)
    with pytest.raises(FlowDiverged, match="after 0 restart"):
        fit_dlsa(tx, ty, vx, vy, cfg, seed=0)


def test_default_flow_optimiser_fits_relu6_features_without_nan(relu6_data):
    """Every flow setting is the default (K = 500, lr, clipping, width D); only the epochs are cut for time."""
    (tx, ty), (vx, vy) = relu6_data
    cfg = DLSAConfig(flow_epochs=10, cls_epochs=10, cacls_lr=0.1, regcls_lr=0.1)
    model = fit_dlsa(tx, ty, vx, vy, cfg, seed=0)
    depth = model.history[0]
    assert depth["flow_restarts"] == [] and depth["flow_lr"] == DLSAConfig().flow_lr == 0.02
    assert all(torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point())
    assert math.isfinite(depth["tau"]) and depth["n_train_filtered"] == len(tx) - math.floor(len(tx) * 0.7)
    assert torch.isfinite(model.flows[0].log_prob(vx)).all()
    acc = float((model.predict(vx) == vy).double().mean())
    assert acc > 0.5, acc  # 5 balanced classes: chance is 0.2


def test_flow_restarts_with_halved_lr_after_divergence(lt_data, caplog):
    (tx, ty), (vx, vy), _ = lt_data
    model = FlowGMM(8, 6, generator=_gen())
    initial = copy.deepcopy(model.state_dict())
    objective = FlowObjective(epochs=2, batch_size=64, lr=20.0)  # diverges in the first epoch on these features
    with caplog.at_level(logging.WARNING):
        res = train_flowgmm(model, tx, ty, objective, FlowSelection(vx, vy), nan_restarts=10, generator=_gen(1))
    k = len(res.restarts)
    assert 1 <= k <= 10
    assert [r["lr"] for r in res.restarts] == [20.0 / 2**i for i in range(k)]
    assert res.lr == 20.0 / 2**k and len(res.epoch_scores) == 2
    assert caplog.text.count("restarting the flow from its initial weights") == k
    assert all(torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point())
    # without restarts the same run is an error that names the cause and the way out
    again = FlowGMM(8, 6, generator=_gen())
    again.load_state_dict(initial)
    with pytest.raises(FlowDiverged, match=r"at epoch \d+ \(flow lr 20, after 0 restart.*lower flow_lr"):
        train_flowgmm(again, tx, ty, objective, FlowSelection(vx, vy), nan_restarts=0, generator=_gen(1))


def test_gradient_clipping_bounds_every_flow_step(lt_data):
    """With clipping at c and plain SGD, no step moves the parameters further than lr · c (in global L2 norm)."""
    (tx, ty), (vx, vy), _ = lt_data
    model = FlowGMM(8, 6, generator=_gen())
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    lr, clip = 0.5, 0.01
    train_flowgmm(model, tx, ty, FlowObjective(epochs=1, batch_size=len(tx), lr=lr, grad_clip=clip),
                  FlowSelection(vx, vy, max_cluster_size=10**6), generator=_gen(1))  # one step
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert 0 < float((after - before).norm()) <= lr * clip * (1 + 1e-4)


# ---------------------------------------------------------------------------------------------------------------
# export: the fitted DLSA as the head of a saved PIH2TForImageClassification


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """DLSA fitted on features of the tiny backbone's width, installed in a model and saved."""
    from pih2t_hub import create_model

    torch.manual_seed(0)
    model = create_model("test_resnet", num_labels=5, class_counts=[120, 60, 30, 15, 8]).eval()
    dim = model.config.num_features
    g = _gen(3)
    means = torch.randn(5, dim, generator=g) * 0.5
    train, val, test = (_mixture(c, means, g) for c in ([120, 60, 30, 15, 8], [8] * 5, [30] * 5))
    dl = fit_dlsa(*train, *val, _small_config(flow_epochs=3, cls_epochs=20), seed=0)
    install_head(model, dl)
    path = tmp_path_factory.mktemp("dlsa_model")
    model.save_pretrained(path)
    return dl, model, path, test[0]


def test_to_head_computes_the_fitted_model(exported):
    dl, _, _, sx = exported
    head = dl.to_head()
    assert type(head) is DLSAHead
    config = json.loads(json.dumps(head.head_config()))  # plain JSON
    rebuilt = DLSAHead(dl.in_features, dl.num_classes, **config)
    rebuilt.load_state_dict(head.state_dict())
    routes, logits = dl.route_and_logits(sx)
    for h in (head, rebuilt.eval()):
        with torch.no_grad():
            r, out = h.route_and_logits(sx)
        assert torch.equal(r, routes) and torch.equal(out, logits)
    assert len(set(routes.tolist())) >= 2  # more than one classifier is exercised


def test_head_keeps_the_fitted_routing_in_training_mode(exported):
    dl, _, _, sx = exported
    head = dl.to_head()
    stats = [b.clone() for n, b in head.named_buffers() if "running" in n]
    head.train()
    assert not any(f.training for f in head.flows.modules())
    with torch.no_grad():
        torch.testing.assert_close(head(sx), dl.logits(sx), atol=0, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(stats, (b for n, b in head.named_buffers() if "running" in n)))


def test_saved_dlsa_model_reloads_with_auto_class(exported):
    from transformers import AutoModelForImageClassification

    dl, model, path, sx = exported
    files = set(os.listdir(path))
    assert {"model.safetensors", "config.json", "dlsa_head.py", "heads.py"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["head_type"] == "dlsa" and cfg["head_config"]["max_depth"] == 2
    loaded = AutoModelForImageClassification.from_pretrained(path).eval()
    assert type(loaded.classifier).__name__ == "DLSAHead"
    with torch.no_grad():
        routes, logits = loaded.classifier.route_and_logits(sx)
        torch.testing.assert_close(loaded.forward_head(sx), dl.logits(sx), atol=1e-5, rtol=0)
        # end to end: images -> the backbone's pooled features -> the same DLSA decision
        _, h, w = loaded.config.backbone_data_config["input_size"]
        pixels = torch.randn(6, 3, h, w, generator=_gen(5))
        pooled = loaded.pih2t(pixels).pooler_output
        torch.testing.assert_close(loaded(pixels).logits, dl.logits(pooled), atol=1e-5, rtol=0)
    assert torch.equal(routes, dl.routing(sx))


def test_saved_dlsa_model_loads_with_remote_code_without_pih2t_hub(exported, tmp_path):
    dl, _, path, sx = exported
    script = tmp_path / "load.py"
    # pih2t_hub is made unimportable, so only the code saved beside the weights can build the head
    script.write_text(
        "import sys\n"
        "sys.modules['pih2t_hub'] = None\n"
        "import torch\n"
        "from transformers import AutoModelForImageClassification as Auto\n"
        "model_dir, features, result = sys.argv[1:4]\n"
        "clf = Auto.from_pretrained(model_dir, trust_remote_code=True).eval()\n"
        "head = clf.classifier\n"
        "assert 'transformers_modules' in type(head).__module__, type(head).__module__\n"
        "feats = torch.load(features, weights_only=True)\n"
        "with torch.no_grad():\n"
        "    r, z = head.route_and_logits(feats)\n"
        "    torch.save({'routes': r, 'logits': z, 'head': clf.forward_head(feats)}, result)\n"
    )
    torch.save(sx, tmp_path / "x.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "y.pt", weights_only=True)
    routes, logits = dl.route_and_logits(sx)
    assert torch.equal(got["routes"], routes)
    torch.testing.assert_close(got["logits"], logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got["head"], logits, atol=1e-5, rtol=0)


def test_export_rejects_mismatched_models_and_configs(exported):
    from pih2t_hub import create_model
    from pih2t_hub.models.pih2t.heads import build_head

    dl, _, _, _ = exported
    with pytest.raises(ValueError, match="fitted on"):
        install_head(create_model("test_resnet", num_labels=3), dl)
    with pytest.raises(ValueError, match="head_config"):
        build_head("dlsa", dl.in_features, 5)


def test_the_method_lowers_k_to_what_a_small_training_set_allows():
    """Each FlowGMM needs at least K rows: a training set below K (one fold's training part, say) is fitted with K
    lowered to the rows the deepest flow sees (n, then ⌊n(1-ρ)⌋ per depth), and larger ones keep K unchanged."""
    from pih2t_hub.methods.dlsa.method import clusters_for
    from pih2t_hub.methods.dlsa.pipeline import DLSAConfig

    base = DLSAConfig(num_clusters=500, max_depth=1, rho=0.3)
    assert clusters_for(base, 487).num_clusters == 487
    assert clusters_for(base, 600) is base
    deep = DLSAConfig(num_clusters=500, max_depth=2, rho=0.3)
    assert clusters_for(deep, 600).num_clusters == math.floor(600 * 0.7)  # the second flow sees 420 rows
    assert clusters_for(deep, 800).num_clusters == 500  # 560 rows at depth 2: enough
