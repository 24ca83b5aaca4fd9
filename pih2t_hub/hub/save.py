"""Saving a model folder whole or not at all (see :mod:`pih2t_hub._atomic`).

:func:`save_model_folder` writes ``save_pretrained`` output plus extra files (card, plot) into a temporary sibling
of the destination, checks that it is the model in memory (its config parses as the model's config class and every
tensor in the safetensors files equals the model's own), then swaps it in. A full disk, a failing writer or a
mismatch raise, and the previous folder keeps loading and predicting exactly as before.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from .._atomic import atomic_folder
from .._progress import quiet_transformers_bars

__all__ = ["save_model_folder", "save_run_outputs", "verify_model_folder", "ModelFolderError"]

ExtraFile = str | bytes | Callable[[Path], Any]


class ModelFolderError(RuntimeError):
    """A staged model folder does not hold the model that was saved into it."""


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    single = folder / "model.safetensors"
    if not single.is_file():
        raise ModelFolderError(f"{folder} has no model.safetensors")
    return [single]


def verify_model_folder(folder: str | os.PathLike[str], model: Any) -> None:
    """Raise :class:`ModelFolderError` unless ``folder`` reloads as ``model``: config class and every weight.

    The folder is reloaded with the model's own ``from_pretrained`` and every tensor of the state dict compared, so
    a tensor missing from the files (reloaded at random) or written wrong is caught, and tied weights count once.
    """
    import torch

    folder = Path(folder)
    try:
        type(model.config).from_pretrained(folder)
    except Exception as err:  # noqa: BLE001 - any parse failure means the folder is unusable
        raise ModelFolderError(f"{folder}/config.json does not load: {err}") from err
    # Reload through the model's own loader rather than reading the safetensors keys: save_pretrained may write
    # checkpoint-format key names (transformers' conversion mappings) that differ from the module's state_dict.
    _weight_files(folder)  # a folder without weights is refused before loading
    try:
        reloaded, info = type(model).from_pretrained(folder, output_loading_info=True)
    except Exception as err:  # noqa: BLE001 - a folder that does not load is unusable, whatever the reason
        raise ModelFolderError(f"{folder} does not load as {type(model).__name__}: {str(err).splitlines()[0]}") from err
    missing, unexpected = sorted(info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ()))
    if missing:
        raise ModelFolderError(f"{folder} lacks {len(missing)} tensors of the model, e.g. {missing[:3]}")
    if unexpected:
        raise ModelFolderError(f"{folder} holds {unexpected[0]!r}, which the model does not have")
    state, again = model.state_dict(), reloaded.state_dict()
    for key, tensor in state.items():
        if not torch.equal(again[key].detach().cpu(), tensor.detach().cpu()):
            raise ModelFolderError(f"{folder}: tensor {key!r} differs from the model's after reloading")


def _write_extra(folder: Path, name: str, content: ExtraFile) -> None:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        content(path)


def save_model_folder(
    model: Any,
    dest: str | os.PathLike[str],
    extra_files: Mapping[str, ExtraFile] | None = None,
    verify: bool = True,
    **save_kwargs: Any,
) -> Path:
    """``model.save_pretrained`` into ``dest`` atomically; return ``dest``.

    ``extra_files`` maps a relative name to its content: text, bytes, or ``writer(path)`` (e.g. a plot). The
    previous ``dest`` (if any) is replaced only after the new folder is complete and verified.
    """
    dest = Path(dest)
    with quiet_transformers_bars(), \
            atomic_folder(dest, verify=(lambda f: verify_model_folder(f, model)) if verify else None) as stage:
        model.save_pretrained(stage, **save_kwargs)
        for name, content in (extra_files or {}).items():
            _write_extra(stage, name, content)
    return dest


def _stage_file(path: Path, content: str | bytes) -> Path:
    """Write ``content`` to a flushed temp sibling of ``path`` and return it (renamed into place later)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(content.encode("utf-8") if isinstance(content, str) else content)
        handle.flush()
        os.fsync(handle.fileno())
    return tmp


def save_run_outputs(
    out: str | os.PathLike[str],
    model: Any,
    extra_files: Mapping[str, ExtraFile] | None = None,
    side_files: Mapping[str, str | bytes] | None = None,
    model_dirname: str = "model",
) -> Path:
    """A run's outputs as one unit: ``out/<model_dirname>`` (see :func:`save_model_folder`) and ``side_files``
    beside it (``results.json``, ``run_config.yaml``: name -> text).

    The side files are staged (written and flushed) before the model folder is swapped in and renamed over the
    old ones right after, so a failed save changes nothing and a finished one never pairs new weights with old
    results. Returns the model folder.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staged: dict[Path, Path] = {}
    try:
        for name, content in (side_files or {}).items():
            staged[out / name] = _stage_file(out / name, content)
        folder = save_model_folder(model, out / model_dirname, extra_files=extra_files)
        for final, tmp in staged.items():
            os.replace(tmp, final)
    finally:
        for tmp in staged.values():
            if tmp.exists():
                tmp.unlink()
    return folder
