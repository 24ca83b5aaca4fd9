"""The one training loop, on ``accelerate``.

Stage 1 (end to end), stage 2 online (frozen backbone, two branches) and stage 2 on cached features all run
through :func:`train_loop`; they differ only in the ``step`` they pass (batch → loss), the optimiser's parameters
and the loader. The loop owns what they share: stepping the per-epoch learning-rate scheduler, gradient accumulation, progress bars on
the main process, validation-based model selection, sealed checkpoints every N steps and at each epoch end,
mid-epoch resume (``skip_first_batches``) and a checkpoint on Ctrl-C.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
import warnings
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import Dataset
from .._progress import progress_bar as tqdm  # live on a terminal, one line per epoch in a log

from .checkpoint import begin_checkpoint, latest_valid_checkpoint, seal_checkpoint, verify_checkpoint
from .interrupt import DeferredInterrupt
from .package_probe import memoise_lomo_check

BEST_WEIGHTS = "best_trainable.safetensors"
EXTRA_STATE = "extra_state_{rank}.safetensors"


class GeneratorState:
    """Makes a ``torch.Generator`` checkpointable (pass it in ``train_loop(extra_state=...)``).

    Fusion subsets and mixup draws come from this generator, so a resumed run redraws exactly what the
    uninterrupted run drew. Saved as safetensors by the loop (accelerate's ``register_for_checkpointing`` would
    pickle it and unpickle it on load).
    """

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["state"])


class SeededFetch(Dataset):
    """Wrap a map-style dataset so that random augmentation is a pure function of ``(seed, batch indices)``.

    Why: timm/torchvision augmentations draw from the *global* RNGs (``random``, ``numpy``, ``torch``), and the
    prepared loader fetches one batch ahead. A checkpoint taken after step ``k`` therefore stores global RNG
    states that have already been advanced by batch ``k+1``'s augmentation, and a resumed run would augment every
    later batch differently. Here every batch fetch runs with the global RNGs seeded from the batch's own indices
    and restored afterwards, so fetching neither depends on nor changes the global RNG stream. This also makes
    augmentation identical with ``num_workers > 0`` (worker seeds no longer matter) and independent across ranks.
    """

    def __init__(self, base: Any, seed: int) -> None:
        self.base = base
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.base)

    def _batch_seed(self, indices: list) -> int:
        flat = torch.as_tensor(indices, dtype=torch.int64).flatten().tolist()
        return int(np.random.SeedSequence([self.seed, len(flat), *flat]).generate_state(1, dtype=np.uint64)[0] >> 1)

    def __getitems__(self, indices: list) -> list:
        seed = self._batch_seed(list(indices))
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            random.seed(seed)
            np.random.seed(seed & 0xFFFF_FFFF)
            torch.default_generator.manual_seed(seed)  # CPU only: leaves accelerator RNGs alone
            if hasattr(self.base, "__getitems__"):
                return self.base.__getitems__(list(indices))
            return [self.base[i] for i in indices]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])

    def __getitem__(self, index: Any) -> Any:
        return self.__getitems__([index])[0]


@dataclass
class LoopState:
    """Where training stands; saved in every checkpoint as ``trainer_state.json``."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_metric: float = -math.inf
    best_epoch: int = -1
    last_loss: float = math.nan  # loss of the latest step; kept so a resume at an epoch's end can record it
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False  # a callback stopped training before the last epoch ended


class LoopCallback:
    """Extension point of :func:`train_loop` (the role of transformers' ``TrainerCallback``): subclass and override
    what you need. ``on_step_end`` returning ``True`` stops training there, as an interruption would."""

    def on_epoch_begin(self, epoch: int) -> None:
        """Called before the first batch of every epoch (also a resumed one)."""

    def on_step_end(self, state: "LoopState") -> bool:
        """Called after every optimiser step; return True to stop."""
        return False


class EpochHook(LoopCallback):
    """Tells an object with ``set_epoch(epoch)`` (e.g. a deferred re-weighting loss) the epoch."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def on_epoch_begin(self, epoch: int) -> None:
        self.target.set_epoch(epoch)


class StopAfterSteps(LoopCallback):
    """Stops training after ``steps`` optimiser steps in total: a deterministic stand-in for a crash, so a test can
    resume from the checkpoints written until then."""

    def __init__(self, steps: int) -> None:
        self.steps = int(steps)

    def on_step_end(self, state: "LoopState") -> bool:
        return state.global_step >= self.steps


def _trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}


def _save_extra_state(folder: Path, extra: Mapping[str, Any], rank: int) -> None:
    """Each rank's extra objects (``state_dict`` of tensors) as one safetensors file: never pickled."""
    tensors = {f"{name}/{key}": value.detach().cpu().clone().contiguous()
               for name, obj in extra.items() for key, value in obj.state_dict().items()}
    save_file(tensors, str(folder / EXTRA_STATE.format(rank=rank)))


def _load_extra_state(folder: Path, extra: Mapping[str, Any], rank: int) -> None:
    path = folder / EXTRA_STATE.format(rank=rank)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {folder} has no {path.name}: it was written by fewer processes, or by "
                                "an older version; resume with the same number of processes")
    tensors = load_file(str(path))
    for name, obj in extra.items():
        prefix = f"{name}/"
        part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not part:
            raise KeyError(f"checkpoint {folder}: no saved state for {name!r}")
        obj.load_state_dict(part)


def train_loop(
    accelerator: Any,
    *,
    trainable: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Any,
    step: Callable[[Any], torch.Tensor],
    epochs: int,
    lr_scheduler: LRScheduler,
    evaluate: Callable[[int], dict[str, float]] | None = None,
    select_metric: str = "balanced",
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    keep_last: int = 2,
    resume: bool | str = False,
    callbacks: Iterable[LoopCallback] = (),
    batch_size_of: Callable[[Any], int] | None = None,
    desc: str = "train",
    extra_state: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> LoopState:
    """Train ``trainable`` for ``epochs`` epochs; return the final :class:`LoopState`.

    ``trainable``, ``optimizer`` and ``loader`` must already be ``accelerator.prepare``-d. ``step(batch)``
    returns the scalar loss of a batch. ``evaluate(epoch)`` returns validation metrics; the epoch with the best
    ``select_metric`` is kept in memory (and in checkpoints) and restored by :func:`load_best`.
    ``callbacks`` (:class:`LoopCallback`) are told each epoch's start and each step's end and may stop training
    (``state.stopped`` is then True). ``extra_state`` maps names to objects with
    ``state_dict``/``load_state_dict`` (tensors only: generators via :class:`GeneratorState`, modules whose
    buffers change outside the optimiser) saved per rank into every checkpoint and restored on resume.
    """
    memoise_lomo_check()
    loop = _Loop(accelerator, trainable, optimizer, loader, step, epochs, lr_scheduler, evaluate, select_metric,
                 checkpoint_dir, checkpoint_every, keep_last, list(callbacks), batch_size_of, desc,
                 dict(extra_state or {}), progress)
    if resume:
        loop.resume(resume)
    return loop.run()


class _Loop:
    """The state of one :func:`train_loop` call and its steps: resume, train an epoch, end an epoch, checkpoint.

    ``consistent`` is True only where the loop state equals what a regular checkpoint would save (not mid-step,
    not mid-accumulation, not between an epoch's evaluation and its checkpoint): Ctrl-C is deferred to such a point
    (``interrupt.py``), so the checkpoint written on the way out is exact.
    """

    def __init__(self, accelerator: Any, trainable: nn.Module, optimizer: torch.optim.Optimizer, loader: Any,
                 step: Callable[[Any], torch.Tensor], epochs: int, lr_scheduler: LRScheduler,
                 evaluate: Callable[[int], dict[str, float]] | None, select_metric: str,
                 checkpoint_dir: str | Path | None, checkpoint_every: int, keep_last: int,
                 callbacks: list[LoopCallback], batch_size_of: Callable[[Any], int] | None, desc: str,
                 extra: dict[str, Any], progress: bool) -> None:
        self.acc, self.trainable, self.optimizer, self.loader, self.step = accelerator, trainable, optimizer, loader, step
        self.epochs, self.scheduler, self.evaluate, self.select_metric = epochs, lr_scheduler, evaluate, select_metric
        self.ckpt_root = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every, self.keep_last, self.callbacks = checkpoint_every, keep_last, callbacks
        self.batch_size_of, self.desc, self.extra, self.progress = batch_size_of, desc, extra, progress
        self.state = LoopState()
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.unwrapped = accelerator.unwrap_model(trainable)
        self.saved_at: tuple[int, int, int] | None = None  # position of the newest checkpoint written by this call
        self.consistent = True

    def resume(self, resume: bool | str) -> None:
        acc = self.acc
        if self.ckpt_root is None:
            return
        folder = Path(resume) if isinstance(resume, str) else latest_valid_checkpoint(self.ckpt_root, acc.print)
        if folder is None:
            return
        raw = verify_checkpoint(folder)  # raises on a corrupt explicit checkpoint
        acc.load_state(str(folder))
        _load_extra_state(folder, self.extra, acc.process_index)
        self.state = LoopState(**{k: v for k, v in raw.items() if k != "stopped"})
        if (folder / BEST_WEIGHTS).is_file():
            self.best_weights = load_file(str(folder / BEST_WEIGHTS))
        acc.print(f"resumed from {folder} (epoch {self.state.epoch}, step {self.state.step_in_epoch})")

    def _position(self) -> tuple[int, int, int]:
        return self.state.epoch, self.state.step_in_epoch, self.state.global_step

    def checkpoint(self) -> None:
        acc, root = self.acc, self.ckpt_root
        if root is None:
            return
        self.saved_at = self._position()
        step_no = self.state.global_step
        if acc.is_main_process:
            begin_checkpoint(root, step_no)
        acc.wait_for_everyone()
        tmp = root / f"checkpoint-{step_no}.tmp"
        acc.save_state(str(tmp))  # every rank writes its own RNG state here
        _save_extra_state(tmp, self.extra, acc.process_index)
        if self.best_weights is not None and acc.is_main_process:
            save_file(self.best_weights, str(tmp / BEST_WEIGHTS))
        acc.wait_for_everyone()
        if acc.is_main_process:
            seal_checkpoint(root, step_no, asdict(self.state), keep_last=self.keep_last)
        acc.wait_for_everyone()

    def _epoch_loader(self, epoch: int) -> Any:
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)
        if not self.state.step_in_epoch:
            return self.loader
        skipped = self.acc.skip_first_batches(self.loader, self.state.step_in_epoch)  # mid-epoch resume
        if hasattr(skipped, "set_epoch"):
            skipped.set_epoch(epoch)
        return skipped

    def _one_step(self, batch: Any, epoch: int) -> None:
        acc, state = self.acc, self.state
        self.consistent = False
        with acc.accumulate(self.trainable):
            loss = self.step(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}, step {state.step_in_epoch}")
            acc.backward(loss)
            self.optimizer.step()
            self.optimizer.zero_grad()
        state.step_in_epoch += 1
        state.global_step += 1
        state.last_loss = float(loss.item())
        self.consistent = acc.sync_gradients  # mid-accumulation, gradients are in no checkpoint

    def train_epoch(self, epoch: int, lr: float, interrupt: Any) -> bool:
        """One (possibly resumed) epoch of steps; True when a callback stopped training."""
        acc, state = self.acc, self.state
        self.trainable.train()
        bar = tqdm(total=len(self.loader), initial=state.step_in_epoch, desc=f"{self.desc} {epoch + 1}/{self.epochs}",
                   disable=not (self.progress and acc.is_local_main_process), leave=False)
        t0, seen = time.perf_counter(), 0
        try:
            for batch in self._epoch_loader(epoch):
                self._one_step(batch, epoch)
                seen += self.batch_size_of(batch) if self.batch_size_of else 0
                bar.update(1)
                rate = {"img/s": f"{seen * acc.num_processes / (time.perf_counter() - t0):.0f}"} \
                    if self.batch_size_of else {}
                bar.set_postfix(loss=f"{state.last_loss:.4f}", lr=f"{lr:.2e}", **rate)
                if self.checkpoint_every and state.global_step % self.checkpoint_every == 0 and acc.sync_gradients:
                    self.checkpoint()
                if self.consistent:
                    interrupt.raise_if_requested()
                if any([cb.on_step_end(state) for cb in self.callbacks]):
                    state.stopped = True
                    return True
        finally:
            bar.close()
        return False

    def end_epoch(self, epoch: int, lr: float) -> None:
        """Validation, best-epoch bookkeeping, the history record and the epoch-end checkpoint."""
        state = self.state
        self.consistent = False  # evaluation updates the best-epoch state: consistent again after the checkpoint
        record: dict[str, Any] = {"epoch": epoch, "lr": lr, "loss": state.last_loss}
        if self.evaluate is not None:
            metrics = self.evaluate(epoch)
            record.update({f"val_{k}": v for k, v in metrics.items()})
            value = metrics.get(self.select_metric, float("nan"))
            if value > state.best_metric or self.best_weights is None:
                state.best_metric, state.best_epoch = float(value), epoch
                self.best_weights = _trainable_state(self.unwrapped)
        state.history.append(record)
        self.acc.log(record, step=state.global_step)
        state.epoch += 1
        state.step_in_epoch = 0
        self.checkpoint()
        self.consistent = True

    def step_schedule(self) -> None:
        """Step the per-epoch scheduler. torch warns when no optimiser step came first (a resumed run replaying
        its schedule, an epoch resumed at its very end); the schedules are closed forms of the epoch, so the
        learning rate is the same either way and the warning is silenced here only."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()

    def replay_schedule(self) -> None:
        """Step the (fresh) scheduler to the resumed epoch: exactly the learning rate the uninterrupted run had."""
        while self.scheduler.last_epoch < self.state.epoch:
            self.step_schedule()

    def run(self) -> LoopState:
        state = self.state
        interrupt = DeferredInterrupt(self.acc).install()  # the first SIGINT waits for a consistent point
        try:
            self.replay_schedule()
            while state.epoch < self.epochs:
                epoch = state.epoch
                lr = float(self.scheduler.get_last_lr()[0])
                for callback in self.callbacks:
                    callback.on_epoch_begin(epoch)
                if self.train_epoch(epoch, lr, interrupt):
                    return state
                self.end_epoch(epoch, lr)
                self.step_schedule()
                interrupt.raise_if_requested()
        except KeyboardInterrupt:
            if not self.consistent:
                self.acc.print("interrupted mid-step: no new checkpoint (the newest sealed one is kept)")
            elif self.saved_at != self._position():
                self.acc.print("interrupted: writing a checkpoint of the last completed step before exiting")
                self.checkpoint()
            raise
        finally:
            interrupt.restore()
        state.best_weights = self.best_weights  # type: ignore[attr-defined]
        return state


def load_best(trainable: nn.Module, state: LoopState) -> bool:
    """Load the best-on-validation weights kept by :func:`train_loop` into ``trainable``; False if none."""
    weights = getattr(state, "best_weights", None)
    if weights is None:
        return False
    trainable.load_state_dict(copy.deepcopy(weights))
    return True


__all__ = ["train_loop", "load_best", "LoopState", "LoopCallback", "EpochHook", "StopAfterSteps", "GeneratorState",
           "SeededFetch"]
