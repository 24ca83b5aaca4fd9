"""The interface between a long-tailed method and the training code.

A method is one module that subclasses :class:`Method` and registers itself with :func:`register_method`, the way
a timm model registers with ``@register_model``. The training code (``pih2t_hub.training.stage2``) only ever asks
a method these questions, never its name:

* its **recipe**: the stage-2 optimiser defaults from its paper or official code (``None``: nothing is trained);
* which **sampler** stage 2 draws from, and which **loss** it optimises (``--loss`` swaps the loss, "X + H2T");
* how the **head** is set up from the stage-1 head (kept, re-initialised, wrapped in learnable scales);
* the **fusion** of feature pairs, if any, and whether it acts on un-pooled maps or pooled vectors;
* per-epoch **hooks** (deferred re-weighting switches on at an epoch);
* the **post-hoc** step after training or instead of it (τ selection, logit adjustment, fitting class means);
* **export**: what goes into the saved model, so that the saved folder reproduces the reported numbers;
* its **search space** for the fair comparison (Optuna trial → config overrides).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from .._names import method_key as _key
from .._names import unknown_method_message
from ..data.samplers import ClassBalancedSampler, DualBranchSampler, InstanceSampler, ProgressiveSampler, SquareRootSampler
from ..losses import build_loss

#: Where a stage-2 fusion acts: ``"map"`` the un-pooled features (H2T), ``"pooled"`` the pooled vectors (H2TF).
#: A closed set: the step that consumes it refuses any other value rather than falling back silently.
FusionSite = Literal["map", "pooled"]

if TYPE_CHECKING:  # pragma: no cover
    from ..training.config import RunConfig

Fuse = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class Recipe:
    """Stage-2 optimiser defaults of a method (SGD with momentum, learning rate set per epoch by ``schedule``).

    ``schedule`` is ``"cosine"`` (to 0 at the last epoch, per epoch) or ``"multistep"`` (linear warm-up for
    ``warmup`` epochs, then ×``gamma`` at each fraction of ``epochs`` in ``milestones``). ``source`` says where
    the numbers come from, for the docs and the model card.
    """

    epochs: int
    lr: float
    batch_size: int
    weight_decay: float
    source: str
    schedule: str = "cosine"
    warmup: int = 0
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1


@dataclass
class Stage2Context:
    """What a method may read while it builds its pieces: the resolved config, the training class counts, the
    cached pooled features (``None`` on a purely online run) and the generator every random draw comes from."""

    cfg: "RunConfig"
    class_counts: np.ndarray
    generator: torch.Generator
    train_features: tuple[torch.Tensor, torch.Tensor] | None = None
    val_features: tuple[torch.Tensor, torch.Tensor] | None = None
    results: dict[str, Any] = field(default_factory=dict)  # a method's own diagnostics (chosen τ, ...)

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)


class Method:
    """Base class: the behaviour of plain cross-entropy retraining; subclasses override what they change."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    recipe: ClassVar[Recipe | None] = None
    sampler: ClassVar[str] = "instance"
    loss: ClassVar[str] = "ce"
    loss_kwargs: ClassVar[dict[str, Any]] = {}
    fusion_site: ClassVar[FusionSite | None] = None  # "map": un-pooled features (H2T), "pooled": pooled vectors (H2TF)
    stage1_pif: ClassVar[bool] = False
    needs_features: ClassVar[bool] = False  # needs the cached train/val features even on the online path
    loss_is_fixed: ClassVar[bool] = False  # the loss is the method (``--loss`` would change what it is)

    def __init__(self, cfg: "RunConfig") -> None:
        self.cfg = cfg

    # ------------------------------------------------------------------ the recipe
    @classmethod
    def resolve(cls, cfg: "RunConfig") -> "RunConfig":
        """The config with every stage-2 value the user left unset taken from the method's recipe."""
        import dataclasses

        updates: dict[str, Any] = {"method": cls.name}
        if cfg.loss is not None and cfg.loss != cls.loss and (cls.loss_is_fixed or cls.recipe is None):
            raise ValueError(f"--loss {cfg.loss} cannot be combined with --method {cls.name}: "
                             f"the method {'trains nothing' if cls.recipe is None else 'is its loss'}")
        if cls.recipe is not None:
            updates.update(loss=cfg.loss or cls.loss, sampler=cfg.sampler or cls.sampler)
            for key in ("epochs", "lr", "batch_size", "weight_decay"):
                if getattr(cfg, f"stage2_{key}") is None:
                    updates[f"stage2_{key}"] = getattr(cls.recipe, key)
        return dataclasses.replace(cfg, **updates)

    def lr_at_epoch(self) -> Callable[[int], float]:
        """The per-epoch learning rate of the recipe's schedule at the resolved peak lr and epochs."""
        from ..training.loop import cosine_per_epoch, warmup_multistep

        epochs, lr = int(self.cfg.stage2_epochs), float(self.cfg.stage2_lr)
        recipe = self.recipe
        if recipe is None or recipe.schedule == "cosine":
            return cosine_per_epoch(lr, epochs)
        milestones = [max(1, round(m * epochs)) for m in recipe.milestones]
        return warmup_multistep(lr, min(recipe.warmup, max(epochs - 1, 0)), milestones, recipe.gamma)

    epoch_range: ClassVar[tuple[int, int, int]] = (5, 40, 5)  # (low, high, step) of the searched stage-2 epochs

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        """Config overrides for one Optuna trial; the base space is the optimiser's (lr, weight decay, epochs).

        A parameter name is suggested once per trial (Optuna returns the first value for a repeated name), so a
        method that needs another epoch range sets ``epoch_range`` instead of suggesting the epochs again."""
        if cls.recipe is None:
            return {}
        low, high, step = cls.epoch_range
        return {"stage2_lr": trial.suggest_float("stage2_lr", 1e-3, 1.0, log=True),
                "stage2_weight_decay": trial.suggest_float("stage2_weight_decay", 1e-6, 1e-2, log=True),
                "stage2_epochs": trial.suggest_int("stage2_epochs", low, high, step=step)}

    # ------------------------------------------------------------------ the pieces of stage 2
    def make_sampler(self, labels: torch.Tensor, seed: int) -> Any:
        """The stage-2 sampler (``cfg.sampler``, resolved from the method)."""
        kind = self.cfg.sampler or self.sampler
        if kind == "instance":
            return InstanceSampler(len(labels), seed=seed)
        if kind == "balanced":
            return ClassBalancedSampler(labels, seed=seed)
        if kind == "sqrt":
            return SquareRootSampler(labels, seed=seed)
        if kind == "progressive":
            return ProgressiveSampler(labels, total_epochs=int(self.cfg.stage2_epochs), seed=seed)
        if kind == "dual":
            return DualBranchSampler(labels, seed=seed)
        raise ValueError(f"unknown sampler {kind!r}; choose instance, balanced, sqrt, progressive or dual")

    @property
    def dual_branch(self) -> bool:
        """Whether stage 2 draws (fused, fusing) pairs: only fusion methods do."""
        return self.fusion_site is not None

    def setup_head(self, head: nn.Module, ctx: Stage2Context) -> nn.Module:
        """The module stage 2 trains, from the stage-1 head (kept as is by default)."""
        return head

    def make_loss(self, ctx: Stage2Context) -> nn.Module:
        """The loss by name; the method's own keyword arguments apply only to its own loss."""
        name = self.cfg.loss or self.loss
        kwargs = dict(self.loss_kwargs) if name == self.loss else {}
        kwargs.update(self.extra_loss_kwargs(name, ctx))
        kwargs.update(self.cfg.loss_kwargs)
        return build_loss(name, class_counts=ctx.class_counts.tolist(), **kwargs)

    def extra_loss_kwargs(self, loss: str, ctx: Stage2Context) -> dict[str, Any]:
        """Loss arguments that depend on the run (e.g. the epoch at which re-weighting is deferred to)."""
        if loss in ("ldam_drw",) and "drw_epoch" not in self.cfg.loss_kwargs:
            return {"drw_epoch": int(0.8 * int(self.cfg.stage2_epochs))}  # 160 of 200 in the official recipe
        return {}

    def make_fusion(self, ctx: Stage2Context) -> Fuse | None:
        """``fuse(fused, fusing, labels, channel_dim)`` for fusion methods, else ``None``."""
        return None

    def row_values(self, ctx: Stage2Context) -> torch.Tensor | None:
        """Optional per-row values of the cached train features (one per row), passed to the fusion of the fused
        branch as ``fused_rho``: for quantities fixed during stage 2 (e.g. H2TF's keep ratios)."""
        return None

    def finalize(self, trained: nn.Module, ctx: Stage2Context) -> nn.Module:
        """The inference head after training (or, for post-hoc methods, instead of it)."""
        return trained

    def export(self, model: nn.Module, head: nn.Module, ctx: Stage2Context) -> nn.Module:
        """Put the inference head into the model and record the method in its config."""
        model.classifier = head
        model.config.method = self.name
        model.config.fusion_ratio = float(self.cfg.fusion_ratio)
        return model


# ---------------------------------------------------------------------------------------------- the registry

_METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: ``@register_method("crt") class CRT(Method): ...`` makes ``--method crt`` work."""

    def deco(cls: type[Method]) -> type[Method]:
        key = _key(name)
        if key in _METHODS and _METHODS[key] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[key].__module__}")
        if not issubclass(cls, Method):
            raise TypeError(f"{cls.__name__} must subclass pih2t_hub.methods.Method")
        cls.name = name
        _METHODS[key] = cls
        return cls

    return deco


def get_method(name: str) -> type[Method]:
    """The method class by name (``pi-h2t``, ``pi_h2t`` and ``PI-H2T`` are one); unknown names list close ones."""
    key = _key(name)
    if key not in _METHODS:
        raise ValueError(unknown_method_message(name, list_methods()))
    return _METHODS[key]


def list_methods(trainable: bool | None = None) -> list[str]:
    """Registered method names, sorted; ``trainable=True``/``False`` keeps only those with/without a recipe."""
    return sorted(cls.name for cls in _METHODS.values()
                  if trainable is None or (cls.recipe is not None) == trainable)


__all__ = ["Method", "Recipe", "Stage2Context", "register_method", "get_method", "list_methods", "Fuse"]
