"""Lightweight fine-tuning's names and which backbones a kind applies to, known without importing torch.

The command line refuses ``--peft adaptformer`` on a CNN in a fraction of a second, before torch is imported: the
backbone's family comes from the registry alias, a timm architecture name, or an HF ``config.json`` on disk (a
saved model, an HF folder, the Hub cache). When none of those tells, ``None``: the model build decides
(``models/pih2t/tuning.py`` refuses a backbone without transformer blocks in the same words).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

__all__ = ["PEFT_KINDS", "PEFT_MODULE_KINDS", "backbone_is_vit", "check_peft_backbone", "check_peft_start"]

#: Every ``--peft`` kind (``models/pih2t/tuning.py``'s ``TUNING_KINDS``; tests/test_peft.py checks they agree).
PEFT_KINDS: tuple[str, ...] = ("lora", "adaptformer", "bitfit", "vpt")
#: Kinds whose modules stay in the model, for ViT-family backbones only (``MODULE_KINDS`` there).
PEFT_MODULE_KINDS: tuple[str, ...] = ("adaptformer", "vpt")

# timm architectures built from ViT blocks (``blocks`` with ``norm2`` and ``mlp``), by name prefix
_TIMM_VIT = re.compile(r"^(test_vit|vit_|deit|eva|beit|flexivit|samvit)")
_HF_VIT_TYPES = ("vit", "deit", "dinov2", "dinov2_with_registers", "vit_msn", "vit_mae")


def _hf_model_type(folder: Path) -> str | None:
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if data.get("model_type") == "pih2t":  # a saved PI-H2T model: its backbone decides
        if data.get("backbone_source") == "hf":
            return (data.get("backbone_config") or {}).get("model_type")
        return "timm:" + str(data.get("backbone", ""))
    return data.get("model_type")


def _hub_cached_model_type(repo_id: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency
        return None
    path = try_to_load_from_cache(repo_id, "config.json")
    return _hf_model_type(Path(path).parent) if isinstance(path, str) else None


def backbone_is_vit(backbone: str) -> bool | None:
    """Whether ``backbone`` (an alias, timm name, ``hf:<id>``, HF folder or saved PI-H2T folder) is ViT-family;
    ``None`` when that cannot be told without building it."""
    from .registry import BACKBONES

    if backbone in BACKBONES:
        entry = BACKBONES[backbone]
        if entry.source == "timm":
            return bool(_TIMM_VIT.match(entry.timm_architecture))
        backbone = "hf:" + entry.name
    if os.path.isdir(backbone):
        model_type = _hf_model_type(Path(backbone))
    elif backbone.startswith("hf:"):
        model_type = _hub_cached_model_type(backbone[3:])
    elif backbone.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        return None
    else:
        model_type = "timm:" + backbone
    if model_type is None:
        return None
    if model_type.startswith("timm:"):
        return bool(_TIMM_VIT.match(model_type[5:]))
    return model_type in _HF_VIT_TYPES


def check_peft_backbone(kind: str | None, backbone: str) -> None:
    """Raise ``ValueError`` (one line) when ``kind`` needs transformer blocks and ``backbone`` is known to have none."""
    if kind in PEFT_MODULE_KINDS and backbone_is_vit(backbone) is False:
        raise ValueError(f"--peft {kind} applies to ViT-family backbones (transformer blocks with an MLP); "
                         f"{backbone!r} is not one: use --peft lora or --peft bitfit")


def check_peft_start(init_from: str | None) -> None:
    """Raise ``ValueError`` (one line) when the ``--init-from`` model was already adapted: a second module on top
    of the first would be recorded as if it were the only one."""
    if init_from is None:
        return
    try:
        tuning = json.loads((Path(init_from).expanduser() / "config.json").read_text()).get("tuning")
    except (OSError, ValueError):
        return
    if tuning:
        raise ValueError(f"--init-from {init_from!r} was already adapted ({tuning.get('kind')}); lightweight "
                         "fine-tuning starts from a model without a tuning module (use --stage 2 to retrain its head)")
