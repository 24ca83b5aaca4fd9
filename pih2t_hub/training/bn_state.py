"""Checkpointable BN statistics of a frozen backbone, for stage 2 with shift-BN (statistics re-estimated online).

A head chosen on validation was scored with the statistics of its own epoch, so those are the ones the saved model
must carry; and every rank re-estimates on its own shard, so the statistics are averaged across ranks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class BufferState:
    """Checkpoints a frozen module's buffers (BN running statistics re-estimated by shift-BN in stage 2 online)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: buf for name, buf in self.module.named_buffers()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        buffers = dict(self.module.named_buffers())
        if set(state) != set(buffers):
            raise KeyError(f"buffer names differ from the checkpoint: {sorted(set(state) ^ set(buffers))[:5]}")
        with torch.no_grad():
            for name, value in state.items():
                buffers[name].copy_(value)


class BufferSnapshots:
    """Float buffers (BN running statistics) of a module at the end of each epoch, checkpointable.

    Shift-BN re-estimates the frozen backbone's statistics every step; the head chosen on validation was scored
    with the statistics of its own epoch, so those are the ones the saved model must carry.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.saved: dict[int, dict[str, torch.Tensor]] = {}

    def take(self, epoch: int) -> None:
        self.saved[epoch] = {n: b.detach().cpu().clone() for n, b in self.module.named_buffers()
                             if b.is_floating_point()}

    def restore(self, epoch: int) -> None:
        if epoch not in self.saved:
            raise KeyError(f"no BN statistics were kept for epoch {epoch}")
        buffers = dict(self.module.named_buffers())
        with torch.no_grad():
            for name, value in self.saved[epoch].items():
                buffers[name].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"epochs": torch.tensor(sorted(self.saved), dtype=torch.int64)}
        for e, bufs in self.saved.items():
            out.update({f"{e}/{n}": b for n, b in bufs.items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.saved = {}
        for e in state["epochs"].tolist():
            prefix = f"{e}/"
            self.saved[e] = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def average_buffers(accelerator: Any, module: nn.Module) -> None:
    """Average float buffers across processes (each rank re-estimates shift-BN statistics on its own shard)."""
    if accelerator.num_processes == 1:
        return
    with torch.no_grad():
        for buf in module.buffers():
            if buf.is_floating_point():
                buf.copy_(accelerator.reduce(buf.detach().clone(), reduction="mean"))


__all__ = ["BufferState", "BufferSnapshots", "average_buffers"]
