"""The run configuration: one dataclass, loadable from YAML, overridable from the CLI, written beside outputs.

Config is data: the fully resolved ``RunConfig`` is saved as ``run_config.yaml`` next to the model, and the model
card is rendered from the same object. Every field carries its command-line help, group and (where the values are
a fixed set) choices as ``dataclasses.field`` metadata, which ``recipes/finetune.py`` turns into flags through
``transformers.HfArgumentParser``. :meth:`RunConfig.validate` checks types and ranges, so a recipe value of the
wrong type or an out-of-range flag is refused in one line before any data is read.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .._atomic import atomic_write_text

GROUPS = ("data", "model", "method", "stages", "training", "output", "hub")
#: flags kept for method parameters that used to be run fields (``--fusion-ratio`` is ``method_kwargs.fusion_ratio``)
METHOD_PARAM_ALIASES = ("fusion_ratio", "h2tf_mode")
SAMPLERS = ("instance", "balanced", "sqrt", "progressive", "dual")
TRACKERS = ("tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "swanlab", "trackio", "all")


def _f(default: Any, group: str, help: str, choices: tuple | None = None) -> Any:  # noqa: A002 - argparse's name
    """A config field with its CLI help, group and choices (metadata read by the CLI parser)."""
    meta: dict[str, Any] = {"help": help, "group": group}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


class ConfigError(ValueError):
    """A configuration value that cannot run (wrong type, out of range, unknown name)."""


@dataclass
class RunConfig:
    """Everything a run needs. Defaults are the offline demo: pretrained EfficientNet-Lite0 on MNIST-LT."""

    # data
    dataset: str = _f("mnist", "data", "offline name (digits, mnist, fashion_mnist), a local image folder "
                      "(class_name/*.png) or a Hub dataset id")
    label_column: str | None = _f(None, "data", "label column (ClassLabel, integer or string values; strings are "
                                  "encoded); default: the only ClassLabel column")
    image_column: str | None = _f(None, "data", "image column; default: the only Image column")
    imbalance_ratio: float | None = _f(50.0, "data", "max/min class size of the long-tailed train subset (>= 1); "
                                       "none: the train split is already long-tailed, keep it whole")
    profile: str = _f("exp", "data", "class-size profile of the long tail", ("exp", "step"))
    max_per_class: int | None = _f(300, "data", "images of the largest class (cap); none: as many as the data has")
    test_per_class: int = _f(50, "data", "balanced test images per class, carved from train when the dataset "
                             "has no test split")
    val_fraction: float = _f(0.1, "data", "fraction of the long-tailed train subset held out (stratified) for "
                             "model selection, in (0, 1)")
    image_size: int | None = _f(64, "data", "input resolution in pixels (> 0); none: the backbone's own")
    skip_unreadable_images: bool = _f(False, "data", "skip images that cannot be decoded (counted and listed in "
                                      "results.json) instead of stopping with the file's name")
    # model
    backbone: str = _f("effnet_lite0", "model", "registry alias (effnet_lite0, vit_base, ...), timm name or HF id")
    pretrained: bool = _f(True, "model", "load the backbone's pretrained weights")
    head_type: str = _f("linear", "model", "classifier head", ("linear", "cosine"))
    init_from: str | None = _f(None, "model", "a saved model folder to start from (e.g. the model/ of a "
                               "--stage 1 run, for --stage 2 alone)")
    # method
    method: str = _f("h2t", "method", "long-tail method (see the README's method table), e.g. h2t, pi-h2t, crt, "
                     "lws, tau_norm, dlsa, ce, balanced_softmax, logit_adjusted, ldam_drw, focal, cb")
    loss: str | None = _f(None, "method", "stage-2 loss by name; none: the method's own (a fusion method with "
                          "another loss is 'X + H2T')")
    sampler: str | None = _f(None, "method", "stage-2 sampler; none: the method's own (one of "
                             f"{', '.join(SAMPLERS)})")
    loss_kwargs: dict[str, Any] = _f({}, "method", "YAML mapping of extra loss arguments, e.g. '{tau: 1.5}'")
    method_kwargs: dict[str, Any] = _f({}, "method", "YAML mapping of the method's own parameters, e.g. "
                                       "'{fusion_ratio: 0.3}' (docs/methods.md lists each method's); unknown keys "
                                       "are refused")
    # aliases of method parameters, moved into method_kwargs when the config is made (see __post_init__)
    fusion_ratio: float | None = _f(None, "method", "alias of --method-kwargs '{fusion_ratio: P}': H2T's fraction "
                                    "of channels replaced, in [0, 1] (default 0.25)")
    h2tf_mode: str | None = _f(None, "method", "alias of --method-kwargs '{h2tf_mode: M}': PI-H2T's fusion on "
                               "pooled features, interpolate (default) or replace")
    # stages
    stage: str = _f("both", "stages", "which stages to run", ("1", "2", "both"))
    stage1_mode: str = _f("linear", "stages", "stage 1: 'linear' probe on cached features of the frozen backbone, "
                          "'finetune' end to end, or 'peft': a small module inside the frozen backbone (--peft)",
                          ("linear", "finetune", "peft"))
    stage2_mode: str = _f("cached", "stages", "stage 2 on 'cached' pooled features, or 'online' (backbone forward "
                          "every step, shift-BN)", ("cached", "online"))
    stage1_epochs: int = _f(10, "stages", "stage-1 epochs (>= 1)")
    stage1_lr: float = _f(0.1, "stages", "stage-1 learning rate (> 0, cosine per epoch)")
    mixup_alpha: float = _f(0.0, "stages", "stage-1 mixup Beta(a, a) parameter, with --stage1-mode finetune; "
                             "0: no mixup")
    shift_bn: bool = _f(True, "stages", "stage 2 online: re-estimate the frozen backbone's BN statistics")
    batch_size: int = _f(128, "stages", "stage-1 and feature-extraction batch size per process")
    weight_decay: float = _f(5e-4, "stages", "stage-1 weight decay (>= 0)")
    momentum: float = _f(0.9, "stages", "SGD momentum, in [0, 1)")
    # stage 2: None takes the method's published recipe (pih2t_hub.methods); the resolved values are recorded
    stage2_epochs: int | None = _f(None, "stages", "stage-2 epochs (>= 1); none: the method's recipe")
    stage2_lr: float | None = _f(None, "stages", "stage-2 learning rate (> 0); none: the method's recipe")
    stage2_batch_size: int | None = _f(None, "stages", "stage-2 batch size per process; none: the method's recipe")
    stage2_weight_decay: float | None = _f(None, "stages", "stage-2 weight decay (>= 0); none: the method's recipe")
    # lightweight fine-tuning: --stage1-mode peft, LIFT's recipe by default (docs/methods.md)
    peft: str | None = _f(None, "stages", "with --stage1-mode peft: the module trained inside the frozen backbone, "
                          "one of lora, adaptformer, bitfit, vpt (adaptformer and vpt: ViT-family backbones)")
    peft_rank: int | None = _f(None, "stages", "LoRA rank / AdaptFormer bottleneck (>= 1); none: LIFT's rule "
                               "2^max(0, floor(log2(classes / (2 blocks))))")
    peft_alpha: float = _f(1.0, "stages", "LoRA alpha: the update is scaled by alpha / rank (LIFT: 1 / rank)")
    peft_targets: str | None = _f(None, "stages", "LoRA's layers, comma-separated module names or suffixes; none: "
                                  "a ViT's attention qkv (timm) or query,value (HF), a CNN's ungrouped convolutions")
    peft_prompts: int = _f(10, "stages", "VPT: prompt tokens per block (deep VPT, >= 1)")
    peft_lr: float = _f(0.01, "stages", "stage-1 learning rate of --stage1-mode peft (> 0, cosine per epoch)")
    peft_head: str = _f("cosine", "stages", "head trained with the module, initialised from the class means: "
                        "LIFT's 'cosine', or 'linear' (exportable to plain timm)", ("cosine", "linear"))
    peft_scale: float = _f(25.0, "stages", "scale s of the peft head's logits s·cos(w, f) (> 0)")
    peft_tau: float = _f(1.0, "stages", "τ of the peft stage's logit-adjusted loss (>= 0)")
    tta: bool = _f(False, "stages", "also report test accuracy with LIFT's test-time ensemble (logits of five crops "
                   "of the image resized to the input size + 24 px, averaged); the saved model is single-crop")
    # training
    grad_accum: int = _f(1, "training", "gradient accumulation steps (>= 1)")
    mixed_precision: str = _f("no", "training", "autocast dtype; resolved to what the device supports (recorded)",
                              ("no", "fp16", "bf16"))
    feature_dtype: str = _f("float32", "training", "storage dtype of cached features", ("float32", "float16"))
    num_workers: int = _f(0, "training", "data-loader worker processes (>= 0)")
    report_to: str | None = _f(None, "training", "accelerate tracker, installed separately (one of "
                               f"{', '.join(TRACKERS)})")
    seed: int = _f(0, "training", "seed of every random choice (subset, splits, init, sampling, fusion), >= 0")
    # output
    output_dir: str = _f("outputs/demo", "output", "where the model, results, checkpoints and cache go (locked "
                         "for the run)")
    cache_dir: str | None = _f(None, "output", "feature cache; default <output-dir>/features (shareable across "
                               "runs: its manifest decides reuse)")
    checkpoint_every: int = _f(0, "output", "also checkpoint every N optimiser steps (0: at epoch ends only)")
    keep_last: int = _f(2, "output", "checkpoints kept per stage (0: all)")
    resume: bool = _f(False, "output", "continue from the newest valid checkpoint (the config must match); takes "
                       "over the lock of a run provably dead on this host")
    resume_strict: bool = _f(False, "output", "with --resume: refuse to start when there is no valid checkpoint")
    force_unlock: bool = _f(False, "output", "take over the lock left by a run that died (reported first)")
    export: str = _f("pih2t", "output", "saved model format: transformers with remote code, or a plain timm "
                     "folder too", ("pih2t", "timm"))
    # hub
    push_to_hub: bool = _f(False, "hub", "upload the model folder to the Hub when the run ends (needs a token)")
    hub_model_id: str | None = _f(None, "hub", "Hub repository id, 'owner/name'")
    hub_format: str = _f("pih2t", "hub", "what --push-to-hub uploads", ("pih2t", "timm"))

    def __post_init__(self) -> None:
        """The alias fields are method parameters: their values move into ``method_kwargs``, where the method reads
        and validates them (and where the recorded config shows them)."""
        for alias in METHOD_PARAM_ALIASES:
            value = getattr(self, alias)
            if value is None or not isinstance(self.method_kwargs, dict):
                continue
            if alias in self.method_kwargs and self.method_kwargs[alias] != value:
                raise ConfigError(f"{alias} is given twice with different values: {value!r} and method_kwargs "
                                  f"{alias}: {self.method_kwargs[alias]!r}")
            self.method_kwargs = {**self.method_kwargs, alias: value}
            setattr(self, alias, None)

    def validate(self) -> "RunConfig":
        """Check types (coercing int -> float where a number is expected), choices, ranges and names; raise
        :class:`ConfigError` naming the first bad key. Returns ``self``."""
        _check_types(self)
        _check_choices(self)
        _check_ranges(self)
        _check_names(self)
        _check_peft(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            close = sorted({m for k in unknown for m in difflib.get_close_matches(k, sorted(known), n=3, cutoff=0.6)})
            hint = f" (did you mean {', '.join(close)}?)" if close else f"; valid keys: {sorted(known)}"
            raise ConfigError(f"unknown config keys {unknown}{hint}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RunConfig":
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe must be a YAML mapping")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


# ---------------------------------------------------------------------------------------------- validation

_KIND = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}


def _expected(name: str) -> tuple[type, bool]:
    """``(base type, optional)`` of a field from its annotation."""
    hint = typing.get_type_hints(RunConfig)[name]
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint)
    return typing.get_origin(base) or base, optional


def _check_types(cfg: RunConfig) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        base, optional = _expected(f.name)
        if value is None and optional:
            continue
        ok = value is not None and {
            bool: lambda v: isinstance(v, bool),
            int: lambda v: isinstance(v, int) and not isinstance(v, bool),
            float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            str: lambda v: isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)),
            dict: lambda v: isinstance(v, dict),
        }[base](value)
        if not ok:
            kind = _KIND[base] + (" or null" if optional else "")
            raise ConfigError(f"{f.name} must be {kind}, got {type(value).__name__} {value!r}")
        if base in (float, str) and not isinstance(value, base):  # 10 -> 10.0; YAML `stage: 2` -> "2"
            setattr(cfg, f.name, base(value))


def _check_choices(cfg: RunConfig) -> None:
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value not in choices:
            raise ConfigError(f"{f.name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    if cfg.sampler is not None and cfg.sampler not in SAMPLERS:
        raise ConfigError(f"sampler must be one of {', '.join(SAMPLERS)} (or none); got {cfg.sampler!r}")
    if cfg.report_to is not None and cfg.report_to not in TRACKERS:
        raise ConfigError(f"report_to must be one of {', '.join(TRACKERS)} (or none); got {cfg.report_to!r}")


_AT_LEAST_ONE = ("stage1_epochs", "stage2_epochs", "batch_size", "stage2_batch_size", "grad_accum", "test_per_class",
                 "max_per_class", "image_size")
_NON_NEGATIVE_INT = ("num_workers", "checkpoint_every", "keep_last", "seed")
_HINTS = {"stage1_epochs": " (--stage 2 with --init-from skips stage 1)", "stage2_epochs": " (--stage 1 skips stage 2)"}


def _check_ranges(cfg: RunConfig) -> None:
    if cfg.imbalance_ratio is not None and (not math.isfinite(cfg.imbalance_ratio) or cfg.imbalance_ratio < 1):
        raise ConfigError(f"imbalance_ratio must be finite and >= 1, got {cfg.imbalance_ratio}")
    ratio = cfg.method_kwargs.get("fusion_ratio")  # the alias flag's range, known before the method is imported
    if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and not 0.0 <= ratio <= 1.0:  # NaN fails
        raise ConfigError(f"fusion_ratio must lie in [0, 1], got {float(ratio)}")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ConfigError(f"val_fraction must lie in (0, 1): model selection needs a validation split, "
                          f"got {cfg.val_fraction}")
    for name in _AT_LEAST_ONE:
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}{_HINTS.get(name, '')}")
    for name in _NON_NEGATIVE_INT:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("stage1_lr", "stage2_lr", "weight_decay", "stage2_weight_decay", "momentum", "mixup_alpha"):
        value = getattr(cfg, name)
        if value is not None and (not math.isfinite(value) or value < 0 or (value == 0 and "lr" in name)):
            raise ConfigError(f"{name} must be finite and {'> 0' if 'lr' in name else '>= 0'}, got {value}")
    if not 0.0 <= cfg.momentum < 1.0:  # 1 or more: the velocity never decays, and the weights run away
        raise ConfigError(f"momentum must lie in [0, 1), got {cfg.momentum}")
    if not cfg.dataset.strip():
        raise ConfigError("dataset must not be empty")


def _check_peft(cfg: RunConfig) -> None:
    """Lightweight fine-tuning's flags: a kind exactly when the peft mode runs, sizes in range, and no timm export
    of a module plain timm does not have."""
    from .._tuning_names import PEFT_KINDS, PEFT_MODULE_KINDS

    if cfg.peft is not None and cfg.stage1_mode != "peft":
        raise ConfigError(f"--peft {cfg.peft} needs --stage1-mode peft (got --stage1-mode {cfg.stage1_mode})")
    if cfg.stage1_mode == "peft" and cfg.peft is None:
        raise ConfigError(f"--stage1-mode peft needs --peft: one of {', '.join(PEFT_KINDS)}")
    if cfg.peft is not None and cfg.peft not in PEFT_KINDS:
        close = difflib.get_close_matches(cfg.peft, PEFT_KINDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown --peft kind {cfg.peft!r}{hint}; choose one of {', '.join(PEFT_KINDS)}")
    if cfg.peft_rank is not None and cfg.peft_rank < 1:
        raise ConfigError(f"peft_rank must be >= 1, got {cfg.peft_rank}")
    if cfg.peft_prompts < 1:
        raise ConfigError(f"peft_prompts must be >= 1, got {cfg.peft_prompts}")
    for name in ("peft_lr", "peft_scale", "peft_alpha"):
        value = getattr(cfg, name)
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name} must be finite and > 0, got {value}")
    if not math.isfinite(cfg.peft_tau) or cfg.peft_tau < 0:
        raise ConfigError(f"peft_tau must be finite and >= 0, got {cfg.peft_tau}")
    if cfg.stage1_mode == "peft" and cfg.peft in PEFT_MODULE_KINDS and "timm" in (cfg.export, cfg.hub_format):
        raise ConfigError(f"--peft {cfg.peft} adds modules plain timm does not have: export it in the pih2t format "
                          "(--export timm works after lora and bitfit)")


def _check_names(cfg: RunConfig) -> None:
    """Method, loss and Hub repo id: names defined elsewhere. The method and loss names come from
    :mod:`pih2t_hub._names`, which answers without importing torch, so a bad name is refused in a fraction of a
    second."""
    from .._names import check_loss, check_method

    try:
        check_method(cfg.method)
        if cfg.loss is not None:
            check_loss(cfg.loss)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.push_to_hub and not cfg.hub_model_id:
        raise ConfigError("--push-to-hub needs --hub-model-id")
    if cfg.hub_model_id is not None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(cfg.hub_model_id)
        except HFValidationError as err:
            raise ConfigError(f"hub_model_id {cfg.hub_model_id!r} is not a Hub repo id: "
                              f"{' '.join(str(err).split())}") from None


__all__ = ["ConfigError", "GROUPS", "RunConfig", "SAMPLERS", "TRACKERS"]
