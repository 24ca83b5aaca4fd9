"""What ran, as opposed to what was asked for: the values recorded in ``run_config.yaml``, the card and results.

``--mixed-precision fp16`` on a CPU ran in float32 while the card said fp16, and ``--image-size`` left unset (or,
before validation, 0) was recorded as given rather than as the resolution the transforms used. These helpers find
the values that actually took effect so the run records those.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from .config import RunConfig

__all__ = ["resolve_mixed_precision", "used_image_size", "recorded_config"]

_NAMES = {"float16": "fp16", "bfloat16": "bf16"}


def resolve_mixed_precision(accelerator: Any, requested: str) -> str:
    """The autocast dtype ``accelerator`` really applies (``"no"``, ``"fp16"`` or ``"bf16"``), with a warning when it
    is not the one requested.

    Measured, not assumed: a matrix product under ``accelerator.autocast()`` (the context ``prepare`` wraps model
    forwards in) on the accelerator's device. accelerate 1.x on CPU accepts fp16 and bf16 and computes in float32.
    """
    if requested == "no":
        return "no"
    import torch

    probe = torch.nn.Linear(2, 2).to(accelerator.device)
    with torch.no_grad(), accelerator.autocast():
        dtype = probe(torch.zeros(1, 2, device=accelerator.device)).dtype
    used = _NAMES.get(str(dtype).removeprefix("torch."), "no")
    if used != requested:
        warnings.warn(f"--mixed-precision {requested} is not supported on {accelerator.device.type}: the run computes "
                      f"in {'float32' if used == 'no' else used} and records mixed_precision={used!r}", stacklevel=2)
    return used


def used_image_size(data_config: dict[str, Any]) -> int | list[int]:
    """The input resolution the transforms are built with: an int for a square input, else ``[H, W]``."""
    height, width = (int(s) for s in data_config["input_size"][-2:])
    return height if height == width else [height, width]


def recorded_config(cfg: RunConfig, **used: Any) -> RunConfig:
    """``cfg`` with the values that took effect (e.g. ``image_size``, ``mixed_precision``) in place of the requested
    ones; keys whose value is ``None`` keep the requested value."""
    return dataclasses.replace(cfg, **{k: v for k, v in used.items() if v is not None})
