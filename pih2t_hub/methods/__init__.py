"""Long-tailed methods as plug-ins: one module per method, each registering itself with ``@register_method``.

``get_method(name)`` returns the method's class; ``list_methods()`` the registered names. A method of your own is a
subclass of :class:`Method` in one module: imported before the run, or declared by an installed package in the
``pih2t_hub.methods`` entry-point group so that ``--method NAME`` finds it (docs/methods.md shows a worked example).
The built-ins are imported here, so they never depend on the installed metadata.
"""

from __future__ import annotations

from . import (  # noqa: F401  (importing a method module registers it)
    balanced_softmax,
    cb,
    ce,
    crt,
    focal,
    h2t,
    h2t_bsm,
    harmonized,
    ldam_drw,
    logit_adjusted,
    lws,
    ncm,
    pi_h2t,
    tau_norm,
)
from .base import (
    Method,
    MethodConfig,
    Recipe,
    Stage2Context,
    fusion_methods,
    get_method,
    list_methods,
    register_method,
)
from .dlsa import method as _dlsa_method  # noqa: F401
from .params import NoParams

__all__ = ["Method", "MethodConfig", "NoParams", "Recipe", "Stage2Context", "fusion_methods",
           "get_method", "list_methods", "register_method"]
