"""The training loop asks importlib about ``lomo_optim`` once, not on every optimisation step."""

from __future__ import annotations

import importlib.util

import accelerate.accelerator
import accelerate.optimizer
import accelerate.utils.imports
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from pih2t_hub.schedules import cosine_schedule
from pih2t_hub.training.loop import train_loop


def test_lomo_check_is_asked_once_and_answers_as_importlib(monkeypatch) -> None:
    original = accelerate.utils.imports.is_lomo_available
    for module in (accelerate.optimizer, accelerate.accelerator):  # un-memoised, as a fresh process has it
        monkeypatch.setattr(module, "is_lomo_available", original)
    real_find_spec, asked = importlib.util.find_spec, []

    def counting_find_spec(name, *args, **kwargs):
        if name == "lomo_optim":
            asked.append(name)
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", counting_find_spec)
    acc = Accelerator(cpu=True)
    head = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    head, opt, loader = acc.prepare(head, opt, DataLoader(TensorDataset(x, y), batch_size=8))
    asked.clear()  # prepare asks once itself; what counts is the loop
    state = train_loop(acc, trainable=head, optimizer=opt, loader=loader,
                       step=lambda b: torch.nn.functional.cross_entropy(head(b[0]), b[1]), epochs=2,
                       lr_scheduler=cosine_schedule(opt, 2), progress=False)
    assert state.global_step == 10
    assert len(asked) == 1  # two per step (20 here) without the memo
    installed = real_find_spec("lomo_optim") is not None
    assert bool(accelerate.optimizer.is_lomo_available()) is installed  # accelerate answers None for "no"
    assert bool(accelerate.accelerator.is_lomo_available()) is installed
