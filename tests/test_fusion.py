"""H2T / H2TF / PIF semantics, pinned against hand-written expectations (METHODS.md §1.4, §2.3, §2.4)."""

from __future__ import annotations

import math

import pytest
import torch

from pih2t_hub.models.pih2t.fusion import (
    PIF,
    PrototypeDistance,
    class_prototypes,
    h2t_channel_subset,
    h2t_fuse,
    h2tf_fuse,
    h2tf_ratio,
)


def _maps(seed: int = 0, shape=(6, 20, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


def _changed_channels(out: torch.Tensor, fused: torch.Tensor) -> list[set[int]]:
    """Per sample, the channel indices whose values differ from the fused input."""
    diff = (out != fused).flatten(2).any(dim=2)  # (B, C)
    return [set(torch.nonzero(row).flatten().tolist()) for row in diff]


@pytest.mark.parametrize("p", [0.1, 0.25, 0.3, 0.5, 0.99])
def test_exactly_floor_pC_channels_change_shared_by_the_batch(p):
    fused, fusing = _maps()
    out, subset = h2t_fuse(fused, fusing, p, generator=torch.Generator().manual_seed(1))
    k = math.floor(p * 20)
    changed = _changed_channels(out, fused)
    assert all(c == set(subset.tolist()) for c in changed)  # the same subset for every sample
    assert len(subset) == k == len(set(subset.tolist()))
    s = subset.tolist()
    # replaced channels come from the same batch position of the fusing branch; others are bitwise equal
    assert torch.equal(out[:, s], fusing[:, s])
    keep = [c for c in range(20) if c not in s]
    assert torch.equal(out[:, keep], fused[:, keep])


def test_subset_is_redrawn_each_call():
    fused, fusing = _maps()
    g = torch.Generator().manual_seed(0)
    subsets = {tuple(sorted(h2t_fuse(fused, fusing, 0.25, generator=g)[1].tolist())) for _ in range(10)}
    assert len(subsets) > 1


def test_seeded_subsets_are_reproducible():
    a = h2t_channel_subset(64, 0.25, torch.Generator().manual_seed(3))
    b = h2t_channel_subset(64, 0.25, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_p0_identity_and_p1_full_replacement():
    fused, fusing = _maps()
    out0, _ = h2t_fuse(fused, fusing, 0.0)
    out1, _ = h2t_fuse(fused, fusing, 1.0)
    assert torch.equal(out0, fused)
    assert torch.equal(out1, fusing)


def test_inputs_not_modified_and_tokens_fuse_on_embedding_dims():
    fused, fusing = _maps(shape=(4, 5, 16))  # ViT tokens B×N×D
    f0, g0 = fused.clone(), fusing.clone()
    out, subset = h2t_fuse(fused, fusing, 0.5, channel_dim=-1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fused, f0) and torch.equal(fusing, g0)
    s = subset.tolist()
    assert len(s) == 8
    assert torch.equal(out[..., s], fusing[..., s])  # every token of the sample, same dims
    keep = [d for d in range(16) if d not in s]
    assert torch.equal(out[..., keep], fused[..., keep])


def test_fusion_commutes_with_global_average_pooling():
    """Why the cached path is exact: channel replacement then GAP == GAP then channel replacement."""
    fused, fusing = _maps()
    subset = h2t_channel_subset(20, 0.25, torch.Generator().manual_seed(5))
    a, _ = h2t_fuse(fused, fusing, 0.25, subset=subset)
    b, _ = h2t_fuse(fused.mean((2, 3)), fusing.mean((2, 3)), 0.25, subset=subset)
    torch.testing.assert_close(a.mean((2, 3)), b)


@pytest.mark.parametrize("p", [-0.1, 1.1, float("nan")])
def test_ratio_outside_unit_interval(p):
    fused, fusing = _maps()
    with pytest.raises(ValueError, match=r"fusion ratio p must lie in \[0, 1\]"):
        h2t_fuse(fused, fusing, p)


def test_fusing_batch_of_a_different_shape():
    fused, _ = _maps()
    with pytest.raises(ValueError, match="same shape"):
        h2t_fuse(fused, fused[:3], 0.25)


def test_h2tf_ratio_formula():
    d = torch.tensor([0.0, 1.0, 3.0])
    torch.testing.assert_close(h2tf_ratio(d), torch.tensor([1.0, 0.6, 0.4]))  # 0.8/(1+d)+0.2 by hand
    with pytest.raises(ValueError, match="non-negative"):
        h2tf_ratio(torch.tensor([-1.0]))


def test_h2tf_interpolation_uses_distance_to_own_prototype():
    protos = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    dist = PrototypeDistance(protos, scale=2.0)
    x1 = torch.tensor([[0.0, 2.0], [10.0, 0.0]])  # d = 2/2 = 1 for class 0, 0 for class 1
    x2 = torch.tensor([[4.0, 4.0], [5.0, 5.0]])
    y = torch.tensor([0, 1])
    out, rho = h2tf_fuse(x1, x2, y, dist)
    torch.testing.assert_close(rho, torch.tensor([0.6, 1.0]))
    torch.testing.assert_close(out[0], 0.6 * x1[0] + 0.4 * x2[0])
    torch.testing.assert_close(out[1], x1[1])


def test_h2tf_per_sample_replacement_counts():
    x1, x2 = torch.zeros(2, 10), torch.ones(2, 10)
    y = torch.tensor([0, 1])
    protos = torch.tensor([[0.0] * 10, [3.0] + [0.0] * 9])
    out, rho = h2tf_fuse(x1, x2, y, PrototypeDistance(protos), mode="replace",
                         generator=torch.Generator().manual_seed(0))
    # sample 0: d = 0 → ρ = 1 → nothing replaced; sample 1: d = 3 → ρ = 0.4 → floor(0.6·10) = 6 replaced
    assert out[0].sum().item() == 0
    assert out[1].sum().item() == 6


def test_h2tf_without_prototypes():
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="prototypes"):
        h2tf_fuse(x, x, torch.tensor([0, 1]), None)


def test_class_prototypes():
    f = torch.tensor([[0.0, 0.0], [2.0, 0.0], [5.0, 5.0]])
    y = torch.tensor([0, 0, 2])
    protos, scale = class_prototypes(f, y, 3)
    torch.testing.assert_close(protos[0], torch.tensor([1.0, 0.0]))
    assert torch.isnan(protos[1]).all()
    torch.testing.assert_close(protos[2], torch.tensor([5.0, 5.0]))
    assert scale == pytest.approx((1 + 1 + 0) / 3)


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("mode", ["replace", "residual"])
def test_pif_is_channel_permutation_equivariant(activation, mode):
    torch.manual_seed(0)
    pif = PIF(activation=activation, mode=mode)
    if mode == "residual":  # make φ non-trivial (the last layer starts at zero)
        torch.nn.init.normal_(pif.phi[-1].weight)
    x = torch.randn(3, 12, 4, 4)
    perm = torch.randperm(12)
    torch.testing.assert_close(pif(x)[:, perm], pif(x[:, perm]))
    tokens = torch.randn(2, 5, 12)
    torch.testing.assert_close(pif(tokens, channel_dim=-1)[..., perm], pif(tokens[..., perm], channel_dim=-1))


def test_pif_affine_matches_the_fragment_form():
    """With no non-linearity φ(x, x−μ) = a·x + b·(x−μ) + d: recover a, b, d and check it by hand."""
    pif = PIF()
    assert sum(p.numel() for p in pif.parameters()) == 25  # 2·4+4 + 4·2+2 + 2·1+1
    with torch.no_grad():
        d = pif.phi(torch.zeros(2)).item()
        a = pif.phi(torch.tensor([1.0, 0.0])).item() - d
        b = pif.phi(torch.tensor([0.0, 1.0])).item() - d
    x = torch.randn(2, 6, 3, 3)
    mu = x.mean(dim=1, keepdim=True)
    torch.testing.assert_close(pif(x), a * x + b * (x - mu) + d, rtol=1e-5, atol=1e-5)


def test_pif_residual_starts_as_identity():
    x = torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(PIF(mode="residual")(x), x)
