"""Open a saved (or Hub) model for evaluation, refusing what cannot be trusted before anything is built.

A local folder is checked file by file first, so a damaged one is named in one line instead of failing deep
inside ``from_pretrained``:

* ``config.json`` must be a JSON object whose values have the kinds the config class expects (a number where the
  class has a number: ``"num_labels": "ten"`` is refused by name);
* weights must be safetensors (``model.safetensors`` or a sharded index): a pickled ``pytorch_model.bin`` can run
  code when it is read, so it is refused, never opened;
* every safetensors file must have a whole header and cover its tensors to the last byte (a truncated download or
  copy is named).

A name that is no folder is tried as a Hub model id only when it looks like one (``name`` or ``owner/name``);
anything else, such as ``outputs/run/model``, is a folder that does not exist.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

__all__ = ["check_config_values", "check_model_folder", "load_for_evaluation"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _kind(value: Any) -> str | None:
    """The JSON kind of a value, as far as a config cares (None: no expectation can be drawn from it)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return None


def check_config_values(values: dict[str, Any], path: Path) -> None:
    """Refuse a config value whose kind differs from the config class's default for that key.

    Only classes registered with transformers are checked (a model with its own code validates itself); keys
    whose default is ``None`` carry no expectation. ``0`` / ``1`` pass for a flag, as older configs wrote them.
    """
    from transformers import CONFIG_MAPPING

    try:
        defaults = CONFIG_MAPPING[values.get("model_type")]()
    except (KeyError, TypeError, ValueError):
        return
    for key, value in values.items():
        expected = _kind(getattr(defaults, key, None))
        got = _kind(value)
        if expected is None or value is None or got == expected:
            continue
        if expected == "bool" and got == "number" and value in (0, 1):
            continue
        raise ValueError(f"{path}: {key} is {value!r} (a {got}), the config expects a {expected}")


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} is not a saved model folder (no config.json)")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(values).__name__}")
    return values


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files a load would read; a folder with only pickled weights is refused."""
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index} is not a safetensors index ({err})") from None
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise ValueError(f"{folder} lacks the weight shard(s) {missing} named in {index.name}")
        return [folder / name for name in shards]
    pickles = sorted({p.name for pattern in _PICKLES for p in folder.glob(pattern)})
    if pickles:
        raise ValueError(f"{folder} has no model.safetensors, only pickled weights ({', '.join(pickles)}), which "
                         "are not loaded because reading a pickle can run code: convert them to safetensors")
    raise ValueError(f"{folder} has no weights (no model.safetensors)")


def _check_safetensors(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is damaged or truncated ({' '.join(str(err).split())})") from None


def check_model_folder(folder: Path) -> None:
    """Check a local model folder's config and weights without building the model (see the module docstring)."""
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a saved model folder")
    check_config_values(_read_config(folder), folder / "config.json")
    for path in _weight_files(folder):
        _check_safetensors(path)


def load_for_evaluation(model: str | Path, trust_remote_code: bool = False) -> Any:
    """The model in eval mode, from a checked local folder or a Hub id; safetensors weights only."""
    from transformers import AutoModelForImageClassification

    from .._progress import quiet_transformers_bars

    name = str(model)
    local, from_hub = Path(name).expanduser(), False
    if local.exists():
        check_model_folder(local)
        source = str(local)
    elif _REPO_ID.match(name) and not name.startswith("."):
        source, from_hub = name, True
    else:
        raise FileNotFoundError(f"model folder {name} does not exist")
    try:
        with quiet_transformers_bars():
            net = AutoModelForImageClassification.from_pretrained(source, trust_remote_code=trust_remote_code,
                                                                  use_safetensors=True)
    except OSError as err:
        if from_hub:
            raise FileNotFoundError(f"{name} is no local folder, and no Hub model of that name could be loaded "
                                    f"({' '.join(str(err).split())})") from None
        raise ValueError(f"{source} could not be loaded ({' '.join(str(err).split())})") from None
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{source} could not be loaded ({type(err).__name__}: {' '.join(str(err).split())})") \
            from None
    return net.eval()
