"""One stage-2 epoch over a feature cache through the recipe's own stage-2 function (shared by two benchmarks).

``pih2t_hub.training.stage2.run_stage2`` is what ``recipes/finetune.py`` runs for stage 2: the method's sampler
and ``DualBranchDataset`` loader, its cached step (fusion, head, loss), ``train_loop`` on accelerate, validation.
Here it is handed the dataset ``open_for_training`` returns (what ``run.py`` hands it) or, for contrast, the
memory-mapped ``TensorDataset``, plus a small validation split read with ``pread``.
"""

from __future__ import annotations

import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch


def stage2_epoch(cache_dir: Path, accelerator: Any, batch: int, mode: str = "recipe", method: str = "h2t",
                 max_steps: int | None = None, val_rows: int = 5000) -> tuple[Any, float, str]:
    """Run one epoch; returns ``(loop state or None if stopped early, seconds, type of the training dataset)``."""
    from torch.utils.data import TensorDataset

    from pih2t_hub.data.features import CacheRowReader, FeatureCache, open_for_training
    from pih2t_hub.methods import get_method
    from pih2t_hub.models.pih2t.heads import LinearHead
    from pih2t_hub.training.config import RunConfig
    from pih2t_hub.training.context import RunContext
    from pih2t_hub.training.loop import StopAfterSteps
    from pih2t_hub.training.stage2 import method_context, run_stage2

    cache = FeatureCache.open(cache_dir)
    train = open_for_training(cache) if mode == "recipe" else cache.as_tensor_dataset()
    labels = torch.from_numpy(np.load(Path(cache_dir) / "labels.npy", allow_pickle=False))
    rows = torch.arange(0, len(cache), max(1, len(cache) // val_rows))
    val = TensorDataset(torch.from_numpy(CacheRowReader(cache_dir).read(rows)), labels[rows])  # maps no page
    counts = np.bincount(labels.numpy())
    dim, num_classes = cache.feature_shape[0], len(counts)
    del labels
    out = Path(cache_dir) / "stage2-run"
    cls = get_method(method)
    cfg = cls.resolve(RunConfig(method=method, stage2_mode="cached", stage2_epochs=1,
                                batch_size=batch, stage2_batch_size=batch, output_dir=str(out), num_workers=0))
    # the frozen backbone is not used on cached features
    model = types.SimpleNamespace(pih2t=torch.nn.Identity(), classifier=LinearHead(dim, num_classes))
    ctx = RunContext(accelerator=accelerator, cfg=cfg, method=cls(cfg), data={"class_counts": counts}, model=model,
                     train_tf=None, eval_tf=None, features={"train": train, "val": val}, checkpoints=False,
                     callbacks=[StopAfterSteps(max_steps)] if max_steps else [],
                     fusion_generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    state, _ = run_stage2(ctx, method_context(ctx, {}))  # what a run's stage 2 does on cached features
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return (None if state.stopped else state), seconds, type(train).__name__
