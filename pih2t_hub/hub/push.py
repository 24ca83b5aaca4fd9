"""Push a trained model to the Hugging Face Hub, after checking that what is pushed is complete.

Uploading goes through :meth:`HfApi.create_repo` + :meth:`HfApi.upload_folder` (the git-based ``Repository``
class was removed in huggingface_hub 1.0). The order of work is what makes the push safe:

1. everything to upload is assembled in a fresh temporary *staging* folder (the model is saved there, or the
   given folder is copied there; the card is rendered into it; the plot is copied next to it), so a folder that
   is still being written, or stray temp files, never reach the Hub;
2. the staged folder is validated (:func:`validate_model_folder`): config, weights that parse, preprocessor
   config, remote code named by ``auto_map``, and a rendered card with a ``model-index`` and its images;
3. only then is the repository created and the folder uploaded in one commit.

Any problem in 1-2 raises ``ValueError`` before a single request is sent.

Two repository layouts (``hub_format``): ``"pih2t"`` (default; transformers config + remote code, loads with
``trust_remote_code`` or with pih2t_hub installed) and ``"timm"`` (a plain timm checkpoint written by
:func:`pih2t_hub.hub.export_timm`; loads with ``timm`` or transformers' TimmWrapper, no remote code).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from huggingface_hub import ModelCard

from pih2t_hub.hub.model_card import HUB_FORMATS, REQUIRED_METRICS, render_model_card, write_model_card
from pih2t_hub.hub.timm_export import TIMM_REQUIRED_FILES, export_timm

__all__ = ["REQUIRED_FILES", "push_to_hub", "stage_model_folder", "validate_model_folder"]

#: Files a pushed pih2t model repository must contain.
REQUIRED_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "README.md")
#: Files a pushed timm-format repository must contain (timm's config carries the pre-processing).
TIMM_REPO_FILES = (*TIMM_REQUIRED_FILES, "README.md")
#: Keys timm's ``config.json`` must have for ``timm.create_model("hf-hub:...")`` and TimmWrapper.
TIMM_CONFIG_KEYS = ("architecture", "num_classes", "pretrained_cfg")


def _check_format(hub_format: str) -> str:
    if hub_format not in HUB_FORMATS:
        raise ValueError(f"hub_format must be one of {HUB_FORMATS}, got {hub_format!r}")
    return hub_format
#: Default file name of the accuracy-vs-frequency plot inside the repository.
PLOT_NAME = "accuracy_vs_frequency.png"

_IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)")


def _ignored(name: str) -> bool:
    """Files never uploaded: hidden files, partial writes, caches."""
    return name.startswith(".") or name.endswith((".tmp", ".partial", ".lock")) or name == "__pycache__"


def _read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        problems.append(f"{path.name} does not parse as JSON ({err})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path.name} must hold a JSON object")
        return None
    return data


def _check_config(folder: Path, hub_format: str, problems: list[str]) -> None:
    """pih2t: the remote code named by ``auto_map`` is present. timm: timm's keys are there, no remote code."""
    config = _read_json(folder / "config.json", problems) or {}
    if hub_format == "timm":
        absent = [k for k in TIMM_CONFIG_KEYS if k not in config]
        if absent:
            problems.append(f"config.json is not a timm config: it lacks {absent} (write it with export_timm)")
        if "auto_map" in config or "model_type" in config:
            problems.append("config.json is a transformers config; a timm-format repo needs timm's (export_timm)")
        return
    for cls_ref in config.get("auto_map", {}).values():
        refs = cls_ref if isinstance(cls_ref, list) else [cls_ref]
        for ref in refs:
            if not ref or "--" in ref:  # None slots, or code hosted in another repo
                continue
            module_file = ref.rsplit(".", 1)[0].replace(".", "/") + ".py"
            if not (folder / module_file).is_file():
                problems.append(f"config.json auto_map names {ref!r} but {module_file} is missing")


def _check_weights(weights: Path, problems: list[str]) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as fh:
            keys = list(fh.keys())
            for key in keys:
                fh.get_slice(key).get_shape()
        if not keys:
            problems.append("model.safetensors holds no tensors")
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        problems.append(f"model.safetensors does not parse ({type(err).__name__}: {err})")


def _check_card(folder: Path, require_metrics: Sequence[str] | None, problems: list[str]) -> None:
    text = (folder / "README.md").read_text(encoding="utf-8")
    if "{{" in text or "{%" in text:
        problems.append("README.md still contains Jinja markers: the card was not rendered")
    try:
        card = ModelCard(text, ignore_metadata_errors=False)
        results = card.data.eval_results or []
    except Exception as err:
        problems.append(f"README.md metadata does not parse ({type(err).__name__}: {err})")
        results = []
    wanted = list(require_metrics) if require_metrics is not None else [t for t, _ in REQUIRED_METRICS.values()]
    present = {r.metric_type for r in results}
    if not results:
        problems.append("README.md has no model-index (no evaluation results): render it with results")
    elif set(wanted) - present:
        problems.append(f"README.md model-index lacks metric(s) {sorted(set(wanted) - present)}")
    for link in _IMAGE_LINK.findall(text):
        if "://" in link or link.startswith("data:"):
            continue
        if not (folder / link).is_file():
            problems.append(f"README.md shows image {link!r}, which is not in the folder")


def validate_model_folder(
    folder: str | os.PathLike[str], *, require_metrics: Sequence[str] | None = None, hub_format: str = "pih2t"
) -> None:
    """Check that ``folder`` is a complete, loadable model repository; raise ``ValueError`` listing every problem.

    Checks: the required files exist (:data:`REQUIRED_FILES`, or :data:`TIMM_REPO_FILES` for ``hub_format="timm"``);
    ``config.json`` (and ``preprocessor_config.json``) parse; pih2t: the files named by ``config.json``'s
    ``auto_map`` (remote code for ``trust_remote_code``) are present; timm: ``config.json`` is timm's
    (``architecture``, ``num_classes``, ``pretrained_cfg``); ``model.safetensors`` opens with
    ``safetensors.safe_open`` and holds at least one tensor; ``README.md`` is a rendered card (no Jinja left) whose
    metadata has a ``model-index`` with the required metrics, and every local image it shows exists.

    Args:
        require_metrics: model-index metric types that must be present (default: the five of
            :data:`~pih2t_hub.hub.model_card.REQUIRED_METRICS`).
        hub_format: ``"pih2t"`` or ``"timm"`` (see the module docstring).
    """
    hub_format = _check_format(hub_format)
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"model folder {folder} does not exist or is not a directory")
    problems: list[str] = []
    required = TIMM_REPO_FILES if hub_format == "timm" else REQUIRED_FILES
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        problems.append(f"missing file(s): {', '.join(missing)}")
    if (folder / "config.json").is_file():
        _check_config(folder, hub_format, problems)
    if (folder / "preprocessor_config.json").is_file():
        _read_json(folder / "preprocessor_config.json", problems)
    if (folder / "model.safetensors").is_file():
        _check_weights(folder / "model.safetensors", problems)
    if (folder / "README.md").is_file():
        _check_card(folder, require_metrics, problems)
    if problems:
        raise ValueError(f"{folder} is not ready to push:\n  - " + "\n  - ".join(problems))


def stage_model_folder(
    folder_or_model: Any,
    staging: str | os.PathLike[str],
    *,
    repo_id: str | None = None,
    card: ModelCard | str | None = None,
    config: Mapping[str, Any] | None = None,
    results: Mapping[str, Any] | None = None,
    plot: str | os.PathLike[str] | None = None,
    image_processor: Any | None = None,
    extra_files: Sequence[str | os.PathLike[str]] = (),
    allow_empty_groups: bool = False,
    hub_format: str = "pih2t",
) -> Path:
    """Assemble the repository content in the empty folder ``staging`` (see :func:`push_to_hub` for arguments)."""
    hub_format = _check_format(hub_format)
    staging = Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    if any(staging.iterdir()):
        raise ValueError(f"staging folder {staging} must be empty")
    if (config is None) != (results is None):
        raise ValueError("rendering a card needs both config (the resolved run config) and results")
    if card is not None and results is not None:
        raise ValueError("pass either a rendered card or config + results to render one, not both")

    if hasattr(folder_or_model, "save_pretrained") and hub_format == "timm":
        export_timm(folder_or_model, staging, overwrite=True)  # refuses what is not timm backbone + linear head
    elif hasattr(folder_or_model, "save_pretrained"):
        folder_or_model.save_pretrained(staging, safe_serialization=True)
    elif isinstance(folder_or_model, (str, os.PathLike)):
        src = Path(folder_or_model)
        if not src.is_dir():
            raise ValueError(f"{src} is not a model folder")
        shutil.copytree(src, staging, dirs_exist_ok=True, ignore=lambda _d, names: [n for n in names if _ignored(n)])
    else:
        raise TypeError(
            "folder_or_model must be a folder path or a model with save_pretrained, "
            f"got {type(folder_or_model).__name__}"
        )
    if image_processor is not None and hub_format == "pih2t":  # timm's config.json carries the pre-processing
        image_processor.save_pretrained(staging)
    for extra in extra_files:
        extra = Path(extra)
        if not extra.is_file():
            raise ValueError(f"extra file {extra} does not exist")
        shutil.copy2(extra, staging / extra.name)

    plot_name: str | None = None
    if plot is not None:
        plot = Path(plot)
        if not plot.is_file():
            raise ValueError(f"plot {plot} does not exist (write it with plot_accuracy_vs_frequency first)")
        plot_name = plot.name
        shutil.copy2(plot, staging / plot_name)
    elif (staging / PLOT_NAME).is_file():
        plot_name = PLOT_NAME

    if card is not None:
        write_model_card(card, staging)
    elif config is not None and results is not None:
        rendered = render_model_card(
            config, results, repo_id=repo_id, plot_path=plot_name, allow_empty_groups=allow_empty_groups,
            hub_format=hub_format,
        )
        write_model_card(rendered, staging)
    elif not (staging / "README.md").is_file():
        raise ValueError("no model card: pass card=, or config= and results= to render one")
    return staging


def push_to_hub(
    folder_or_model: Any,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    revision: str | None = None,
    api: Any | None = None,
    **content: Any,
) -> Any:
    """Validate, then upload a model repository in one commit; returns ``upload_folder``'s result.

    Args:
        folder_or_model: a ``save_pretrained`` folder, or a model (``PreTrainedModel``) to save.
        repo_id: ``"namespace/name"`` on the Hub.
        token, private, revision: as in ``HfApi``; ``create_repo(exist_ok=True)`` keeps an existing repo.
        api: an ``HfApi``-like object (tests route it to a local server).
        content: what the repository holds, the keyword arguments of :func:`stage_model_folder` (one list of
            them, so the two cannot drift apart):

            * ``card``: a rendered card (``ModelCard`` or text); or ``config``, ``results``: the resolved run
              config and the metrics (``longtail_metrics`` output) to render one with
              :func:`~pih2t_hub.hub.model_card.render_model_card`. Without either, the folder's README.md is
              used (and must be a rendered card); ``allow_empty_groups`` leaves a shot group without classes out.
            * ``plot``: the accuracy-vs-frequency PNG; uploaded under its file name and shown in the card.
            * ``image_processor``: saved into the upload when ``folder_or_model`` is a model without one.
            * ``extra_files``: more files to upload at the repository root.
            * ``hub_format``: ``"pih2t"`` (default: ``save_pretrained`` layout with remote code) or ``"timm"``: a
              model is written with :func:`~pih2t_hub.hub.export_timm` (refused unless timm backbone + linear
              head), a folder must already be an ``export_timm`` folder; the card then shows timm usage.

    Raises:
        ValueError: the content is incomplete (see :func:`validate_model_folder`), a card cannot be rendered
            (missing results, ...). Nothing has been uploaded when it is raised.
    """
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError(f"repo_id must be a non-empty string, got {repo_id!r}")
    with tempfile.TemporaryDirectory(prefix="pih2t_push_") as tmp:
        staging = stage_model_folder(folder_or_model, Path(tmp) / "repo", repo_id=repo_id, **content)
        allow_empty_groups, hub_format = content.get("allow_empty_groups", False), content.get("hub_format", "pih2t")
        # with allow_empty_groups a shot group without classes (e.g. no few-shot class) is left out of the card
        required = ("accuracy", "balanced_accuracy") if allow_empty_groups else None
        validate_model_folder(staging, require_metrics=required, hub_format=hub_format)
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
        repo_url = api.create_repo(repo_id=repo_id, token=token, private=private, repo_type="model", exist_ok=True)
        target = getattr(repo_url, "repo_id", None) or repo_id
        return api.upload_folder(
            repo_id=target,
            folder_path=str(staging),
            repo_type="model",
            revision=revision,
            token=token,
            commit_message=commit_message or "Upload long-tailed classifier (pih2t_hub)",
        )
