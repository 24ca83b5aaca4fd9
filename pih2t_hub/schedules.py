"""Per-epoch learning-rate schedules as ``torch.optim.lr_scheduler`` schedulers: the optimiser's lr is the peak.

The training loop steps a scheduler once per epoch; stage 1 and the methods' recipes pick one of these. They live
below both (no training or method import) because a method declares its schedule and the loop applies it.

Both are closed forms of the epoch, so a resumed run that replays the scheduler to its epoch gets exactly the
learning rate the uninterrupted run had, and both are bitwise the per-epoch formulas the recipes state
(``tests/test_schedules.py``):

* cosine, a ``LambdaLR``: ``peak · ½(1 + cos(π e / E))`` for ``e = 0..E−1`` (the last epoch does not reach 0);
* warm-up then steps, :class:`WarmupMultiStepLR`: ``peak · (e + 1) / W`` for the first ``W`` epochs, then
  ``peak · γ^k`` after the k-th milestone. A ``LambdaLR`` would compute ``peak · ((e + 1) / W)``, which rounds
  differently in the last bit, and torch's chainable ``LinearLR`` / ``MultiStepLR`` multiply step by step.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

__all__ = ["WarmupMultiStepLR", "cosine_factor", "cosine_schedule", "warmup_multistep_schedule"]


def cosine_factor(epochs: int) -> Callable[[int], float]:
    """``½(1 + cos(π e / E))``: the H2T / cRT stage-2 and the stage-1 schedule, per epoch."""
    return lambda e: 0.5 * (1.0 + math.cos(math.pi * e / max(epochs, 1)))


class WarmupMultiStepLR(LRScheduler):
    """Linear warm-up ``peak · (e + 1) / W`` for ``W`` epochs, then ``peak · γ^k`` after the k-th milestone epoch
    (LDAM-DRW's CIFAR recipe), computed in closed form from the epoch."""

    def __init__(self, optimizer: Optimizer, warmup: int, milestones: Iterable[int], gamma: float = 0.1,
                 last_epoch: int = -1) -> None:
        self.warmup, self.milestones, self.gamma = int(warmup), sorted(int(m) for m in milestones), float(gamma)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        e = self.last_epoch
        if e < self.warmup:
            return [base * (e + 1) / self.warmup for base in self.base_lrs]
        return [base * self.gamma ** sum(e >= m for m in self.milestones) for base in self.base_lrs]


def cosine_schedule(optimizer: Optimizer, epochs: int) -> LambdaLR:
    """Cosine per epoch from the optimiser's lr (the peak) to near 0 at the last epoch."""
    return LambdaLR(optimizer, cosine_factor(epochs))


def warmup_multistep_schedule(optimizer: Optimizer, warmup: int, milestones: Iterable[int],
                              gamma: float = 0.1) -> WarmupMultiStepLR:
    """Linear warm-up for ``warmup`` epochs, then ×``gamma`` at each milestone epoch, from the optimiser's lr."""
    return WarmupMultiStepLR(optimizer, warmup, milestones, gamma)
