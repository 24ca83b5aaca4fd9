"""Per-epoch learning-rate schedules as ``torch.optim.lr_scheduler.LambdaLR``: the optimiser's lr is the peak.

The training loop steps a scheduler once per epoch; stage 1 and the methods' recipes pick one of these. They live
below both (no training or method import) because a method declares its schedule and the loop applies it.

``LambdaLR`` sets ``lr = peak · factor(epoch)``, a closed form of the epoch, so a resumed run that replays the
scheduler to its epoch gets exactly the learning rate the uninterrupted run had. The factors are written so that
``peak · factor`` is bitwise the per-epoch formula the recipes state (``tests/test_schedules.py``):

* cosine: ``peak · ½(1 + cos(π e / E))`` for ``e = 0..E−1`` (the last epoch does not reach 0);
* warm-up then steps: ``peak · ((e + 1) / W)`` for the first ``W`` epochs, then ``peak · γ^k`` after the k-th
  milestone.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["cosine_factor", "cosine_schedule", "warmup_multistep_factor", "warmup_multistep_schedule"]


def cosine_factor(epochs: int) -> Callable[[int], float]:
    """``½(1 + cos(π e / E))``: the H2T / cRT stage-2 and the stage-1 schedule, per epoch."""
    return lambda e: 0.5 * (1.0 + math.cos(math.pi * e / max(epochs, 1)))


def warmup_multistep_factor(warmup: int, milestones: Iterable[int], gamma: float = 0.1) -> Callable[[int], float]:
    """Linear warm-up ``(e + 1) / W`` for ``W`` epochs, then ``γ^k`` after the k-th milestone epoch (LDAM-DRW)."""
    ms = sorted(milestones)

    def factor(e: int) -> float:
        if e < warmup:
            return (e + 1) / warmup
        return gamma ** sum(e >= m for m in ms)

    return factor


def cosine_schedule(optimizer: Optimizer, epochs: int) -> LambdaLR:
    """Cosine per epoch from the optimiser's lr (the peak) to near 0 at the last epoch."""
    return LambdaLR(optimizer, cosine_factor(epochs))


def warmup_multistep_schedule(optimizer: Optimizer, warmup: int, milestones: Iterable[int],
                              gamma: float = 0.1) -> LambdaLR:
    """Linear warm-up for ``warmup`` epochs, then ×``gamma`` at each milestone epoch, from the optimiser's lr."""
    return LambdaLR(optimizer, warmup_multistep_factor(warmup, milestones, gamma))
