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
* its **parameters**: a small dataclass (``Params``) read from ``--method-kwargs``, with its published defaults;
* its **search space** for the fair comparison (Optuna trial → config overrides) and the published values of
  what it searches (:meth:`Method.default_trial`, the comparison's first trial for the method).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Protocol

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ..data.samplers import ClassBalancedSampler, DualBranchSampler, InstanceSampler, ProgressiveSampler, SquareRootSampler
from ..losses import DeferredReweighting, build_loss
from ..schedules import cosine_schedule, warmup_multistep_schedule
from .params import NoParams, params_dict, params_from
from .registry import _METHODS, fusion_methods, get_method, list_methods, register_method  # noqa: F401

#: Where a stage-2 fusion acts: ``"map"`` the un-pooled features (H2T), ``"pooled"`` the pooled vectors (H2TF).
#: A closed set: the step that consumes it refuses any other value rather than falling back silently.
FusionSite = Literal["map", "pooled"]

Fuse = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


class MethodConfig(Protocol):
    """What a method reads of the run's configuration (``pih2t_hub.training.config.RunConfig`` is one): the
    method sits below the training code, so it names the fields it uses instead of importing the engine's class.
    ``resolve`` returns a copy made with ``dataclasses.replace``, so the object must be a dataclass."""

    method: str
    loss: str | None
    sampler: str | None
    loss_kwargs: dict[str, Any]
    method_kwargs: dict[str, Any]
    stage2_epochs: int | None
    stage2_lr: float | None
    stage2_batch_size: int | None
    stage2_weight_decay: float | None
    seed: int


@dataclass(frozen=True)
class Recipe:
    """Stage-2 optimiser defaults of a method (SGD with momentum, learning rate stepped per epoch by ``schedule``).

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

    cfg: "MethodConfig"
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
    Params: ClassVar[type] = NoParams  # the method's own knobs (a dataclass), read from ``method_kwargs``
    card_fields: ClassVar[tuple[str, ...] | None] = None  # the parameters the model card lists; None: all

    def __init__(self, cfg: "MethodConfig") -> None:
        self.cfg = cfg
        self.params = self.parse_params(cfg.method_kwargs)

    @classmethod
    def parse_params(cls, method_kwargs: dict[str, Any] | None) -> Any:
        """The method's parameters from ``--method-kwargs``: unknown keys and bad values are one-line errors."""
        return params_from(cls.Params, method_kwargs, cls.name)

    def card_params(self) -> dict[str, Any]:
        """What the model card lists for the method beyond the run's optimiser values: its parameters (those in
        ``card_fields``; the full set is in the recorded config's ``method_kwargs``)."""
        values = params_dict(self.params)
        return values if self.card_fields is None else {k: values[k] for k in self.card_fields}

    # ------------------------------------------------------------------ the recipe
    @classmethod
    def resolve(cls, cfg: "MethodConfig") -> "MethodConfig":
        """The config with every stage-2 value the user left unset taken from the method's recipe, and the
        method's parameters resolved (defaults filled in, so the recorded ``method_kwargs`` is what ran)."""
        import dataclasses

        updates: dict[str, Any] = {"method": cls.name, "method_kwargs": params_dict(cls.parse_params(cfg.method_kwargs))}
        if cfg.loss is not None and cfg.loss != cls.loss and (cls.loss_is_fixed or cls.recipe is None):
            raise ValueError(f"--loss {cfg.loss} cannot be combined with --method {cls.name}: "
                             f"the method {'trains nothing' if cls.recipe is None else 'is its loss'}")
        if cls.recipe is not None:
            updates.update(loss=cfg.loss or cls.loss, sampler=cfg.sampler or cls.sampler)
            for key in ("epochs", "lr", "batch_size", "weight_decay"):
                if getattr(cfg, f"stage2_{key}") is None:
                    updates[f"stage2_{key}"] = getattr(cls.recipe, key)
        return dataclasses.replace(cfg, **updates)

    def lr_schedule(self, optimizer: Optimizer) -> LRScheduler:
        """The recipe's per-epoch schedule over the resolved stage-2 epochs, from the optimiser's lr (the peak)."""
        epochs, recipe = int(self.cfg.stage2_epochs), self.recipe
        if recipe is None or recipe.schedule == "cosine":
            return cosine_schedule(optimizer, epochs)
        milestones = [max(1, round(m * epochs)) for m in recipe.milestones]
        return warmup_multistep_schedule(optimizer, min(recipe.warmup, max(epochs - 1, 0)), milestones, recipe.gamma)

    epoch_range: ClassVar[tuple[int, int, int]] = (5, 40, 5)  # (low, high, step) of the searched stage-2 epochs

    @classmethod
    def default_trial(cls) -> dict[str, Any]:
        """The published value of every name :meth:`search_space` suggests beyond the optimiser's: a parameter's
        dataclass default, else the method's own ``loss_kwargs``. The comparison enqueues it as the first trial."""
        probe = _NameProbe()
        cls.search_space(probe)
        defaults = {**cls.loss_kwargs, **params_dict(cls.Params())}
        missing = [n for n in probe.names if n not in defaults and not n.startswith("stage2_")]
        if missing:
            raise TypeError(f"method {cls.name}: no published value for searched {missing}; add them to Params or "
                            "loss_kwargs, or override default_trial")
        return {n: defaults[n] for n in probe.names if n in defaults}

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
        """The loss by name; the method's own keyword arguments apply only to its own loss.

        The loss is told the stage's length (LDAM-DRW defers its re-weighting to 80 % of it); a re-weighting epoch
        the loss derived that way is recorded in ``ctx.results["derived_loss_kwargs"]``, so the run's results,
        config and card say when the weights switched on."""
        name = self.cfg.loss or self.loss
        kwargs = dict(self.loss_kwargs) if name == self.loss else {}
        kwargs.update(self.cfg.loss_kwargs)
        loss = build_loss(name, class_counts=ctx.class_counts.tolist(), epochs=int(self.cfg.stage2_epochs), **kwargs)
        if isinstance(loss, DeferredReweighting) and "drw_epoch" not in kwargs and loss.drw_epoch is not None:
            ctx.results["derived_loss_kwargs"] = {"drw_epoch": loss.drw_epoch}
        return loss

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
        ratio = getattr(self.params, "fusion_ratio", None)
        if ratio is not None:  # the model config records a fusion method's ratio
            model.config.fusion_ratio = float(ratio)
        return model


class _NameProbe:
    """A stand-in Optuna trial that records the names suggested and answers each with its first option."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def suggest_float(self, name: str, low: float, high: float, **_: Any) -> float:
        self.names.append(name)
        return low

    def suggest_int(self, name: str, low: int, high: int, **_: Any) -> int:
        self.names.append(name)
        return low

    def suggest_categorical(self, name: str, choices: list) -> Any:
        self.names.append(name)
        return choices[0]


__all__ = ["Method", "MethodConfig", "Recipe", "Stage2Context", "register_method", "get_method", "list_methods", "Fuse",
           "fusion_methods"]
