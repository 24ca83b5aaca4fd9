"""H2T / H2TF / PIF semantics, pinned against hand-written expectations (docs/methods.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pih2t_hub.models.pih2t.fusion import (
    H2TF_DISTANCES,
    H2TF_ROW_WISE,
    PIF,
    H2TFusion,
    PrototypeDistance,
    class_prototypes,
    class_stats,
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


# ---------------------------------------------------------------------------------------------- H2TF candidates
# Every distance is recomputed here with numpy in float64 from its written formula (docs/methods.md, "H2TF: the distance behind the fusion ratio").

COUNTS = [9, 5, 3, 2]  # a small long tail; each class has >= 2 samples, so every spread is positive


def _train_set(seed: int = 0, counts=COUNTS, dim: int = 6):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(counts)), counts)
    centres = 3.0 * rng.standard_normal((len(counts), dim))
    x = centres[y] + rng.standard_normal((len(y), dim)) * rng.uniform(0.5, 2.0, len(counts))[y, None]
    perm = rng.permutation(len(y))
    return x[perm], y[perm]


def _np_reference(x: np.ndarray, y: np.ndarray, k: int):
    protos = np.stack([x[y == c].mean(0) for c in range(k)])
    own = np.linalg.norm(x - protos[y], axis=1)
    spreads = np.array([own[y == c].mean() for c in range(k)])
    counts = np.bincount(y, minlength=k)
    pair = np.linalg.norm(protos[:, None] - protos[None], axis=2)
    pair_mean = pair.sum() / (k * (k - 1))
    return protos, spreads, own.mean(), counts, pair_mean


def _np_distance(name, f1, y1, f2, y2, ref):
    protos, spreads, scale, counts, pair_mean = ref
    to_own = np.linalg.norm(f1 - protos[y1], axis=1)
    log_freq = np.log(counts.max() / counts[y1])
    return {
        "global": to_own / scale,
        "class_spread": to_own / spreads[y1],
        "frequency": log_freq,
        "global_frequency": to_own / scale * (1 + log_freq),
        "pair": np.linalg.norm(protos[y1] - protos[y2], axis=1) / pair_mean,
        "cross": np.linalg.norm(f2 - protos[y1], axis=1) / scale,
    }[name]


def _batch(seed: int = 1, b: int = 12, dim: int = 6, k: int = len(COUNTS), spread: float = 4.0):
    rng = np.random.default_rng(seed)
    f1, f2 = spread * rng.standard_normal((b, dim)), spread * rng.standard_normal((b, dim))
    y1, y2 = rng.integers(0, k, b), rng.integers(0, k, b)
    y1[:k] = np.arange(k)  # every class appears
    return f1, y1, f2, y2


def _t(a):
    return torch.as_tensor(a, dtype=torch.float32 if np.asarray(a).dtype.kind == "f" else torch.int64)


def test_class_stats_against_numpy(monkeypatch):
    import pih2t_hub.models.pih2t.fusion as fusion

    x, y = _train_set()
    protos, spreads, scale, counts, _ = _np_reference(x, y, 4)
    monkeypatch.setattr(fusion, "_CHUNK", 4)  # several chunks: the chunked reads must add up
    stats = class_stats(_t(x), _t(y), 4)
    np.testing.assert_allclose(stats.prototypes.numpy(), protos, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.spreads.numpy(), spreads, rtol=1e-5)
    np.testing.assert_array_equal(stats.counts.numpy(), counts)
    assert stats.scale == pytest.approx(scale, rel=1e-5)


@pytest.mark.parametrize("mapping", ["fragment", "square"])
@pytest.mark.parametrize("name", list(H2TF_DISTANCES))
def test_each_distance_candidate_matches_its_formula(name, mapping):
    x, y = _train_set()
    ref = _np_reference(x, y, 4)
    f1, y1, f2, y2 = _batch()
    expected_d = _np_distance(name, f1, y1, f2, y2, ref)
    expected_rho = 0.8 / (1 + expected_d) + 0.2 if mapping == "fragment" else 0.8 / (1 + expected_d**2) + 0.2
    fusion = H2TFusion.from_features(_t(x), _t(y), 4, distance=name, mapping=mapping)
    d = fusion.distances(_t(f1), _t(y1), _t(f2), _t(y2))
    np.testing.assert_allclose(d.numpy(), expected_d, rtol=1e-5, atol=1e-6)
    out, rho = fusion.fuse(_t(f1), _t(f2), _t(y1), -1, fusing_labels=_t(y2))
    np.testing.assert_allclose(rho.numpy(), expected_rho, rtol=1e-5)
    np.testing.assert_allclose(out.numpy(), expected_rho[:, None] * f1 + (1 - expected_rho[:, None]) * f2,
                               rtol=1e-4, atol=1e-5)
    assert expected_d.std() > 0 or name == "frequency"  # the batch really exercises the candidate


@pytest.mark.parametrize("mapping", ["fragment", "square"])
@pytest.mark.parametrize("name", list(H2TF_DISTANCES))
def test_rho_stays_in_the_open_closed_interval(name, mapping):
    x, y = _train_set()
    fusion = H2TFusion.from_features(_t(x), _t(y), 4, distance=name, mapping=mapping)
    for spread in (0.0, 1.0, 100.0):  # on the prototypes, typical, far away
        f1, y1, f2, y2 = _batch(spread=spread)
        if spread == 0.0:
            f1 = f2 = fusion.stats.prototypes[_t(y1)].numpy()
        rho = fusion.ratios(_t(f1), _t(y1), _t(f2), _t(y2))
        assert bool((rho > 0.2).all()) and bool((rho <= 1.0).all()), (spread, rho)
    # the head class's own prototype gives d = 0, so nothing is fused
    head = torch.tensor([0])
    proto = fusion.stats.prototypes[head]
    assert fusion.ratios(proto, head, proto, head).item() == pytest.approx(1.0)


def test_frequency_fuses_tail_classes_more():
    x, y = _train_set()
    fusion = H2TFusion.from_features(_t(x), _t(y), 4, distance="frequency")
    rho = fusion.ratios(torch.zeros(4, 6), torch.arange(4))
    expected = 0.8 / (1 + np.log(9 / np.array(COUNTS))) + 0.2  # n_max = 9
    np.testing.assert_allclose(rho.numpy(), expected, rtol=1e-6)
    assert bool((rho[1:] < rho[:-1]).all())


def test_legacy_prototype_distance_is_the_global_candidate():
    x, y = _train_set()
    f1, y1, f2, _ = _batch()
    legacy = h2tf_fuse(_t(f1), _t(f2), _t(y1), PrototypeDistance(*class_prototypes(_t(x), _t(y), 4)))
    fusion = H2TFusion.from_features(_t(x), _t(y), 4)
    assert fusion.config == {"distance": "global", "mapping": "fragment", "mode": "interpolate"}
    new = fusion.fuse(_t(f1), _t(f2), _t(y1))
    torch.testing.assert_close(new[1], legacy[1])
    torch.testing.assert_close(new[0], legacy[0])


# ---------------------------------------------------------------------------------------------- precomputed path


@pytest.mark.parametrize("mode", ["interpolate", "replace"])
@pytest.mark.parametrize("name", list(H2TF_ROW_WISE))
def test_precomputed_path_equals_on_the_fly(name, mode):
    x, y = _train_set(dim=16)
    cache = _t(x).half()  # as stored in a feature cache
    stats = class_stats(cache.float(), _t(y), 4)
    online = H2TFusion(stats, name, mode=mode, generator=torch.Generator().manual_seed(7))
    cached = H2TFusion(stats, name, mode=mode, generator=torch.Generator().manual_seed(7))
    rho_rows = cached.precompute(cache, _t(y))
    assert rho_rows.dtype == torch.float32 and rho_rows.shape == (len(y),)
    rows = torch.randperm(len(y), generator=torch.Generator().manual_seed(3))[:8]
    fusing = torch.randn(8, 16, generator=torch.Generator().manual_seed(4))
    for _ in range(3):  # the generators advance in step
        a, rho_a = online.fuse(cache[rows].float(), fusing, _t(y)[rows], -1)
        b, rho_b = cached.fuse(cache[rows].float(), fusing, _t(y)[rows], -1, fused_rho=rho_rows[rows])
        torch.testing.assert_close(rho_b, rho_a)
        torch.testing.assert_close(b, a)


def test_precomputed_ratios_travel_as_a_dataset_column():
    """The plumbing for cached stage 2: (features, labels, rho) rows through the dual-branch loader."""
    from torch.utils.data import DataLoader, TensorDataset

    from pih2t_hub.data.samplers import DualBranchDataset, DualBranchSampler

    x, y = _train_set(dim=8)
    feats, labels = _t(x).half(), _t(y)
    fusion = H2TFusion.from_features(feats, labels, 4, distance="class_spread")
    ds = TensorDataset(feats, labels, fusion.precompute(feats, labels))
    loader = DataLoader(DualBranchDataset(ds), batch_size=5, sampler=DualBranchSampler(labels, seed=0))
    batch = next(iter(loader))
    (xf, yf, rf), (xg, _, _) = batch["fused"], batch["fusing"]
    torch.testing.assert_close(fusion(xf.float(), xg.float(), yf, -1, fused_rho=rf),
                               fusion(xf.float(), xg.float(), yf, -1))


@pytest.mark.parametrize("mode", ["interpolate", "replace"])
@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.float32])
def test_cached_step_fuses_rows_in_their_stored_precision(cache_dtype, mode):
    """The cached step hands H2TF the rows as stored: the result is float32, within the cache's own rounding of
    the fragment's formula (exact for channel replacement), and the caller's rows are left as they were."""
    from pih2t_hub.training.steps import cached_fused_features

    x, y = _train_set(dim=12)
    cache, labels = (_t(x) * 3).to(cache_dtype), _t(y)
    fusion = H2TFusion.from_features(cache, labels, 4, distance="class_spread", mode=mode,
                                     generator=torch.Generator().manual_seed(5))
    reference = H2TFusion.from_features(cache, labels, 4, distance="class_spread", mode=mode,
                                        generator=torch.Generator().manual_seed(5))
    rho_rows = fusion.precompute(cache, labels)
    rows, fusing_rows = torch.arange(0, 8), torch.arange(8, 16)
    xf, xg = cache[rows], cache[fusing_rows]
    xg_before = xg.clone()
    out = cached_fused_features(xf, xg, labels[rows], fusion, fused_rho=rho_rows[rows])
    assert out.dtype == torch.float32 and torch.equal(xg, xg_before)
    if mode == "replace":  # the same channel draws, values copied: exact in any precision
        torch.testing.assert_close(out, reference(xf.float(), xg.float(), labels[rows], -1, fused_rho=rho_rows[rows]),
                                   rtol=0, atol=0)
        return
    rho = rho_rows[rows].unsqueeze(1)
    exact = rho * xf.double() + (1 - rho) * xg.double()  # the fragment's formula, in float64
    eps = torch.finfo(cache_dtype).eps
    # half an ulp of the result, plus ρ rounded to the cache's dtype (|Δρ| ≤ eps/2 · ρ) times |x1 − x2|
    bound = eps / 2 * exact.abs() + eps / 2 * rho * (xf.double() - xg.double()).abs() + 1e-6
    assert bool(((out.double() - exact).abs() <= bound).all())
    if cache_dtype == torch.float16:  # and it is a real rounding, not a float32 computation in disguise
        assert not torch.equal(out, torch.lerp(xg.float(), xf.float(), rho))


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad, match", [([-1.0, 0.5], "non-negative"), ([float("nan"), 0.5], "NaN"),
                                        ([float("inf")], "finite")])
def test_bad_distances(bad, match):
    for mapping in ("fragment", "square"):
        with pytest.raises(ValueError, match=match):
            h2tf_ratio(torch.tensor(bad), mapping)


def test_distances_too_large_for_rho_above_0_2():
    torch.testing.assert_close(h2tf_ratio(torch.tensor([2e3]), "fragment"), torch.tensor([0.8 / 2001 + 0.2]))
    with pytest.raises(ValueError, match="below 1000 for mapping 'square'"):
        h2tf_ratio(torch.tensor([2e3]), "square")


def test_nan_features():
    x, y = _train_set()
    bad = _t(x).clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        class_stats(bad, _t(y), 4)
    fusion = H2TFusion.from_features(_t(x), _t(y), 4)
    with pytest.raises(ValueError, match="NaN"):
        fusion.ratios(bad[:4], _t(y)[:4])


@pytest.mark.parametrize("name", list(H2TF_DISTANCES))
def test_class_without_prototype(name):
    x, y = _train_set()
    keep = y != 2  # class 2 has no training samples
    fusion = H2TFusion.from_features(_t(x[keep]), _t(y[keep]), 4, distance=name)
    f = torch.zeros(2, 6)
    with pytest.raises(ValueError, match="no prototype"):
        fusion.fuse(f, f, torch.tensor([0, 2]), -1, fusing_labels=torch.tensor([0, 1]))
    if name == "pair":
        with pytest.raises(ValueError, match="fusing sample's class has no prototype"):
            fusion.fuse(f, f, torch.tensor([0, 1]), -1, fusing_labels=torch.tensor([2, 1]))
    if fusion.row_wise:
        with pytest.raises(ValueError, match="no prototype"):
            fusion.precompute(torch.zeros(3, 6), torch.tensor([0, 1, 2]))


def test_zero_spread():
    x, y = _train_set(counts=[5, 1, 3])  # class 1 has a single sample: it sits on its own prototype
    with pytest.raises(ValueError, match=r"'class_spread': zero spread for class\(es\) \[1\]"):
        H2TFusion.from_features(_t(x), _t(y), 3, distance="class_spread")
    H2TFusion.from_features(_t(x), _t(y), 3, distance="global")  # the global scale is still positive
    same = torch.ones(6, 4)
    for name in ("global", "cross", "global_frequency"):
        with pytest.raises(ValueError, match="zero spread"):
            H2TFusion.from_features(same, torch.tensor([0, 0, 0, 1, 1, 1]), 2, distance=name)
    with pytest.raises(ValueError, match="zero spread"):  # distinct samples, but both prototypes coincide
        H2TFusion.from_features(torch.tensor([[1.0], [-1.0], [2.0], [-2.0]]), torch.tensor([0, 0, 1, 1]), 2,
                                distance="pair")


def test_bad_names_and_arguments():
    x, y = _train_set()
    stats = class_stats(_t(x), _t(y), 4)
    with pytest.raises(ValueError, match="unknown H2TF distance 'nearest'"):
        H2TFusion(stats, "nearest")
    with pytest.raises(ValueError, match="mode"):
        H2TFusion(stats, mode="mix")
    with pytest.raises(ValueError, match="mapping"):
        H2TFusion(stats, mapping="linear")
    with pytest.raises(ValueError, match="mapping"):
        h2tf_ratio(torch.zeros(2), "linear")
    f = torch.zeros(3, 6)
    for name in ("pair", "cross"):
        with pytest.raises(ValueError, match="cannot be fixed per row"):
            H2TFusion(stats, name).precompute(_t(x), _t(y))
        with pytest.raises(ValueError, match="not fixed per row"):
            H2TFusion(stats, name)(f, f, torch.zeros(3, dtype=torch.long), fused_rho=torch.ones(3))
    with pytest.raises(ValueError, match="needs the fusing labels"):
        H2TFusion(stats, "pair")(f, f, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="fused_rho of shape"):
        H2TFusion(stats)(f, f, torch.zeros(3, dtype=torch.long), fused_rho=torch.ones(4))
    with pytest.raises(ValueError, match="pooled features"):
        H2TFusion(stats)(torch.zeros(3, 6, 2), torch.zeros(3, 6, 2), torch.zeros(3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        class_stats(_t(x), _t(y) + 1, 4)
