"""Ask once whether ``lomo_optim`` is installed, instead of on every optimisation step.

accelerate's prepared optimiser checks ``is_lomo_available()`` twice per ``step()`` (LOMO optimisers fuse backward
and step). Each check is an ``importlib.util.find_spec`` scan of ``sys.path``; on a linear head over cached
features that is about 18 % of a whole stage-2 trial on the CPU (measured by profiling a tuning trial). Whether a
package is installed does not change while a run trains, so the answer is memoised where accelerate looks it up;
nothing else about accelerate changes, and a version without these names is left alone.
"""

from __future__ import annotations

import functools

#: accelerate's modules that call the check in their per-step code paths
_CALLERS = ("accelerate.optimizer", "accelerate.accelerator")


def memoise_lomo_check() -> None:
    """Replace accelerate's per-call ``is_lomo_available`` with a memoised one (idempotent)."""
    import importlib

    memos: dict[int, object] = {}  # one memo per underlying function: the modules share their answer
    for name in _CALLERS:
        module = importlib.import_module(name)
        check = getattr(module, "is_lomo_available", None)
        if callable(check) and not hasattr(check, "cache_info"):
            module.is_lomo_available = memos.setdefault(id(check), functools.cache(check))


__all__ = ["memoise_lomo_check"]
