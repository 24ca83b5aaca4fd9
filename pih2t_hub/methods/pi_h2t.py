"""PI-H2T (Li et al., arXiv 2506.00625): permutation-invariant fusion in stage 1, adaptive H2TF in stage 2.

No public code exists: this is the project's reconstruction from the paper's abstract and a published fragment
(docs/methods.md says which parts are reconstructed). Stage 1 inserts the PIF layer when the backbone is
fine-tuned; stage 2 interpolates pooled features of the two branches with a per-sample ratio derived from the
fused sample's distance to its class prototype, so no fusion ratio has to be set by hand.
"""

from __future__ import annotations

from typing import Any

from ..models.pih2t.fusion import PrototypeDistance, class_prototypes, h2tf_fuse
from .base import Fuse, Method, Stage2Context, register_method
from .ce import H2T_RECIPE


@register_method("pi-h2t")
class PIH2T(Method):
    paper = "Li et al., Permutation-Invariant Head-to-Tail Feature Fusion, arXiv 2506.00625 (reconstruction)"
    summary = "stage 1: PIF layer; stage 2: H2TF fusion with a distance-derived ratio (no hand-set p)"
    recipe = H2T_RECIPE
    sampler = "dual"
    fusion_site = "pooled"
    stage1_pif = True
    needs_features = True  # class prototypes come from the stage-1 train features

    def make_fusion(self, ctx: Stage2Context) -> Fuse:
        if ctx.train_features is None:
            raise ValueError("PI-H2T needs the stage-1 train features for its class prototypes")
        x, y = ctx.train_features
        dist = PrototypeDistance(*class_prototypes(x.float(), y, ctx.num_classes))
        mode, gen = self.cfg.h2tf_mode, ctx.generator
        return lambda f, g, yy, cd: h2tf_fuse(f, g, yy, dist, mode=mode, channel_dim=cd, generator=gen)[0]

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        return {**super().search_space(trial),
                "h2tf_mode": trial.suggest_categorical("h2tf_mode", ["interpolate", "replace"])}
