"""Stage 2 with H2T: the cached path equals the online one, only the head learns, shift-BN touches only BN stats."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pih2t_hub import create_model
from pih2t_hub.models.pih2t.fusion import h2t_channel_subset, h2t_fuse
from pih2t_hub.training.steps import cached_fused_features, online_fused_features


def _fixed_subset_fuse(subset: torch.Tensor):
    return lambda f, g, y, cd: h2t_fuse(f, g, 0.25, channel_dim=cd, subset=subset)[0]


def _images(model, n: int, seed: int) -> torch.Tensor:
    _, h, w = model.config.backbone_data_config["input_size"]
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
@pytest.mark.parametrize("head_type", ["linear", "cosine"])
def test_cached_loss_and_head_gradients_equal_online(backbone, head_type):
    torch.manual_seed(0)
    model = create_model(backbone, num_labels=4, head_type=head_type)
    bb = model.pih2t
    xf, xg = _images(model, 6, 1), _images(model, 6, 2)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    subset = h2t_channel_subset(model.config.num_features, 0.25, torch.Generator().manual_seed(7))
    fuse = _fixed_subset_fuse(subset)

    def loss_and_grads(pooled):
        model.classifier.zero_grad()
        loss = F.cross_entropy(model.classifier(pooled), y)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.classifier.parameters()]

    # online: eval-mode backbone (no shift-BN), fusion on the un-pooled map / tokens
    online = online_fused_features(bb, xf, xg, y, fuse, "map", shift_bn=False)
    # cached: pooled features extracted once, fused after pooling
    with torch.no_grad():
        bb.eval()
        cf, cg = bb(xf).pooler_output, bb(xg).pooler_output
    cached = cached_fused_features(cf, cg, y, fuse)
    lo, go = loss_and_grads(online)
    lc, gc = loss_and_grads(cached)
    torch.testing.assert_close(lc, lo, rtol=1e-5, atol=1e-6)
    for a, b in zip(gc, go):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shift_bn", [False, True])
def test_only_the_head_learns_and_bn_stats_move_only_with_shift_bn(shift_bn):
    torch.manual_seed(0)
    model = create_model("test_resnet", num_labels=3)
    bb = model.pih2t
    bb.requires_grad_(False)
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    opt = torch.optim.SGD(model.classifier.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    fuse = lambda f, h, y, cd: h2t_fuse(f, h, 0.25, channel_dim=cd, generator=g)[0]  # noqa: E731
    y = torch.tensor([0, 1, 2, 0])
    for step in range(3):
        pooled = online_fused_features(bb, _images(model, 4, step), _images(model, 4, 10 + step), y, fuse, "map",
                                       shift_bn=shift_bn)
        assert not pooled.requires_grad  # no graph into the backbone
        loss = F.cross_entropy(model.classifier(pooled), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in bb.parameters())
    after = bb.state_dict()
    stats = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert stats, "test_resnet has BatchNorm layers"
    for k in before:
        if k in stats:
            changed = not torch.equal(before[k], after[k])
            assert changed == shift_bn, f"{k}: BN statistics changed={changed} with shift_bn={shift_bn}"
        else:
            assert torch.equal(before[k], after[k]), f"backbone weight {k} changed in stage 2"
    assert any(not torch.equal(head_before[k], v) for k, v in model.classifier.state_dict().items())


def test_labels_are_the_fused_branch_labels():
    """The fusing branch's labels never reach the loss: fusing a batch with any partner keeps y^f."""
    model = create_model("test_resnet", num_labels=3).eval()
    xf, xg = _images(model, 4, 0), _images(model, 4, 1)
    y = torch.tensor([2, 1, 0, 2])
    y_before = y.clone()
    online_fused_features(model.pih2t, xf, xg, y, lambda f, g, yy, cd: h2t_fuse(f, g, 0.5, channel_dim=cd)[0],
                          "map", shift_bn=False)
    assert torch.equal(y, y_before)


def test_fusion_needs_unpooled_or_pooled_features_of_matching_shape():
    model = create_model("test_resnet", num_labels=3).eval()
    with torch.no_grad():
        f = model.pih2t(_images(model, 2, 0)).pooler_output
    with pytest.raises(ValueError, match="same shape"):
        cached_fused_features(f, f[:, :10], torch.tensor([0, 1]), lambda a, b, y, cd: h2t_fuse(a, b, 0.25)[0])
    with pytest.raises(ValueError, match="batch and a channel"):
        h2t_fuse(torch.zeros(5), torch.zeros(5), 0.25)


def test_h2t_on_a_half_precision_cache_replaces_exactly_the_drawn_channels():
    """The H2T plug-in fuses cached float16 rows as stored and converts once: every output channel is, bit for
    bit, the float32 value of either the fused or the fusing row, ⌊p·C⌋ of them from the fusing row."""
    from pih2t_hub.methods.h2t import ChannelReplacement

    g = torch.Generator().manual_seed(0)
    xf, xg = torch.randn(6, 40, generator=g).half(), torch.randn(6, 40, generator=g).half()
    out = cached_fused_features(xf, xg, torch.zeros(6, dtype=torch.long),
                                ChannelReplacement(0.25, torch.Generator().manual_seed(3)))
    assert out.dtype == torch.float32
    from_fusing = (out == xg.float()).all(dim=0) & (out != xf.float()).any(dim=0)
    from_fused = (out == xf.float()).all(dim=0)
    assert bool((from_fusing | from_fused).all())  # no channel is a mix
    assert int(from_fusing.sum()) == 10  # ⌊0.25 · 40⌋, the same subset for every sample


def test_fusion_site_is_a_closed_set() -> None:
    """'map' fuses the un-pooled maps, 'pooled' the pooled vectors; any other value is refused, not read as one of
    them (the online stage-2 benchmark once passed 'h2t' and measured the pooled path)."""
    torch.manual_seed(0)
    model = create_model("test_resnet", num_labels=3).eval()
    bb = model.pih2t
    xf, xg, y = _images(model, 2, 0), _images(model, 2, 1), torch.tensor([0, 1])

    def max_fuse(f, g, _labels, _channel_dim):  # not linear: fusing maps and fusing pooled vectors differ
        return torch.maximum(f, g)

    with torch.no_grad():
        ff, fg = bb.forward_features(xf), bb.forward_features(xg)
        by_map = bb.pool(torch.maximum(ff, fg))
        by_vector = torch.maximum(bb.pool(ff), bb.pool(fg))
        assert not torch.allclose(by_map, by_vector)
        torch.testing.assert_close(online_fused_features(bb, xf, xg, y, max_fuse, "map", shift_bn=False), by_map)
        torch.testing.assert_close(online_fused_features(bb, xf, xg, y, max_fuse, "pooled", shift_bn=False),
                                   by_vector)
        for wrong in ("h2t", "Map", ""):
            with pytest.raises(ValueError, match=r"fusion_site must be one of \('map', 'pooled'\)"):
                online_fused_features(bb, xf, xg, y, max_fuse, wrong, shift_bn=False)


def test_every_method_names_a_known_fusion_site() -> None:
    from typing import get_args

    from pih2t_hub.methods import get_method, list_methods
    from pih2t_hub.methods.base import FusionSite

    sites = {name: get_method(name).fusion_site for name in list_methods()}
    assert set(sites.values()) <= set(get_args(FusionSite)) | {None}
    assert sites["h2t"] == "map" and sites["pi-h2t"] == "pooled"
