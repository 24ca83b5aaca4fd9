"""Learning-rate schedules are ``torch.optim.lr_scheduler`` objects whose per-epoch values are bitwise the formulas
the recipes state (written out here, independently of ``pih2t_hub.schedules``)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from pih2t_hub.schedules import cosine_schedule, warmup_multistep_schedule


def _peaks() -> list[float]:
    """The recipes' peaks, the stage-1 default, and log-uniform draws over the comparison's lr range."""
    rng = random.Random(0)
    return [0.1, 0.02, 0.2, 0.005, 1.0, 1e-3] + [10 ** rng.uniform(-3, 0) for _ in range(200)]


def _stepped(make, peak: float, epochs: int) -> list[float]:
    """The lr of every epoch, stepped once per epoch after the optimiser as the training loop does."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=peak, momentum=0.9)
    sched = make(opt)
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        assert sched.get_last_lr()[0] == lrs[-1]
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("epochs", [1, 2, 4, 10, 30, 200])
def test_cosine_is_bitwise_the_per_epoch_formula(epochs: int) -> None:
    for peak in _peaks():
        formula = [peak * 0.5 * (1.0 + math.cos(math.pi * e / max(epochs, 1))) for e in range(epochs)]
        assert _stepped(lambda opt: cosine_schedule(opt, epochs), peak, epochs) == formula, peak


def test_cosine_hand_values() -> None:
    lrs = _stepped(lambda opt: cosine_schedule(opt, 4), 0.1, 4)  # 0.1 * (1 + cos(pi e / 4)) / 2
    assert lrs == pytest.approx([0.1, 0.0853553390593, 0.05, 0.0146446609407], rel=1e-10)


@pytest.mark.parametrize("epochs, warmup, fractions, gamma", [(200, 5, (0.8, 0.9), 0.01), (20, 5, (0.8, 0.9), 0.01),
                                                              (8, 2, (0.5, 0.75), 0.1), (3, 2, (0.8, 0.9), 0.01)])
def test_warmup_multistep_is_bitwise_the_per_epoch_formula(epochs, warmup, fractions, gamma) -> None:
    milestones = [max(1, round(f * epochs)) for f in fractions]
    for peak in _peaks():
        formula = [peak * (e + 1) / warmup if e < warmup else peak * gamma ** sum(e >= m for m in milestones)
                   for e in range(epochs)]
        got = _stepped(lambda opt: warmup_multistep_schedule(opt, warmup, milestones, gamma), peak, epochs)
        assert got == formula, peak


def test_warmup_multistep_hand_values() -> None:
    lrs = _stepped(lambda opt: warmup_multistep_schedule(opt, 2, [4, 6], gamma=0.1), 0.1, 8)
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rel=1e-12)


def test_a_resumed_scheduler_continues_from_its_state_dict() -> None:
    """The warm-up scheduler's state is torch's own (``state_dict`` / ``load_state_dict``)."""
    def make(opt):
        return warmup_multistep_schedule(opt, 3, [5], gamma=0.5)

    full = _stepped(make, 0.2, 8)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2)
    first = make(opt)
    for _ in range(4):
        opt.step()
        first.step()
    fresh_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2)
    fresh_opt.load_state_dict(opt.state_dict())
    second = make(fresh_opt)
    second.load_state_dict(first.state_dict())
    rest = []
    for _ in range(4):
        rest.append(second.get_last_lr()[0])
        fresh_opt.step()
        second.step()
    assert rest == full[4:]


def test_the_loop_records_and_resumes_the_schedule(tmp_path) -> None:
    """``train_loop`` steps the scheduler per epoch (its history records the formula's lr), and a run resumed
    from a mid-run checkpoint replays the scheduler to the resumed epoch: the same lrs as the uninterrupted run."""
    from accelerate import Accelerator

    from pih2t_hub.training.loop import StopAfterSteps, train_loop

    def run(out, stop=None, resume=False):
        torch.manual_seed(0)
        acc = Accelerator(cpu=True)
        model = nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
        x, y = torch.randn(12, 3), torch.arange(12) % 2
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
        model, opt, loader = acc.prepare(model, opt, loader)
        return train_loop(acc, trainable=model, optimizer=opt, loader=loader, epochs=5,
                          step=lambda b: nn.functional.cross_entropy(model(b[0]), b[1]),
                          lr_scheduler=cosine_schedule(opt, 5), checkpoint_dir=out, resume=resume, progress=False,
                          callbacks=[StopAfterSteps(stop)] if stop else [])

    full = run(tmp_path / "full")
    formula = [0.3 * 0.5 * (1.0 + math.cos(math.pi * e / 5)) for e in range(5)]
    assert [r["lr"] for r in full.history] == formula
    assert run(tmp_path / "cut", stop=8).stopped  # epoch 2, step 2
    resumed = run(tmp_path / "cut", resume=True)
    assert [r["lr"] for r in resumed.history] == formula
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
