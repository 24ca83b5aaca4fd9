"""The names ``--method`` and ``--loss`` accept, known without importing torch.

The method and loss registries live in modules that import torch (each method module defines ``nn.Module`` heads,
the losses are modules), which costs seconds. The command line checks a name before anything heavy is imported, so
the built-in names are also listed here, and ``tests/test_cli_errors.py`` checks that these lists are exactly what
the packages register. Methods of other installed packages are declared in the ``pih2t_hub.methods`` entry-point
group: their names are read from the packages' metadata, without importing them. Once :mod:`pih2t_hub.methods` /
:mod:`pih2t_hub.losses` are imported, the live registries answer instead, plug-ins included.
"""

from __future__ import annotations

import difflib
import sys

__all__ = ["BUILTIN_LOSSES", "BUILTIN_METHODS", "METHOD_ENTRY_POINTS", "check_loss", "check_method", "loss_key",
           "loss_names", "method_entry_points", "method_key", "method_names", "unknown_method_message"]

#: The entry-point group a package declares its methods in (``name = "module:Class"``).
METHOD_ENTRY_POINTS = "pih2t_hub.methods"

#: Every method ``pih2t_hub.methods`` registers (the name given to ``@register_method``).
BUILTIN_METHODS: tuple[str, ...] = (
    "balanced_softmax", "cb", "ce", "crt", "crt_progressive", "dlsa", "focal", "h2t", "h2t_bsm", "harmonized",
    "ldam_drw", "logit_adjusted", "logit_adjusted_posthoc", "lws", "ncm", "pi-h2t", "tau_norm",
)
#: Every loss ``pih2t_hub.losses`` registers (the name given to ``@register_loss``).
BUILTIN_LOSSES: tuple[str, ...] = (
    "balanced_softmax", "cb", "ce", "focal", "harmonized", "ldam", "ldam_drw", "logit_adjusted",
)


def method_key(name: str) -> str:
    """The registry key of a method name: ``pi-h2t``, ``pi_h2t`` and ``PI-H2T`` are one method."""
    return name.strip().lower().replace("-", "_").replace("+", "_")


def loss_key(name: str) -> str:
    """The registry key of a loss name (case-insensitive, ``-`` and ``_`` interchangeable)."""
    return name.strip().lower().replace("-", "_")


def _imported(module: str, attribute: str) -> object | None:
    """The module's ``attribute`` when the module is fully imported (not in the middle of its own import)."""
    mod = sys.modules.get(module)
    if mod is None or getattr(getattr(mod, "__spec__", None), "_initializing", False):
        return None
    return getattr(mod, attribute, None)


def method_entry_points() -> list:
    """The installed ``pih2t_hub.methods`` entry points (metadata only: nothing is imported), by name."""
    from importlib.metadata import entry_points

    return sorted(entry_points(group=METHOD_ENTRY_POINTS), key=lambda ep: ep.name)


def method_names() -> list[str]:
    """The method names, sorted: the live registry's when :mod:`pih2t_hub.methods` is imported, else the built-ins
    and the names installed packages declare as entry points."""
    live = _imported("pih2t_hub.methods", "list_methods")
    if callable(live):
        return list(live())
    names = {method_key(n): n for n in BUILTIN_METHODS}
    for ep in method_entry_points():
        names.setdefault(method_key(ep.name), ep.name)
    return sorted(names.values())


def loss_names() -> list[str]:
    """The loss names, sorted: the live registry's when :mod:`pih2t_hub.losses` is imported, else the built-ins."""
    live = _imported("pih2t_hub.losses", "list_losses")
    return list(live()) if callable(live) else sorted(BUILTIN_LOSSES)


def unknown_method_message(name: str, names: list[str]) -> str:
    """One line naming the unknown method, the valid ones and the closest matches."""
    close = difflib.get_close_matches(name.strip().lower(), names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return f"unknown method {name!r}; choose from {', '.join(names)}.{hint}"


def check_method(name: str) -> None:
    """Raise ``ValueError`` (the registry's message) unless ``name`` is a method."""
    names = method_names()
    if method_key(name) not in {method_key(n) for n in names}:
        raise ValueError(unknown_method_message(name, names))


def check_loss(name: str) -> None:
    """Raise ``ValueError`` naming the valid losses unless ``name`` is one."""
    names = loss_names()
    if loss_key(name) not in {loss_key(n) for n in names}:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(names)}")
