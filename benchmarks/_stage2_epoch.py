"""One stage-2 epoch over a feature cache through the recipe's own stage-2 function (shared by two benchmarks).

``pih2t_hub.training.run._stage2`` is what ``recipes/finetune.py`` runs for stage 2: its sampler and
``DualBranchDataset`` loader, its cached step (fusion, head, loss), ``train_loop`` on accelerate, then validation.
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
    from torch.utils.data import DataLoader, TensorDataset

    from pih2t_hub.data.features import CacheRowReader, FeatureCache, open_for_training
    from pih2t_hub.evaluation.metrics import longtail_metrics
    from pih2t_hub.models.pih2t.heads import LinearHead
    from pih2t_hub.training import run as recipe
    from pih2t_hub.training.config import RunConfig
    from pih2t_hub.training.methods import get_method

    cache = FeatureCache.open(cache_dir)
    train = open_for_training(cache) if mode == "recipe" else cache.as_tensor_dataset()
    labels = torch.from_numpy(np.load(Path(cache_dir) / "labels.npy", allow_pickle=False))
    rows = torch.arange(0, len(cache), max(1, len(cache) // val_rows))
    val = TensorDataset(torch.from_numpy(CacheRowReader(cache_dir).read(rows)), labels[rows])  # maps no page
    counts = np.bincount(labels.numpy())
    dim, num_classes = cache.feature_shape[0], len(counts)
    del labels
    out = Path(cache_dir) / "stage2-run"
    cfg = RunConfig(method=method, fusion_ratio=0.25, stage2_mode="cached", epochs=1, batch_size=batch,
                    output_dir=str(out), num_workers=0)
    feats = {"train": train, "val": val}

    def eval_head(h, split):  # run.py's eval_head: logits of the split's cached features, long-tail metrics
        h.eval()
        loader = accelerator.prepare(DataLoader(feats[split], batch_size=max(cfg.batch_size, 256)))
        logits, y = recipe.predict_logits(accelerator, lambda x: h(x.float()), loader)
        return longtail_metrics(logits, y, counts)

    def sgd(params, lr):
        return torch.optim.SGD([p for p in params if p.requires_grad], lr=lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)

    model = types.SimpleNamespace(pih2t=torch.nn.Identity())  # the frozen backbone is not used on cached features
    start = time.perf_counter()
    state, _ = recipe._stage2(accelerator, cfg, get_method(method), model, LinearHead(dim, num_classes), feats,
                              counts, {"label_column": "label"}, None, torch.Generator().manual_seed(1), out,
                              eval_head, None, sgd, max_steps)
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    return state, seconds, type(train).__name__
