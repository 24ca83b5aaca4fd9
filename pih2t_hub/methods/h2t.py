"""H2T (Li et al., AAAI 2024): head-to-tail fusion of feature channels during classifier retraining."""

from __future__ import annotations

from typing import Any

from ..models.pih2t.fusion import h2t_fuse
from .base import Fuse, Method, Stage2Context, register_method
from .ce import H2T_RECIPE


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

    def make_fusion(self, ctx: Stage2Context) -> Fuse:
        ratio, gen = float(self.cfg.fusion_ratio), ctx.generator
        return lambda f, g, y, cd: h2t_fuse(f, g, ratio, channel_dim=cd, generator=gen)[0]

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        return {**super().search_space(trial), "fusion_ratio": trial.suggest_float("fusion_ratio", 0.05, 0.6)}
