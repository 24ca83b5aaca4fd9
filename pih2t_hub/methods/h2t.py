"""H2T (Li et al., AAAI 2024): head-to-tail fusion of feature channels during classifier retraining."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..models.pih2t.fusion import h2t_fuse
from .base import Fuse, Method, Stage2Context, register_method
from .ce import H2T_RECIPE


class ChannelReplacement:
    """H2T's fusion with a fixed ratio and channel-draw generator, in the training steps' ``Fuse`` form."""

    def __init__(self, ratio: float, generator: torch.Generator | None) -> None:
        self.ratio, self.generator = ratio, generator

    def __call__(self, fused: torch.Tensor, fusing: torch.Tensor, labels: torch.Tensor,
                 channel_dim: int) -> torch.Tensor:
        return h2t_fuse(fused, fusing, self.ratio, channel_dim=channel_dim, generator=self.generator)[0]

    def fuse_stored(self, fused: torch.Tensor, fusing: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cached rows fused in their stored dtype, then converted once: a replacement copies values, so this is
        exactly the float32 result with one conversion instead of two (the same channel draws)."""
        return self(fused, fusing, labels, -1).float()


@dataclass(frozen=True)
class H2TParams:
    """H2T's knob: ``fusion_ratio`` p, the fraction of channels replaced, in [0, 1] (0.25 in the paper's CIFAR
    recipe; ``--fusion-ratio`` is an alias)."""

    fusion_ratio: float = 0.25

    def __post_init__(self) -> None:
        p = self.fusion_ratio
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:  # NaN fails too
            raise ValueError(f"fusion_ratio must lie in [0, 1], got {p!r}")
        object.__setattr__(self, "fusion_ratio", float(p))


@register_method("h2t")
class H2T(Method):
    """A random ⌊p·C⌋ channel subset of each fused-branch (class-balanced) sample is replaced by the channels of a
    fusing-branch (instance-sampled, so mostly head) sample; any loss can be trained on the fused features
    (``--loss``), as the paper does for "X + H2T"."""

    paper = "Li et al., Feature Fusion from Head to Tail for Long-Tailed Visual Recognition, AAAI 2024"
    summary = "channels of head-class features replace a random ⌊p·C⌋ subset in tail-class features (ratio p)"
    recipe = H2T_RECIPE
    sampler = "dual"
    fusion_site = "map"
    Params = H2TParams

    def make_fusion(self, ctx: Stage2Context) -> Fuse:
        return ChannelReplacement(self.params.fusion_ratio, ctx.generator)

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        return {**super().search_space(trial),
                "method_kwargs": {"fusion_ratio": trial.suggest_float("fusion_ratio", 0.05, 0.6)}}
