"""The method registry: built-ins register with ``@register_method``, other packages through entry points.

A package that ships a method declares it in its metadata, in the ``pih2t_hub.methods`` entry-point group::

    [project.entry-points."pih2t_hub.methods"]
    mine = "my_package.mine:Mine"        # a pih2t_hub.methods.Method subclass

and ``--method mine`` works from the command line and in the comparison once the package is installed. The
command line checks the name against the metadata before importing torch (:mod:`pih2t_hub._names`); the class
itself is imported the first time the registry is asked (:func:`get_method`, :func:`list_methods`). The built-in
methods are imported by :mod:`pih2t_hub.methods` itself (and listed as entry points too), so they never depend on
the installed metadata.

This module imports no torch and no method: the registry sits under the interface (:mod:`.base`).
"""

from __future__ import annotations

from typing import Callable

from .._names import method_entry_points
from .._names import method_key as _key
from .._names import unknown_method_message

__all__ = ["register_method", "get_method", "list_methods", "fusion_methods", "load_entry_points"]

_METHODS: dict[str, type] = {}
_BROKEN: dict[str, str] = {}  # plug-in names whose import failed, with the one-line reason
_LOADED = False


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator: ``@register_method("crt") class CRT(Method): ...`` makes ``--method crt`` work."""

    def deco(cls: type) -> type:
        from .base import Method

        key = _key(name)
        if key in _METHODS and _METHODS[key] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[key].__module__}")
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"{getattr(cls, '__name__', cls)!r} must subclass pih2t_hub.methods.Method")
        cls.name = name
        _METHODS[key] = cls
        return cls

    return deco


def load_entry_points() -> None:
    """Import the methods installed packages declare (once). A plug-in that fails to import does not stop the
    others; asking for it by name raises its error (:func:`get_method`)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for ep in method_entry_points():
        key = _key(ep.name)
        if key in _METHODS:  # a built-in (listed as an entry point too), or registered on import
            continue
        try:
            obj = ep.load()
            if key not in _METHODS:  # the class did not register itself under this name: the entry point names it
                register_method(ep.name)(obj)
        except Exception as err:  # noqa: BLE001 - any failure of a third-party import is reported by name
            dist = getattr(getattr(ep, "dist", None), "name", None) or ep.value
            _BROKEN[key] = (f"method plug-in {ep.name!r} ({ep.value}, from {dist}) cannot be loaded: "
                            f"{type(err).__name__}: {' '.join(str(err).split())}")


def get_method(name: str) -> type:
    """The method class by name (``pi-h2t``, ``pi_h2t`` and ``PI-H2T`` are one); unknown names list close ones."""
    load_entry_points()
    key = _key(name)
    if key in _BROKEN and key not in _METHODS:
        raise ValueError(_BROKEN[key])
    if key not in _METHODS:
        raise ValueError(unknown_method_message(name, list_methods()))
    return _METHODS[key]


def list_methods(trainable: bool | None = None) -> list[str]:
    """Registered method names, sorted; ``trainable=True``/``False`` keeps only those with/without a recipe."""
    load_entry_points()
    return sorted(cls.name for cls in _METHODS.values()
                  if trainable is None or (cls.recipe is not None) == trainable)


def fusion_methods() -> list[str]:
    """Fusion methods that train any loss ("X + H2T"), sorted: what the comparison pairs with the best loss."""
    classes = [get_method(name) for name in list_methods()]
    return [cls.name for cls in classes if cls.fusion_site is not None and not cls.loss_is_fixed]
