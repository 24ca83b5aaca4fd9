"""Stage-2 feature paths: what the head sees in the online and in the cached mode.

Both return the *pooled, fused* features of a dual-branch batch; the head and the loss are applied by the caller.
Keeping them side by side makes the claim testable that, for a channel-wise pooling (GAP, CLS token) and a linear
or cosine head, the cached path computes exactly the online path with an eval-mode backbone (docs/methods.md).
"""

from __future__ import annotations

from typing import Any, Callable, get_args

import torch

from ..methods.base import FusionSite

Fuse = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def online_fused_features(
    backbone: torch.nn.Module,
    fused_images: torch.Tensor,
    fusing_images: torch.Tensor | None,
    labels: torch.Tensor,
    fuse: Fuse | None,
    fusion_site: FusionSite | None,
    shift_bn: bool,
) -> torch.Tensor:
    """The faithful recipe: forward the two branches *separately* through the frozen backbone, fuse, pool.

    ``shift_bn=True`` runs the backbone in train mode without gradients: each branch is normalised with its own
    batch statistics and BN running statistics are re-estimated (MiSLAS's shift learning on BN). ``fusion_site``
    is the method's: ``"map"`` fuses the un-pooled features (H2T), ``"pooled"`` the pooled vectors (H2TF, as in the
    published fragment); any other value is refused (a misspelt site once fused pooled vectors unnoticed).
    """
    if fusion_site is not None and fusion_site not in get_args(FusionSite):
        raise ValueError(f"fusion_site must be one of {get_args(FusionSite)} or None, got {fusion_site!r}")
    backbone.train(shift_bn)
    with torch.no_grad():
        ff = backbone.forward_features(fused_images)
        if fuse is None or fusing_images is None:
            return backbone.pool(ff)
        fg = backbone.forward_features(fusing_images)
        if fusion_site == "map":
            return backbone.pool(fuse(ff, fg, labels, backbone.channel_dim(ff)))
        return fuse(backbone.pool(ff), backbone.pool(fg), labels, -1)


def cached_fused_features(
    fused: torch.Tensor, fusing: torch.Tensor | None, labels: torch.Tensor, fuse: Fuse | None, **fuse_kwargs: Any
) -> torch.Tensor:
    """The cached path: fuse pooled vectors read from the feature cache (channels on the last dim), as float32.

    ``fuse_kwargs`` go to the fusion (e.g. H2TF's precomputed ``fused_rho``). A fusion with a ``fuse_stored``
    method receives the rows in the cache's own dtype and converts once, after fusing: on a half-precision cache
    that saves two float32 copies per step (see :meth:`~pih2t_hub.models.pih2t.fusion.H2TFusion.fuse_stored`).
    """
    if fuse is None or fusing is None:
        return fused.float()
    fuse_stored = getattr(fuse, "fuse_stored", None)
    if fuse_stored is not None:
        return fuse_stored(fused, fusing, labels, **fuse_kwargs)
    return fuse(fused.float(), fusing.float(), labels, -1, **fuse_kwargs)


__all__ = ["online_fused_features", "cached_fused_features"]
