"""Head-to-tail feature fusion: H2T, H2TF (PI-H2T) and the PIF layer.

Pure tensor functions plus one small module. Shapes follow the backbone adapters: un-pooled CNN maps are
``(B, C, H, W)`` with channels on dim 1, ViT tokens ``(B, N, D)`` with channels (embedding dims) on dim -1, pooled
vectors ``(B, D)``. Every function takes the channel dimension explicitly so the same code serves all three.

Provenance (see docs/methods.md): ``h2t_fuse`` follows the official H2T code [CODE]; ``h2tf_*`` formalises the
``H2Tv2`` fragment, with the distance ``d`` a reconstruction [RECON] chosen by name from a small family
(:data:`H2TF_DISTANCES`, :class:`H2TFusion`); ``PIF`` formalises the PIF fragment, with the
non-linearity and residual options reconstructions [RECON].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


def _check_pair(fused: torch.Tensor, fusing: torch.Tensor) -> None:
    if fused.shape != fusing.shape:
        raise ValueError(
            f"fused and fusing features must have the same shape, got {tuple(fused.shape)} and {tuple(fusing.shape)}"
        )
    if fused.dim() < 2:
        raise ValueError(f"features need a batch and a channel dimension, got shape {tuple(fused.shape)}")


def _check_ratio(ratio: float) -> float:
    ratio = float(ratio)
    if not (0.0 <= ratio <= 1.0) or math.isnan(ratio):
        raise ValueError(f"fusion ratio p must lie in [0, 1], got {ratio}")
    return ratio


def h2t_channel_subset(
    num_channels: int, ratio: float, generator: torch.Generator | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """The first ``floor(p·C)`` entries of a uniformly random permutation of the channel indices.

    One subset per call: H2T draws it once per iteration and shares it across the whole batch (docs/methods.md).
    """
    ratio = _check_ratio(ratio)
    k = int(math.floor(ratio * num_channels + 1e-9))
    perm = torch.randperm(num_channels, generator=generator, device=generator.device if generator else "cpu")
    return perm[:k].to(device) if device is not None else perm[:k]


def h2t_fuse(
    fused: torch.Tensor,
    fusing: torch.Tensor,
    ratio: float = 0.25,
    *,
    channel_dim: int = 1,
    generator: torch.Generator | None = None,
    subset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """H2T: replace a random ``floor(p·C)`` channel subset of the fused-branch features with the fusing branch's.

    A hard replacement (not a convex mix), with the same subset for every sample of the batch; sample ``b`` of the
    fused branch receives channels of sample ``b`` of the fusing branch. Labels are untouched: the caller trains on
    the fused branch's labels only. Returns ``(fused_features, subset)``; pass ``subset`` to reuse a draw.
    The input tensors are not modified (the official code writes in place; we copy, which autograd prefers).
    """
    _check_pair(fused, fusing)
    channel_dim = channel_dim % fused.dim()
    if channel_dim == 0:
        raise ValueError("channel_dim cannot be the batch dimension")
    num_channels = fused.shape[channel_dim]
    if subset is None:
        subset = h2t_channel_subset(num_channels, ratio, generator, device=fused.device)
    else:
        subset = subset.to(fused.device)
    mask_shape = [1] * fused.dim()
    mask_shape[channel_dim] = num_channels
    return _replace_channels(fused, fusing, subset, num_channels, mask_shape), subset


def _replace_channels(
    fused: torch.Tensor, fusing: torch.Tensor, subset: torch.Tensor, num_channels: int, mask_shape: list[int]
) -> torch.Tensor:
    """``fusing`` on the channels in ``subset``, ``fused`` elsewhere, as one ``torch.lerp`` with a 0/1 weight.

    ``lerp`` evaluates ``start + w·(end − start)`` for ``w < 0.5`` and ``end − (end − start)·(1 − w)`` otherwise, so
    a weight of exactly 0 or 1 returns ``start`` or ``end`` bit for bit (for finite values) — a hard replacement —
    in a single pass, about 4× faster on CPU than ``torch.where`` with a broadcast boolean mask. Non-finite
    features propagate to the other branch; the training loop stops on a non-finite loss anyway.
    """
    weight = torch.zeros(num_channels, dtype=fused.dtype, device=fused.device)
    weight[subset] = 1.0
    return torch.lerp(fused, fusing, weight.view(mask_shape))


# ---------------------------------------------------------------------------------------------- H2TF
#
# The public ``H2Tv2`` fragment fixes the map from a distance to the keep ratio, ρ = 0.8/(1+d) + 0.2, but not what
# ``d`` measures (it has no call site). The candidates below are reconstructions [RECON], to be chosen on
# validation, never on test (docs/methods.md, "H2TF: the distance behind the fusion ratio").
# ``f₁, y₁`` are the fused sample and its label, ``f₂, y₂`` the fusing one's, ``μ_c`` class prototypes (means of the
# stage-1 pooled training features), ``s̄`` the mean over all training samples of ``‖f − μ_y‖``, ``σ_c`` the same
# mean over class ``c`` only, ``n_c`` the class's training count and ``n_max`` the largest count.

H2TF_DISTANCES: dict[str, str] = {
    "global": "‖f₁ − μ_{y₁}‖ / s̄: distance to the own class prototype in units of the global mean such distance",
    "class_spread": "‖f₁ − μ_{y₁}‖ / σ_{y₁}: the same distance in units of the own class's spread",
    "frequency": "log(n_max / n_{y₁}): a class-level term, 0 for the largest class, largest for the rarest",
    "global_frequency": "(‖f₁ − μ_{y₁}‖ / s̄)·(1 + log(n_max / n_{y₁})): the global distance, stretched for tails",
    "pair": "‖μ_{y₁} − μ_{y₂}‖ / m̄: distance between the two samples' class prototypes, m̄ its mean over class pairs",
    "cross": "‖f₂ − μ_{y₁}‖ / s̄: the fusing sample's distance to the fused sample's class prototype",
}
"""H2TF distance candidates by name, each with its formula (all [RECON])."""

H2TF_ROW_WISE = ("global", "class_spread", "frequency", "global_frequency")
"""Candidates that depend on the fused row only: on cached features :meth:`H2TFusion.precompute` fixes them per row."""

H2TF_MAPPINGS = ("fragment", "square")
"""Distance → keep ratio: ``fragment`` ρ = 0.8/(1+d) + 0.2 (the ``H2Tv2`` code); ``square`` ρ = 0.8/(1+d²) + 0.2
[RECON], steeper around the typical ``d ≈ 1``, so ρ varies more between samples."""

_MAX_DISTANCE = {"fragment": 1e6, "square": 1e3}  # beyond these, float32 ρ would round to 0.2 (outside (0.2, 1])

H2TF_MODES = ("interpolate", "replace")


def _check_distances(distance: torch.Tensor, mapping: str) -> None:
    """One fused pass in the common case; the slower diagnosis only runs when something is wrong."""
    limit = _MAX_DISTANCE[mapping]
    if bool(((distance >= 0) & (distance < limit)).all()):
        return
    if bool(torch.isnan(distance).any()):
        raise ValueError("H2TF distances contain NaN (NaN features or prototypes?)")
    if bool((distance < 0).any()):
        raise ValueError(f"H2TF distances must be non-negative, got a minimum of {distance.min().item():.4g}")
    raise ValueError(f"H2TF distances must be finite and below {limit:g} for mapping {mapping!r} (got "
                     f"{distance.max().item():.4g}; larger ones round rho to 0.2, outside (0.2, 1])")


def h2tf_ratio(distance: torch.Tensor, mapping: str = "fragment") -> torch.Tensor:
    """PI-H2T's adaptive keep ratio from a non-negative distance; ``ρ ∈ (0.2, 1]``, ``ρ = 1`` at ``d = 0``.

    ``mapping="fragment"``: ``ρ = 0.8 / (1 + d) + 0.2`` (the ``H2Tv2`` fragment). ``mapping="square"``:
    ``ρ = 0.8 / (1 + d²) + 0.2`` [RECON]: the same at ``d = 1`` (0.6), but closer samples keep more and farther
    ones less, so a distance that clusters near 1 still spreads ρ. ``ρ`` is the share of the fused sample that is
    kept: a sample far away (large ``d``) receives more of the fusing sample. Distances must be finite and below
    10⁶ (``fragment``) or 10³ (``square``), so that ρ > 0.2 holds in float32 too.
    """
    if mapping not in H2TF_MAPPINGS:
        raise ValueError(f"H2TF mapping must be one of {list(H2TF_MAPPINGS)}, got {mapping!r}")
    _check_distances(distance, mapping)
    if mapping == "fragment":
        return 0.8 / (1.0 + distance) + 0.2
    return 0.8 / (1.0 + distance.square()) + 0.2


@dataclass(frozen=True, eq=False)  # tensors: identity, not element-wise ==
class ClassStats:
    """Per-class statistics of stage-1 pooled training features, the raw material of every H2TF distance.

    ``prototypes`` ``(K, D)`` class means (NaN rows for classes without samples), ``counts`` ``(K,)`` training
    samples per class, ``spreads`` ``(K,)`` mean distance of a class's samples to its prototype (NaN without
    samples), ``scale`` the mean distance of a sample to its class prototype over all samples (``s̄``).
    """

    prototypes: torch.Tensor
    counts: torch.Tensor
    spreads: torch.Tensor
    scale: float

    def __post_init__(self) -> None:
        if self.prototypes.dim() != 2:
            raise ValueError(f"prototypes must be a (num_classes, D) tensor, got shape {tuple(self.prototypes.shape)}")
        k = self.prototypes.shape[0]
        if tuple(self.counts.shape) != (k,) or tuple(self.spreads.shape) != (k,):
            raise ValueError(f"counts and spreads must have one entry per prototype ({k}), got shapes "
                             f"{tuple(self.counts.shape)} and {tuple(self.spreads.shape)}")
        if self.counts.dtype.is_floating_point or bool((self.counts < 0).any()):
            raise ValueError("counts must be non-negative integers")
        if not math.isfinite(self.scale) or self.scale < 0:
            raise ValueError(f"scale must be finite and non-negative, got {self.scale}")

    @property
    def num_classes(self) -> int:
        return int(self.counts.numel())


_CHUNK = 16384  # rows per pass over a feature cache: bounds the float32 copy of a large fp16 cache


def _check_features(features: torch.Tensor, labels: torch.Tensor, num_classes: int | None) -> torch.Tensor:
    if features.dim() != 2:
        raise ValueError(f"H2TF needs pooled (N, D) features, got shape {tuple(features.shape)}")
    if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"{tuple(labels.shape)} labels for {features.shape[0]} feature rows")
    if features.shape[0] == 0:
        raise ValueError("no feature rows")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class ids, got dtype {labels.dtype}")
    labels = labels.long()
    if num_classes is not None and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    if not bool(torch.isfinite(features).all()):
        raise ValueError("features contain NaN or infinite values")
    return labels


def _work(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def class_stats(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> ClassStats:
    """Prototypes, counts, spreads and the global scale of pooled training features (float32 or wider).

    Read in chunks, so a memory-mapped fp16 cache is never copied to float32 whole.
    """
    labels = _check_features(features, labels, num_classes)
    dtype = torch.promote_types(features.dtype, torch.float32)
    sums = torch.zeros(num_classes, features.shape[1], dtype=dtype, device=features.device)
    for start in range(0, features.shape[0], _CHUNK):
        sums.index_add_(0, labels[start:start + _CHUNK], _work(features[start:start + _CHUNK]))
    counts = torch.bincount(labels, minlength=num_classes)
    protos = sums / counts.clamp_min(1).unsqueeze(1).to(dtype)
    protos[counts == 0] = float("nan")
    dist = torch.cat([torch.linalg.vector_norm(_work(features[s:s + _CHUNK]) - protos[labels[s:s + _CHUNK]], dim=1)
                      for s in range(0, features.shape[0], _CHUNK)])
    spreads = torch.zeros(num_classes, dtype=dtype, device=features.device).index_add_(0, labels, dist)
    spreads = spreads / counts.clamp_min(1).to(dtype)
    spreads[counts == 0] = float("nan")
    return ClassStats(protos, counts, spreads, float(dist.mean()))


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, float]:
    """Class means of (stage-1) pooled features and the mean distance of a sample to its own class mean.

    The scale normalises H2TF's ``global`` distance so that ``d ≈ 1`` for a typical sample whatever the feature
    norm [RECON]. Classes without samples get a NaN prototype. Kept for :class:`PrototypeDistance`; new code uses
    :func:`class_stats` and :class:`H2TFusion`.
    """
    stats = class_stats(features, labels, num_classes)
    return stats.prototypes, max(stats.scale, 1e-12)


class PrototypeDistance:
    """The ``global`` H2TF distance as a callable: ``d_b = ||f_b − μ_{y_b}|| / scale`` (for :func:`h2tf_fuse`)."""

    def __init__(self, prototypes: torch.Tensor, scale: float = 1.0) -> None:
        if prototypes.dim() != 2:
            raise ValueError("prototypes must be a (num_classes, D) tensor")
        self.prototypes = prototypes
        self.has_prototype = ~torch.isnan(prototypes).any(dim=1)  # checked once, not on every batch
        self.all_classes = bool(self.has_prototype.all())
        self.scale = float(scale)

    def __call__(self, fused: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.prototypes.device != fused.device or self.prototypes.dtype != fused.dtype:
            self.prototypes = self.prototypes.to(fused.device, fused.dtype)
            self.has_prototype = self.has_prototype.to(fused.device)
        labels = labels.long()
        if not self.all_classes and not bool(self.has_prototype[labels].all()):
            raise ValueError("H2TF: a fused sample's class has no prototype (no stage-1 features of that class)")
        protos = self.prototypes.index_select(0, labels)
        return torch.linalg.vector_norm(fused.flatten(1) - protos.flatten(1), dim=1) / self.scale


def h2tf_apply(
    fused: torch.Tensor,
    fusing: torch.Tensor,
    rho: torch.Tensor,
    mode: str = "interpolate",
    *,
    channel_dim: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fuse with given per-sample keep ratios ``rho`` ``(B,)``.

    ``mode="interpolate"`` (the fragment): ``x̃_b = ρ_b·x1_b + (1−ρ_b)·x2_b``, one ``lerp`` pass.
    ``mode="replace"`` [RECON]: per-sample H2T, replacing ``floor((1−ρ_b)·C)`` random channels of sample ``b``.
    """
    if mode == "interpolate":
        return torch.lerp(fusing, fused, rho.view([-1] + [1] * (fused.dim() - 1)))  # ρ·x1 + (1 − ρ)·x2
    if mode == "replace":
        channel_dim = channel_dim % fused.dim()
        num_channels = fused.shape[channel_dim]
        keys = torch.rand(fused.shape[0], num_channels, generator=generator,
                          device=generator.device if generator else "cpu").to(fused.device)
        k = torch.floor((1 - rho) * num_channels + 1e-6).long().unsqueeze(1)
        # channel order[b, j] has rank j: mark ranks < k_b. One argsort and a scatter instead of two argsorts.
        rank_mask = (torch.arange(num_channels, device=fused.device).unsqueeze(0) < k).to(fused.dtype)
        weight = torch.empty_like(rank_mask).scatter_(1, keys.argsort(dim=1), rank_mask)  # (B, C) 0/1 lerp weight
        shape = [fused.shape[0]] + [1] * (fused.dim() - 1)
        shape[channel_dim] = num_channels
        return torch.lerp(fused, fusing, weight.view(shape))
    raise ValueError(f"H2TF mode must be one of {list(H2TF_MODES)}, got {mode!r}")


def h2tf_fuse(
    fused: torch.Tensor,
    fusing: torch.Tensor,
    labels: torch.Tensor,
    distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    *,
    mode: str = "interpolate",
    channel_dim: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """H2TF with a distance callable ``distance(fused, labels) -> (B,)``; returns ``(fused_features, rho)``.

    The functional form; :class:`H2TFusion` bundles the named distance candidates and the precomputed path.
    """
    _check_pair(fused, fusing)
    if distance is None:
        raise ValueError("H2TF needs class prototypes / a distance function (compute them from stage-1 features)")
    if labels.shape[0] != fused.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for a batch of {fused.shape[0]}")
    if mode not in H2TF_MODES:
        raise ValueError(f"H2TF mode must be one of {list(H2TF_MODES)}, got {mode!r}")
    with torch.no_grad():
        rho = h2tf_ratio(distance(fused.detach(), labels))
        rho = rho.to(fused.dtype) if rho.dtype != fused.dtype else rho
    return h2tf_apply(fused, fusing, rho, mode, channel_dim=channel_dim, generator=generator), rho


class H2TFusion:
    """H2TF with a named distance candidate (:data:`H2TF_DISTANCES`), mapping and mode, for cached or online use.

    Build it once from the stage-1 training features (``H2TFusion.from_features(x, y, K, distance=...)``) or from
    :func:`class_stats`; every per-class quantity (prototypes, ``1/s̄``, ``1/σ_c``, ``log(n_max/n_c)``, the
    prototype-pair table) is validated and fixed here, so bad statistics fail before training starts.

    * On the fly: ``fusion(fused, fusing, labels, channel_dim)`` — the ``Fuse`` signature of the training steps —
      computes ρ from the batch (``pair`` also needs ``fusing_labels=``, ``cross`` uses ``fusing`` itself).
    * Cached features: the fused-row candidates (:data:`H2TF_ROW_WISE`) do not change during stage 2, so
      ``rho_rows = fusion.precompute(x, y)`` fixes ρ per row once (validated there), and the step passes the
      batch's rows: ``fusion(fused, fusing, labels, -1, fused_rho=rho_rows[rows])`` — a ``lerp`` and nothing else.
      Add ``rho_rows`` as a third column of the cached ``TensorDataset`` and the loader gathers it with the rows.

    ``generator`` drives ``mode="replace"``'s channel draws (pass a checkpointed one for reproducible runs).
    """

    def __init__(self, stats: ClassStats, distance: str = "global", *, mode: str = "interpolate",
                 mapping: str = "fragment", generator: torch.Generator | None = None) -> None:
        if distance not in H2TF_DISTANCES:
            raise ValueError(f"unknown H2TF distance {distance!r}; choose one of {list(H2TF_DISTANCES)}")
        if mode not in H2TF_MODES:
            raise ValueError(f"H2TF mode must be one of {list(H2TF_MODES)}, got {mode!r}")
        if mapping not in H2TF_MAPPINGS:
            raise ValueError(f"H2TF mapping must be one of {list(H2TF_MAPPINGS)}, got {mapping!r}")
        if not isinstance(stats, ClassStats):
            raise TypeError(f"stats must be a ClassStats (see class_stats), got {type(stats).__name__}")
        self.stats, self.distance, self.mode, self.mapping, self.generator = stats, distance, mode, mapping, generator
        self.present = stats.counts > 0
        self.all_present = bool(self.present.all())
        self._base = self._class_tables()
        self._moved: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}

    @classmethod
    def from_features(cls, features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                      distance: str = "global", **kwargs) -> H2TFusion:
        """Statistics from the stage-1 pooled training features, then the fusion (``kwargs``: mode, mapping, ...)."""
        if distance not in H2TF_DISTANCES:  # fail before the pass over the features
            raise ValueError(f"unknown H2TF distance {distance!r}; choose one of {list(H2TF_DISTANCES)}")
        return cls(class_stats(features, labels, num_classes), distance, **kwargs)

    @property
    def row_wise(self) -> bool:
        """Whether ρ depends on the fused row only (then :meth:`precompute` applies)."""
        return self.distance in H2TF_ROW_WISE

    @property
    def config(self) -> dict[str, str]:
        """What to record with a run: the candidate, the mapping and the mode."""
        return {"distance": self.distance, "mapping": self.mapping, "mode": self.mode}

    def __repr__(self) -> str:
        return (f"H2TFusion(distance={self.distance!r}, mode={self.mode!r}, mapping={self.mapping!r}, "
                f"num_classes={self.stats.num_classes})")

    def _log_frequency(self) -> torch.Tensor:
        counts = self.stats.counts.to(torch.float64)
        n_max = counts.max()
        return torch.where(self.present, torch.log(n_max / counts.clamp_min(1)), torch.full_like(counts, math.nan))

    def _class_tables(self) -> dict[str, torch.Tensor]:
        """Per-class factors such that ``d = ‖f − μ_y‖·factor_y`` (or a table lookup), checked once."""
        s, name = self.stats, self.distance
        dtype = s.prototypes.dtype
        if not bool(self.present.any()):
            raise ValueError("H2TF: no class has training samples (all counts are zero)")
        tables = {"prototypes": s.prototypes, "present": self.present}
        if name in ("global", "cross", "global_frequency") and not s.scale > 0:
            raise ValueError(f"H2TF distance {name!r}: zero spread (every training sample sits on its class "
                             "prototype, so the global mean distance is 0)")
        if name in ("global", "cross"):
            tables["factor"] = torch.full((s.num_classes,), 1.0 / s.scale, dtype=dtype)
        elif name == "class_spread":
            zero = torch.nonzero(self.present & ~(s.spreads > 0)).flatten().tolist()
            if zero:
                raise ValueError(f"H2TF distance 'class_spread': zero spread for class(es) {zero[:10]} (one training "
                                 "sample, or identical ones); choose another distance")
            tables["factor"] = 1.0 / s.spreads
        elif name == "frequency":
            tables["offset"] = self._log_frequency().to(dtype)
        elif name == "global_frequency":
            tables["factor"] = ((1.0 + self._log_frequency()) / s.scale).to(dtype)
        else:  # pair
            tables["pair"] = self._pair_table()
        return tables

    def _pair_table(self) -> torch.Tensor:
        """``(K, K)`` prototype distances over their mean across distinct present pairs; NaN for absent classes."""
        idx = torch.nonzero(self.present).flatten()
        if idx.numel() < 2:
            raise ValueError("H2TF distance 'pair' needs prototypes of at least two classes")
        protos = self.stats.prototypes[idx]
        dist = torch.linalg.vector_norm(protos.unsqueeze(1) - protos.unsqueeze(0), dim=2)
        mean = dist.sum() / (idx.numel() * (idx.numel() - 1))
        if not bool(mean > 0):
            raise ValueError("H2TF distance 'pair': zero spread (all class prototypes coincide)")
        k = self.stats.num_classes
        table = torch.full((k, k), math.nan, dtype=protos.dtype)
        table[idx.unsqueeze(1), idx.unsqueeze(0)] = dist / mean
        return table

    def _tables(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        key = (device, dtype)
        if key not in self._moved:  # once per device/dtype, not on every batch
            self._moved[key] = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
                                for k, v in self._base.items()}
        return self._moved[key]

    def _labels(self, labels: torch.Tensor | None, batch: int, which: str, present: torch.Tensor) -> torch.Tensor:
        if labels is None:
            raise ValueError(f"H2TF distance {self.distance!r} needs the {which} labels")
        if labels.shape != (batch,):
            raise ValueError(f"{tuple(labels.shape)} {which} labels for a batch of {batch}")
        labels = labels.long()
        if not self.all_present and not bool(present[labels].all()):
            raise ValueError(f"H2TF: a {which} sample's class has no prototype (no training samples of that class)")
        return labels

    def distances(self, fused: torch.Tensor, labels: torch.Tensor, fusing: torch.Tensor | None = None,
                  fusing_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The candidate's distance ``d`` per sample of the batch, ``(B,)``, in ``fused``'s dtype."""
        batch = fused.shape[0]
        t = self._tables(fused.device, fused.dtype)
        labels = self._labels(labels, batch, "fused", t["present"])
        if self.distance == "pair":
            return t["pair"][labels, self._labels(fusing_labels, batch, "fusing", t["present"])]
        if self.distance == "frequency":
            return t["offset"].index_select(0, labels)
        source = fused
        if self.distance == "cross":
            if fusing is None or fusing.shape != fused.shape:
                raise ValueError("H2TF distance 'cross' needs the fusing features, shaped like the fused ones")
            source = fusing
        source = source.flatten(1)
        if source.shape[1] != t["prototypes"].shape[1]:
            raise ValueError(f"features of width {source.shape[1]} against prototypes of width "
                             f"{t['prototypes'].shape[1]}: H2TF distances need pooled features")
        norm = torch.linalg.vector_norm(source - t["prototypes"].index_select(0, labels), dim=1)
        return norm * t["factor"].index_select(0, labels)

    def ratios(self, fused: torch.Tensor, labels: torch.Tensor, fusing: torch.Tensor | None = None,
               fusing_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Keep ratios ``ρ ∈ (0.2, 1]`` per sample (checked: no NaN, negative or infinite distance)."""
        with torch.no_grad():
            return h2tf_ratio(self.distances(fused, labels, fusing, fusing_labels), self.mapping)

    def precompute(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-row keep ratios ``(N,)`` float32 of cached training features, for ``fused_rho=`` (row-wise only).

        Computed exactly as the on-the-fly path computes them from float32 features, in chunks of rows.
        """
        if not self.row_wise:
            raise ValueError(f"H2TF distance {self.distance!r} depends on the fusing sample, so it cannot be fixed "
                             f"per row; precompute supports {list(H2TF_ROW_WISE)}")
        labels = _check_features(features, labels, self.stats.num_classes)
        out = torch.empty(features.shape[0], dtype=torch.float32, device=features.device)
        for start in range(0, features.shape[0], _CHUNK):
            rows = slice(start, start + _CHUNK)
            out[rows] = self.ratios(features[rows].float(), labels[rows])
        return out

    def _given_rho(self, fused_rho: torch.Tensor, fused: torch.Tensor) -> torch.Tensor:
        """Precomputed per-row ratios, checked against this distance and batch, on ``fused``'s dtype and device."""
        if not self.row_wise:
            raise ValueError(f"fused_rho given, but H2TF distance {self.distance!r} is not fixed per row")
        if fused_rho.shape != (fused.shape[0],):
            raise ValueError(f"fused_rho of shape {tuple(fused_rho.shape)} for a batch of {fused.shape[0]}")
        return fused_rho.to(device=fused.device, dtype=fused.dtype)

    def fuse(self, fused: torch.Tensor, fusing: torch.Tensor, labels: torch.Tensor, channel_dim: int = -1, *,
             fused_rho: torch.Tensor | None = None,
             fusing_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fused_features, rho)``. With ``fused_rho`` (rows of :meth:`precompute`) nothing is recomputed."""
        _check_pair(fused, fusing)
        if fused_rho is None:
            rho = self.ratios(fused.detach(), labels, fusing.detach(), fusing_labels)
        else:
            rho = self._given_rho(fused_rho, fused)
        return h2tf_apply(fused, fusing, rho, self.mode, channel_dim=channel_dim, generator=self.generator), rho

    def fuse_stored(self, fused: torch.Tensor, fusing: torch.Tensor, labels: torch.Tensor, *,
                    fused_rho: torch.Tensor | None = None,
                    fusing_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Fused float32 features from cached rows ``(B, C)`` in their stored dtype (the cached stage-2 step).

        ρ is computed from float32 values as always. The fusion itself runs in the storage dtype and is converted
        once: for ``"interpolate"`` the result is the float32 ``lerp`` (with ρ rounded to that dtype) rounded to
        the cache's precision, at most half a unit in its last place, the rounding every cached row already
        carries; ``"replace"`` copies values and is exact. On a float16 cache this reads the two halves and
        writes one float32 tensor instead of making two float32 copies first, which is most of the step's
        overhead over a plain head step (benchmarks/speed_stage2.py); a float32 cache takes the ordinary path.
        """
        if fused.dtype == torch.float32 or not fused.dtype.is_floating_point:
            return self(fused.float(), fusing.float(), labels, -1, fused_rho=fused_rho, fusing_labels=fusing_labels)
        _check_pair(fused, fusing)
        if fused_rho is None:
            rho = self.ratios(fused.float(), labels, fusing.float(), fusing_labels).to(fused.device, fused.dtype)
        else:
            rho = self._given_rho(fused_rho, fused)
        return h2tf_apply(fused, fusing, rho, self.mode, channel_dim=-1, generator=self.generator).float()

    def __call__(self, fused: torch.Tensor, fusing: torch.Tensor, labels: torch.Tensor, channel_dim: int = -1, *,
                 fused_rho: torch.Tensor | None = None, fusing_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The fused features only: the ``Fuse`` signature ``(fused, fusing, labels, channel_dim)`` of the steps."""
        return self.fuse(fused, fusing, labels, channel_dim, fused_rho=fused_rho, fusing_labels=fusing_labels)[0]


class PIF(nn.Module):
    """Permutation-invariant fusion layer (PI-H2T, stage 1).

    Every channel value ``x`` at a position is paired with a set statistic ``s`` of all channels at that position
    (the mean in the official fragment) and mapped through one shared point-wise function
    ``φ(x, x − s)``: 2 → hidden → 1. The same ``φ`` for every channel makes the layer equivariant to channel
    permutations (a DeepSets layer), so any later pooling over positions gives a permutation-invariant summary.

    With ``activation=None`` ``φ`` is affine, as in the fragment (2→4→2→1, 25 parameters). ``mode="residual"``
    adds ``φ`` to ``x`` and zero-initialises the last layer, so a pretrained backbone starts unchanged [RECON].
    """

    def __init__(
        self,
        hidden: list[int] | tuple[int, ...] = (4, 2),
        activation: str | None = None,
        mode: str = "replace",
        statistic: str = "mean",
    ) -> None:
        super().__init__()
        if mode not in ("replace", "residual"):
            raise ValueError(f"PIF mode must be 'replace' or 'residual', got {mode!r}")
        if statistic not in ("mean", "max"):
            raise ValueError(f"PIF statistic must be 'mean' or 'max', got {statistic!r}")
        acts = {None: None, "relu": nn.ReLU, "gelu": nn.GELU}
        if activation not in acts:
            raise ValueError(f"PIF activation must be one of {list(acts)}, got {activation!r}")
        widths = [2, *hidden, 1]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if activation is not None and i < len(widths) - 2:
                layers.append(acts[activation]())
        self.phi = nn.Sequential(*layers)
        self.mode = mode
        self.statistic = statistic
        if mode == "residual":
            nn.init.zeros_(self.phi[-1].weight)
            nn.init.zeros_(self.phi[-1].bias)

    def forward(self, x: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"PIF needs (B, C, ...) features, got shape {tuple(x.shape)}")
        if self.statistic == "mean":
            stat = x.mean(dim=channel_dim, keepdim=True)
        else:
            stat = x.amax(dim=channel_dim, keepdim=True)
        z = torch.stack((x, x - stat), dim=-1)  # (..., 2) per element
        out = self.phi(z).squeeze(-1)
        return x + out if self.mode == "residual" else out


__all__ = [
    "h2t_channel_subset",
    "h2t_fuse",
    "h2tf_ratio",
    "h2tf_apply",
    "h2tf_fuse",
    "class_prototypes",
    "class_stats",
    "ClassStats",
    "H2TFusion",
    "H2TF_DISTANCES",
    "H2TF_MAPPINGS",
    "H2TF_MODES",
    "H2TF_ROW_WISE",
    "PrototypeDistance",
    "PIF",
]
