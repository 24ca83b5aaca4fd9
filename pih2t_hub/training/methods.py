"""Methods by name: what each one changes in the single training loop.

A method is data, not a fork of the loop: which sampler stage 2 draws from, which loss it optimises, whether the
head is re-initialised or reduced to learnable scales, which fusion (if any) acts on the features, and whether
stage 1 inserts PIF. The loop reads a ``MethodSpec`` and plugs the pieces in.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class MethodSpec:
    """What a method changes. ``fusion`` is ``None``, ``"h2t"`` or ``"h2tf"``; ``sampler`` is the stage-2 sampler."""

    name: str
    paper: str
    changes: str
    loss: str = "ce"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    sampler: str = "instance"  # instance | balanced | sqrt | progressive | dual
    fusion: str | None = None
    reinit_head: bool = False
    lws: bool = False
    tau_norm: bool = False
    stage1_pif: bool = False
    stage2: bool = True  # False: the method is post-hoc / needs no stage-2 training


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in [
        MethodSpec("ce", "—", "nothing: cross-entropy, instance sampling (the baseline)"),
        MethodSpec("crt", "Kang et al., ICLR 2020", "head re-initialised and retrained with class-balanced sampling",
                   sampler="balanced", reinit_head=True),
        MethodSpec("lws", "Kang et al., ICLR 2020", "head frozen; per-class scales learnt with class-balanced sampling",
                   sampler="balanced", lws=True),
        MethodSpec("tau_norm", "Kang et al., ICLR 2020", "head weights divided by ||w_c||^τ, τ chosen on validation",
                   tau_norm=True, stage2=False),
        MethodSpec("balanced_softmax", "Ren et al., NeurIPS 2020", "loss: logits + log n_c", loss="balanced_softmax"),
        MethodSpec("logit_adjusted", "Menon et al., ICLR 2021", "loss: logits + τ log prior", loss="logit_adjusted"),
        MethodSpec("ldam_drw", "Cao et al., NeurIPS 2019", "loss: label-distribution-aware margins + deferred "
                   "re-weighting", loss="ldam_drw"),
        MethodSpec("focal", "Lin et al., ICCV 2017", "loss: focal (γ = 2)", loss="focal"),
        MethodSpec("cb", "Cui et al., CVPR 2019", "loss weights by effective number", loss="cb"),
        MethodSpec("harmonized", "Zhang et al., ICASSP 2022 [RECON]", "loss: intra/inter-category gradient "
                   "harmonisation", loss="harmonized"),
        MethodSpec("h2t", "Li et al., AAAI 2024", "features: head-to-tail channel replacement (p) on a dual-branch "
                   "sampler", sampler="dual", fusion="h2t"),
        MethodSpec("h2t_bsm", "Li et al., AAAI 2024 + Ren et al.", "H2T fusion with the balanced-softmax loss",
                   sampler="dual", fusion="h2t", loss="balanced_softmax"),
        MethodSpec("pi-h2t", "Li et al., arXiv 2506.00625 [RECON]", "stage 1: PIF layer; stage 2: H2TF fusion with a "
                   "distance-derived ratio", sampler="dual", fusion="h2tf", stage1_pif=True),
        MethodSpec("dlsa", "Xu et al., ECCV 2022", "classifier: flow-based likelihood filtering + cluster-aided and "
                   "regular classifiers on cached features", stage2=False),
    ]
}


def get_method(name: str, **overrides: Any) -> MethodSpec:
    """The spec of a method by name (``pi_h2t`` and ``pi-h2t`` are the same); unknown names list close ones."""
    key = name.strip().lower().replace("pi_h2t", "pi-h2t").replace("h2t+bsm", "h2t_bsm")
    if key not in METHODS:
        close = difflib.get_close_matches(key, list(METHODS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}.{hint}")
    spec = METHODS[key]
    return replace(spec, **overrides) if overrides else spec


__all__ = ["MethodSpec", "METHODS", "get_method"]
