"""Render the model card (README.md) of a trained model from the resolved run config and its results.

The card is the record of a run: it must say which backbone and weights, which dataset revision and imbalance,
which method and hyper-parameters, and what came out, split by shot group. It is rendered from the *same* config
object the run wrote next to its outputs (DESIGN.md: "config is data"), through huggingface_hub's
:class:`~huggingface_hub.ModelCard` so that the metadata carries a ``model-index`` (one
:class:`~huggingface_hub.EvalResult` per metric) the Hub can display.

Config lookup: run configs are nested dicts whose section names may vary between recipes, so each card field is
looked up under a few dotted paths (see :data:`CONFIG_KEYS`; the first hit wins). ``backbone``, ``dataset`` and
``method`` are required; any other field that is absent is printed as "not recorded" rather than guessed.
The whole config is also embedded in the card as YAML, so nothing is lost.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

__all__ = [
    "CONFIG_KEYS",
    "DEFAULT_TEMPLATE_PATH",
    "REQUIRED_METRICS",
    "check_results",
    "render_model_card",
    "write_model_card",
]

#: The metrics every card must report, with their model-index type and display name.
REQUIRED_METRICS: dict[str, tuple[str, str]] = {
    "overall": ("accuracy", "Top-1 accuracy (overall)"),
    "balanced": ("balanced_accuracy", "Balanced accuracy (mean per-class)"),
    "many": ("many_shot_accuracy", "Many-shot accuracy"),
    "medium": ("medium_shot_accuracy", "Medium-shot accuracy"),
    "few": ("few_shot_accuracy", "Few-shot accuracy"),
}
#: Reported when present in the results; never required.
OPTIONAL_METRICS: dict[str, tuple[str, str]] = {
    "ece": ("expected_calibration_error", "Expected calibration error (15 bins)"),
}

#: Where each card field is looked up in the run config (dotted paths, first hit wins).
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "model_name": ("hub_model_id", "model_name", "run_name", "name"),
    "backbone": ("model.backbone", "backbone.name", "backbone"),
    "backbone_tag": ("model.backbone_tag", "backbone.tag", "backbone.weights", "backbone_tag", "weights"),
    "dataset": ("data.dataset", "data.name", "dataset.name", "dataset"),
    "dataset_config": ("data.config", "data.dataset_config", "dataset.config", "dataset_config"),
    "dataset_revision": ("data.revision", "dataset.revision", "dataset_revision", "revision"),
    "eval_split": ("data.eval_split", "data.test_split", "dataset.eval_split", "eval_split", "test_split"),
    "imbalance_ratio": ("data.imbalance_ratio", "dataset.imbalance_ratio", "imbalance_ratio"),
    "profile": ("data.profile", "data.imbalance_profile", "dataset.profile", "imbalance_profile", "profile"),
    "method": ("method.name", "method"),
    "hyperparameters": ("method.hyperparameters", "method.hparams", "hyperparameters", "hparams"),
    "global_batch_size": (
        "training.global_batch_size", "train.global_batch_size", "global_batch_size", "training.batch_size",
        "batch_size",
    ),
    "epochs": ("training.epochs", "train.epochs", "epochs"),
    "seeds": ("seeds", "seed", "training.seeds", "training.seed", "train.seed"),
    "hardware": ("hardware", "environment.hardware", "training.hardware"),
    "many_threshold": ("evaluation.many_threshold", "eval.many_threshold", "many_threshold"),
    "few_threshold": ("evaluation.few_threshold", "eval.few_threshold", "few_threshold"),
    "shot_protocol": ("evaluation.shot_protocol", "eval.shot_protocol", "shot_protocol"),
    "license": ("license",),
    "base_model": ("base_model",),
}
_REQUIRED_FIELDS = ("backbone", "dataset", "method")
NOT_RECORDED = "not recorded"

#: The Jinja template in the repository's ``model_cards/`` folder.
DEFAULT_TEMPLATE_PATH = Path(__file__).resolve().parents[2] / "model_cards" / "pih2t.md"


def _lookup(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _field(config: Mapping[str, Any], name: str) -> Any:
    for path in CONFIG_KEYS[name]:
        value = _lookup(config, path)
        if isinstance(value, Mapping) and name in ("backbone", "dataset", "method"):
            continue  # a section, not the value: its ".name" path is tried separately
        if value is not None and value != "":
            return value
    return None


def _plain(obj: Any) -> Any:
    """JSON-able copy of a config (numpy scalars, paths, tuples ... become plain values)."""

    def default(o: Any) -> Any:
        if hasattr(o, "tolist"):
            return o.tolist()
        if hasattr(o, "item"):
            return o.item()
        return str(o)

    return json.loads(json.dumps(obj, default=default))


def _fmt(value: Any) -> str:
    if value is None:
        return NOT_RECORDED
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) if value else NOT_RECORDED
    return str(value)


def _hyperparameters(config: Mapping[str, Any]) -> str:
    hp = _field(config, "hyperparameters")
    if hp is None and isinstance(config.get("method"), Mapping):
        hp = {k: v for k, v in config["method"].items() if k != "name"}
    if not hp:
        return NOT_RECORDED
    if isinstance(hp, Mapping):
        return ", ".join(f"`{k}={json.dumps(_plain(v))}`" for k, v in hp.items())
    return str(hp)


def check_results(results: Mapping[str, Any], *, allow_empty_groups: bool = False) -> dict[str, float | None]:
    """Validate the results a card reports and return them as floats.

    Raises:
        ValueError: a required metric is missing, not a number, outside [0, 1] (percentages are refused, so that
            cards are comparable), or ``NaN`` (an empty shot group) unless ``allow_empty_groups`` is set, in which
            case that group is returned as ``None`` and left out of the model-index.
    """
    if not isinstance(results, Mapping):
        raise TypeError(f"results must be a mapping of metric name -> value, got {type(results).__name__}")
    missing = [k for k in REQUIRED_METRICS if k not in results or results[k] is None]
    if missing:
        raise ValueError(
            f"results lack required metric(s) {missing}; a card needs {list(REQUIRED_METRICS)} "
            "(e.g. the dict returned by pih2t_hub.evaluation.longtail_metrics)"
        )
    out: dict[str, float | None] = {}
    for key in (*REQUIRED_METRICS, *OPTIONAL_METRICS):
        if key not in results or results[key] is None:
            continue
        try:
            value = float(results[key])
        except (TypeError, ValueError) as err:
            raise ValueError(f"results[{key!r}] must be a number, got {results[key]!r}") from err
        if math.isnan(value):
            if key in ("many", "medium", "few") and allow_empty_groups:
                out[key] = None
                continue
            raise ValueError(
                f"results[{key!r}] is NaN (the {key} group has no class with test images); "
                "pass allow_empty_groups=True to leave it out of the card"
            )
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"results[{key!r}]={value} is not a fraction in [0, 1] (pass fractions, not percent)")
        out[key] = value
    return out


def render_model_card(
    config: Mapping[str, Any],
    results: Mapping[str, Any],
    *,
    repo_id: str | None = None,
    plot_path: str | None = "accuracy_vs_frequency.png",
    template_path: str | os.PathLike[str] | None = None,
    allow_empty_groups: bool = False,
    license: str | None = None,
) -> ModelCard:
    """Build the :class:`~huggingface_hub.ModelCard` of a run.

    Args:
        config: the resolved run config (plain nested dict; see :data:`CONFIG_KEYS`).
        results: at least ``overall``, ``balanced``, ``many``, ``medium``, ``few`` as fractions (``ece`` is added
            when present), e.g. ``longtail_metrics(...)``; ``split`` overrides the config's eval split.
        repo_id: Hub id used in the usage snippet (default: the config's model name).
        plot_path: repository-relative path of the accuracy-vs-frequency PNG, or ``None`` for no plot.
        template_path: Jinja template (default :data:`DEFAULT_TEMPLATE_PATH`).
        allow_empty_groups: see :func:`check_results`.
        license: SPDX id for the card metadata (default: the config's ``license``, else none).

    Raises:
        ValueError: missing or invalid results, a config without backbone / dataset / method, an absolute or
            parent-escaping ``plot_path``.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping (the resolved run config), got {type(config).__name__}")
    metrics = check_results(results, allow_empty_groups=allow_empty_groups)
    fields = {name: _field(config, name) for name in CONFIG_KEYS}
    absent = [f for f in _REQUIRED_FIELDS if fields[f] is None]
    if absent:
        raise ValueError(
            f"config lacks {absent}; looked under {[CONFIG_KEYS[f] for f in absent]}"
        )
    if plot_path is not None:
        pp = PurePosixPath(str(plot_path).replace(os.sep, "/"))
        if not pp.parts or pp.is_absolute() or ".." in pp.parts or ":" in pp.parts[0]:
            raise ValueError(f"plot_path must be relative to the repository root, got {plot_path!r}")
    template = Path(template_path) if template_path is not None else DEFAULT_TEMPLATE_PATH
    if not template.is_file():
        raise FileNotFoundError(f"model card template not found at {template}; pass template_path=")

    backbone, dataset, method = (str(fields[k]) for k in _REQUIRED_FIELDS)
    model_name = str(fields["model_name"] or f"{method}-{backbone}-{dataset}".replace("/", "-"))
    repo_id = repo_id or str(fields["model_name"] or model_name)
    split = str(results.get("split") or fields["eval_split"] or "test")
    ratio, profile = fields["imbalance_ratio"], fields["profile"]
    if fields["shot_protocol"]:
        protocol = str(fields["shot_protocol"])
    else:
        many_t = fields["many_threshold"] if fields["many_threshold"] is not None else 100
        few_t = fields["few_threshold"] if fields["few_threshold"] is not None else 20
        protocol = f"many > {many_t}, medium {few_t}-{many_t}, few < {few_t} training images"

    dataset_desc = f"{dataset} (long-tailed"
    dataset_desc += f", imbalance ratio {ratio}" if ratio is not None else ""
    dataset_desc += f", {profile} profile)" if profile is not None else ")"
    eval_results = []
    table = []
    for key, (metric_type, metric_name) in {**REQUIRED_METRICS, **OPTIONAL_METRICS}.items():
        if key not in metrics:
            continue
        value = metrics[key]
        shown = "n/a (no class in group)" if value is None else f"{100 * value:.2f}%"
        table.append({"name": metric_name, "value": shown})
        if value is None:
            continue
        eval_results.append(
            EvalResult(
                task_type="image-classification",
                task_name="Long-tailed image classification",
                dataset_type=dataset,
                dataset_name=dataset_desc,
                dataset_config=str(fields["dataset_config"]) if fields["dataset_config"] else None,
                dataset_split=split,
                dataset_revision=str(fields["dataset_revision"]) if fields["dataset_revision"] else None,
                metric_type=metric_type,
                metric_name=metric_name,
                metric_value=round(value, 6),
            )
        )
    tags = ["image-classification", "long-tailed-recognition", "pih2t_hub", method]
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=list(dict.fromkeys(tags)),
        datasets=[dataset],
        metrics=["accuracy"],
        license=license or (str(fields["license"]) if fields["license"] else None),
        base_model=str(fields["base_model"]) if fields["base_model"] else None,
        eval_results=eval_results,
    )
    plain_config = _plain(dict(config))
    return ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_name=model_name,
        repo_id=repo_id,
        backbone=backbone,
        backbone_tag=_fmt(fields["backbone_tag"]),
        dataset=dataset,
        dataset_config=fields["dataset_config"],
        dataset_revision=_fmt(fields["dataset_revision"]),
        eval_split=split,
        imbalance_ratio=_fmt(ratio),
        profile=_fmt(profile),
        method=method,
        hyperparameters=_hyperparameters(config),
        global_batch_size=_fmt(fields["global_batch_size"]),
        epochs=_fmt(fields["epochs"]),
        seeds=_fmt(fields["seeds"]),
        hardware=_fmt(fields["hardware"] or results.get("hardware")),
        shot_protocol=protocol,
        results_table=table,
        plot_path=str(plot_path) if plot_path is not None else None,
        config_yaml=yaml.safe_dump(plain_config, sort_keys=False, allow_unicode=True).rstrip(),
    )


def write_model_card(card: ModelCard | str, folder: str | os.PathLike[str]) -> Path:
    """Write ``card`` as ``folder/README.md`` atomically (temp file + rename)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = str(card)
    fd, tmp = tempfile.mkstemp(prefix=".README.", suffix=".md.tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.replace(tmp, folder / "README.md")
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return folder / "README.md"
