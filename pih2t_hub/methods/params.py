"""A method's own knobs: a small frozen dataclass per method, read from ``--method-kwargs``.

The dataclass's fields are the method's parameters with their published defaults; ``__post_init__`` checks their
values. The training code never reads them: the method does, and it records them (they are the resolved
``method_kwargs`` in ``run_config.yaml`` and the card's hyper-parameters), so what is recorded is what ran.
An unknown key is refused in one line naming the valid ones, instead of being ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

__all__ = ["NoParams", "check_choice", "params_from", "params_dict"]


@dataclass(frozen=True)
class NoParams:
    """The parameters of a method that has none of its own (its optimiser values are the run's)."""


def params_from(params_cls: type, values: Mapping[str, Any] | None, method: str) -> Any:
    """``params_cls(**values)``; an unknown key is one ``ValueError`` line naming the method's valid keys."""
    values = dict(values or {})
    valid = [f.name for f in dataclasses.fields(params_cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        choices = ", ".join(valid) if valid else "none (the method has no parameters)"
        raise ValueError(f"unknown method_kwargs key(s) {', '.join(map(repr, unknown))} for method {method}; "
                         f"valid keys: {choices}")
    return params_cls(**values)


def params_dict(params: Any) -> dict[str, Any]:
    """The parameters as a plain mapping (what is recorded in the config and on the card)."""
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """One line naming the valid values when ``value`` is not one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
