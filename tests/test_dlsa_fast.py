"""DLSA's fast path: block-sparse masked layers, one flow pass per pair batch, early stopping of the flow.

The exact optimisations are checked against the dense computation written here (``x @ (W * M).T + b``, separate
passes); the early stopping against stop epochs counted by hand on known score curves.
"""

from __future__ import annotations

import copy

import pytest
import torch

from pih2t_hub.methods.dlsa import MADE, BatchNormFlow, DLSAConfig, FlowGMM, fit_dlsa, train_flowgmm
from pih2t_hub.methods.dlsa.flowgmm import FlowObjective, FlowSelection, should_stop
from pih2t_hub.models.pih2t.dlsa_head import BlockPlan, MaskedLinear, _BlockMatmul, made_masks, sequential_degrees


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dense(x: torch.Tensor, layer: MaskedLinear) -> torch.Tensor:
    return x @ (layer.weight * layer.mask).T + layer.bias


def _made_layer_masks(dim: int, hidden: int, reversed_inputs: bool) -> list[torch.Tensor]:
    degrees = torch.arange(dim).flip(0) if reversed_inputs else None
    masks = made_masks(sequential_degrees(dim, hidden, 1, degrees))
    return masks[:-1] + [masks[-1].repeat(2, 1)]  # the output layer is tiled for (m, log a), as in MADE


@pytest.mark.parametrize("reversed_inputs", [False, True])
@pytest.mark.parametrize("blocks", [3, 4, 6])
def test_block_masked_linear_equals_dense_masked_product(reversed_inputs, blocks):
    """Forward and every gradient (input, weight, bias) equal the dense masked product, for each MADE mask."""
    dim, batch = 13, 9
    for i, mask in enumerate(_made_layer_masks(dim, dim, reversed_inputs)):  # hidden width D, the default
        layer = MaskedLinear(mask.shape[1], mask.shape[0], mask, _gen(i)).double()
        layer.num_blocks = blocks
        plan = layer.plan()
        assert plan is not None and plan.work < 0.8  # the block path is the one tested
        ref = copy.deepcopy(layer)
        x = torch.randn(batch, mask.shape[1], generator=_gen(10 + i), dtype=torch.float64, requires_grad=True)
        xr = x.detach().clone().requires_grad_(True)
        up = torch.randn(batch, mask.shape[0], generator=_gen(20 + i), dtype=torch.float64)
        out, expected = layer(x), _dense(xr, ref)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        (out * up).sum().backward()
        (expected * up).sum().backward()
        torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.weight.grad, ref.weight.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.bias.grad, ref.bias.grad, rtol=1e-12, atol=1e-12)
        assert torch.all(layer.weight.grad[mask == 0] == 0)  # masked weights never receive a gradient


def test_block_plan_skips_about_half_of_a_triangular_mask():
    mask = torch.tril(torch.ones(12, 12))  # row r sees columns 0..r
    plan = BlockPlan(mask, 4)
    # row chunks of 3 see columns 0..2, 0..5, 0..8, 0..11; column chunk c0..c1 is seen by rows c0..11
    assert plan.row_blocks == [(0, 3, [(0, 3)]), (3, 6, [(0, 6)]), (6, 9, [(0, 9)]), (9, 12, [(0, 12)])]
    assert plan.col_blocks == [(0, 3, [(0, 12)]), (3, 6, [(3, 12)]), (6, 9, [(6, 12)]), (9, 12, [(9, 12)])]
    assert plan.work == pytest.approx(90 / 144) and plan.extra.numel() == 0


def test_block_plan_multiplies_columns_every_row_sees_separately():
    """The MADE hidden layer: unit D-1 has degree 0, so every unit sees it; without it the boxes are triangular."""
    dim = 9
    mask = made_masks(sequential_degrees(dim, dim, 1))[1]
    plan = BlockPlan(mask, 3)
    assert plan.extra.tolist() == [0, dim - 1]  # the two degree-0 hidden units
    assert plan.work < 0.8


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_product_is_exact_for_any_mask(seed):
    """Boxes may hold zeros, never miss a non-zero: the product equals the dense one for a random mask too."""
    g = _gen(seed)
    mask = (torch.rand(14, 10, generator=g) < 0.4).double()
    mask[:, 3] = 1.0  # a column every row sees (a candidate for the separate product)
    w = torch.randn(14, 10, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(14, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, 10, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(6, 14, generator=g, dtype=torch.float64)
    out = _BlockMatmul.apply(x, w, b, BlockPlan(mask, 4))
    grads = torch.autograd.grad((out * up).sum(), (x, w, b))
    ref = x @ (w * mask).T + b
    ref_grads = torch.autograd.grad((ref * up).sum(), (x, w, b))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_dense_mask_keeps_the_dense_product():
    layer = MaskedLinear(6, 5, torch.ones(5, 6), _gen())
    layer.num_blocks = 2
    assert layer.plan() is None  # nothing to skip


def test_made_block_path_equals_dense_path_both_orders():
    dim = 10
    for degrees in (None, torch.arange(dim).flip(0)):
        made = MADE(dim, dim, 1, degrees, generator=_gen()).double()
        for layer in made.net:
            if isinstance(layer, MaskedLinear):
                layer.num_blocks = 3
        dense = copy.deepcopy(made)
        for layer in dense.net:
            if isinstance(layer, MaskedLinear):
                layer.block_matmul = False
                assert layer.plan() is None
        x = torch.randn(7, dim, generator=_gen(2), dtype=torch.float64)
        (u, log_det), (u_ref, log_det_ref) = made(x), dense(x)
        torch.testing.assert_close(u, u_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(log_det, log_det_ref, rtol=1e-12, atol=1e-12)
        (u.sum() + log_det.sum()).backward()
        (u_ref.sum() + log_det_ref.sum()).backward()
        for p, q in zip(made.parameters(), dense.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)


def test_grouped_batchnorm_equals_one_call_per_group():
    bn = BatchNormFlow(4).double().train()
    with torch.no_grad():
        bn.log_gamma.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    ref = copy.deepcopy(bn)
    a = torch.randn(6, 4, generator=_gen(1), dtype=torch.float64) * 2 + 1
    b = torch.randn(6, 4, generator=_gen(2), dtype=torch.float64) - 3
    y, log_det = bn(torch.cat([a, b]), groups=2)
    (ya, la), (yb, lb) = ref(a), ref(b)  # two calls, in this order
    torch.testing.assert_close(y, torch.cat([ya, yb]))
    torch.testing.assert_close(log_det, torch.cat([la, lb]))
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    with pytest.raises(ValueError, match="equal groups"):
        bn(torch.randn(5, 4, dtype=torch.float64), groups=2)


def _mixture(counts, means, generator):
    xs, ys = [], []
    for c, n in enumerate(counts):
        xs.append(means[c] + torch.randn(n, means.shape[1], generator=generator, dtype=torch.float64))
        ys.append(torch.full((n,), c, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


@pytest.fixture(scope="module")
def data():
    g = _gen(1)
    means = torch.randn(4, 12, generator=g, dtype=torch.float64) * 4
    return _mixture([120, 60, 30, 15], means, g), _mixture([10] * 4, means, g)


def test_one_pass_per_pair_batch_trains_the_same_flow(data):
    """Positives and negatives in one flow pass (BN per half) give the same weights as two passes per step."""
    (tx, ty), (vx, vy) = data
    models = []
    for joint in (True, False):
        model = FlowGMM(12, 5, hidden_size=16, generator=_gen()).double()
        obj = FlowObjective(epochs=3, batch_size=32, lr=0.05, joint_pairs=joint)
        res = train_flowgmm(model, tx, ty, obj, FlowSelection(vx, vy, min_cluster_size=1), generator=_gen(3))
        models.append((model, res))
    (fast, res_fast), (ref, res_ref) = models
    assert res_fast.epoch_scores == res_ref.epoch_scores and res_fast.best_epoch == res_ref.best_epoch
    for (name, a), (_, b) in zip(fast.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("scores, patience, stop", [
    ([1, 3, 2, 5, 4, 4, 4, 9], 3, 7),  # best at epoch 4, then 3 epochs without a new best
    ([1, 2, 3, 4, 5, 6], 2, None),  # always improving: never stops early
    ([5, 5, 5, 5], 3, 4),  # ties are not improvements (the selection keeps the first of equal scores)
    ([2, 1, 3, 1, 1], 1, 2),
])
def test_should_stop_on_known_curves(scores, patience, stop):
    best_score, best_epoch, stopped = -1, None, None
    for epoch, score in enumerate(scores, start=1):
        if score > best_score:
            best_score, best_epoch = score, epoch
        if should_stop(epoch, best_epoch, patience):
            stopped = epoch
            break
    assert stopped == stop
    assert not should_stop(len(scores), 1, None)  # no patience: every epoch runs


def test_train_flowgmm_stops_patience_epochs_after_the_best(data):
    (tx, ty), (vx, vy) = data
    model = FlowGMM(12, 5, hidden_size=16, generator=_gen()).double()
    full = copy.deepcopy(model)
    sel = FlowSelection(vx, vy, min_cluster_size=1)
    res_full = train_flowgmm(full, tx, ty, FlowObjective(epochs=12, batch_size=32, lr=0.05), sel, generator=_gen(3))
    res = train_flowgmm(model, tx, ty, FlowObjective(epochs=12, batch_size=32, lr=0.05, patience=2), sel,
                        generator=_gen(3))
    # the stop epoch from the full curve, counted here: the first epoch 2 epochs after the running best
    best, best_epoch, stop = -1, 0, len(res_full.epoch_scores)
    for epoch, score in enumerate(res_full.epoch_scores, start=1):
        if score > best:
            best, best_epoch = score, epoch
        if epoch - best_epoch >= 2:
            stop = epoch
            break
    assert len(res.epoch_scores) == stop
    assert res.epoch_scores == pytest.approx(res_full.epoch_scores[:stop])  # same trajectory up to the stop
    assert res.best_epoch == 1 + max(range(stop), key=lambda e: (res.epoch_scores[e], -e))


def test_patience_is_validated():
    with pytest.raises(ValueError, match="flow_patience"):
        DLSAConfig(flow_patience=0)
    assert DLSAConfig(flow_patience=None).flow_patience is None
    assert DLSAConfig().flow_patience == 10  # the default stops early; the released configs train every epoch
    assert DLSAConfig.from_preset("imagenet_lt_ce_r50_bsm").flow_patience is None


def test_fit_records_the_flow_epochs_run(data):
    (tx, ty), (vx, vy) = data
    cfg = DLSAConfig(num_clusters=5, flow_epochs=6, flow_patience=1, flow_batch_size=32, flow_hidden_size=16,
                     cls_epochs=2)
    model = fit_dlsa(tx.float(), ty, vx.float(), vy, cfg, seed=0)
    depth = model.history[0]
    assert depth["flow_epochs_run"] == len(depth["flow_epoch_scores"]) <= 6
    assert depth["flow_epochs_run"] == min(6, (depth["flow_best_epoch"] or 0) + 1)
