"""The fair comparison: which long-tailed method, on this data, with this backbone, and how much does it buy?

One feature cache, many methods, the same rules for all:

1. the frozen backbone's train and validation features are extracted once; one linear CE head per seed is trained
   on them (stage 1, shared by every method);
2. every method gets **the same tuning budget**: ``trials`` Optuna trials (TPE, seeded) over the search space the
   method declares, each trial trained on train and scored on the validation split only. The method's published
   recipe is the first trial, so tuning never ends below it on validation. A method without hyper-parameters
   (NCM, τ-norm, which picks τ on validation itself) needs one trial;
3. only after every study has finished is the test split read: each method's best configuration, and its
   published recipe untuned, are retrained for every seed and evaluated on test once per (method, seed);
4. "X + H2T" and "X + PI-H2T" take the best loss X (chosen on validation) with X's tuned loss arguments fixed
   and get the same budget over the fusion method's own space.

Studies live in an Optuna RDB storage (SQLite in the output folder by default, any URL with ``--storage``), so an
interrupted comparison resumes where it stopped and several machines can share one study.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from ._atomic import atomic_write_text
from .methods import fusion_methods, get_method, list_methods
from .training.config import RunConfig
from .training.predict import SUMMARY_KEYS, summarize

SCHEMA = "pih2t_hub.compare/1"


@dataclass
class CompareConfig:
    """What to compare and with which budget (data, backbone and stage-1 settings come from a :class:`RunConfig`)."""

    methods: list[str] | None = None  # None: every built-in stage-2 method
    trials: int = 16  # tuning budget per method (Optuna trials on the validation split)
    seeds: int = 3  # seeds of the final retraining; each is evaluated on test once
    storage: str | None = None  # Optuna RDB URL; None: sqlite:///<output_dir>/study.db
    combos: bool = True  # add "X + H2T" and "X + PI-H2T" for the best loss X
    sampler_seed: int = 0  # seed of the TPE sampler
    plot_top: int = 4  # methods drawn in the accuracy-vs-frequency plot
    max_epochs: int | None = None  # cap on the stage-2 epochs of every trial and retraining (cost control)

    def storage_url(self, output_dir: str | Path) -> str:
        return self.storage or f"sqlite:///{Path(output_dir).resolve() / 'study.db'}"


@dataclass(frozen=True)
class Candidate:
    """One row of the comparison: a registered method with some config values fixed (e.g. the loss of "X + H2T")."""

    label: str
    method: str
    fixed: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- validation


def check_inputs(cc: CompareConfig, base: RunConfig) -> list[str]:
    """Everything that can be refused before any extraction: names, budget, validation split, storage."""
    methods = list(cc.methods) if cc.methods else default_methods()
    for name in methods:
        get_method(name)  # ValueError naming close ones
    if cc.trials < 1:
        raise ValueError(f"--trials must be >= 1 (the tuning budget per method), got {cc.trials}")
    if cc.max_epochs is not None and cc.max_epochs < 1:
        raise ValueError(f"--max-epochs must be >= 1, got {cc.max_epochs}")
    if cc.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {cc.seeds}")
    if not base.val_fraction or base.val_fraction <= 0:
        raise ValueError("the comparison tunes on a validation split: --val-fraction must be > 0")
    if cc.storage is None:  # the default SQLite study lives in the output folder
        Path(base.output_dir).mkdir(parents=True, exist_ok=True)
    _open_storage(cc.storage_url(base.output_dir))
    return methods


def default_methods() -> list[str]:
    """Every built-in method (plug-ins registered from outside the package are compared only when named)."""
    return [m for m in list_methods() if get_method(m).__module__.startswith("pih2t_hub.")]


def _open_storage(url: str) -> Any:
    import warnings

    import optuna

    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna; they are what resumes a kill
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)
    except Exception as err:  # noqa: BLE001 - any driver error means the same to the user
        raise ValueError(f"cannot open the Optuna storage {url!r}: {str(err).splitlines()[0]}") from None


# ---------------------------------------------------------------------------------------------- the shared bench


class Bench:
    """Data, model, cached train/val features and one stage-1 head per seed, shared by every trial."""

    def __init__(self, base: RunConfig, seeds: int, progress: bool = True, max_epochs: int | None = None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from .data.splits import load_splits
        from .training.cache import extract_features
        from .training.run import make_context

        self.base = base  # stage-2 values stay unset: each method resolves its own recipe
        self.accelerator = Accelerator(mixed_precision=base.mixed_precision)
        self.data = load_splits(self.base)
        set_seed(self.base.seed)
        self.ctx = make_context(self.base, self.accelerator, self.data, get_method("ce")(self.base))
        self.ctx.checkpoints, self.ctx.progress = False, progress
        extract_features(self.ctx, ("train", "val"))  # test: only at the final evaluation
        self.heads = {s: self._stage1_head(s) for s in range(seeds)}
        self.test_evaluations = 0
        self.max_epochs = max_epochs

    def _stage1_head(self, seed: int) -> torch.nn.Module:
        from accelerate.utils import set_seed

        from .models.pih2t.heads import build_head
        from .training.stage1 import linear_stage1

        c = self.ctx.model.config
        set_seed(seed)
        self.ctx.model.classifier = build_head(c.head_type, c.num_features, c.num_labels, bias=c.head_bias,
                                               scale=c.cosine_scale)
        self.ctx.cfg = dataclasses.replace(self.base, seed=seed)
        linear_stage1(self.ctx)
        return copy.deepcopy(self.ctx.model.classifier)

    def fit(self, cand: Candidate, overrides: dict[str, Any], seed: int) -> tuple[Any, dict[str, float], dict]:
        """Train the candidate with ``overrides`` from seed ``seed``'s stage-1 head; validation metrics only."""
        from .training.context import RunContext
        from .training.stage2 import method_context, run_stage2

        cls = get_method(cand.method)
        cfg = cls.resolve(_merge(dataclasses.replace(self.base, method=cand.method, seed=seed), cand.fixed,
                                 overrides)).validate()
        if self.max_epochs is not None and cfg.stage2_epochs is not None:
            cfg = dataclasses.replace(cfg, stage2_epochs=min(cfg.stage2_epochs, self.max_epochs))
        method = cls(cfg)
        model = copy.deepcopy(self.ctx.model)
        model.classifier = copy.deepcopy(self.heads[seed])
        ctx = RunContext(accelerator=self.accelerator, cfg=cfg, method=method, data=self.data, model=model,
                         train_tf=self.ctx.train_tf, eval_tf=self.ctx.eval_tf, features=self.ctx.features,
                         fusion_generator=torch.Generator().manual_seed(seed + 1), checkpoints=False, progress=False)
        mctx = method_context(ctx, {})
        _, head = run_stage2(ctx, mctx)
        model = method.export(model, head, mctx)
        return model, summarize(ctx.eval_head(model.classifier, "val")), mctx.results

    def test_metrics(self, model: Any) -> dict[str, Any]:
        """The only place the test split is read (its features are extracted on the first call)."""
        from .training.cache import extract_features

        if "test" not in self.ctx.features:
            extract_features(self.ctx, ("test",))
        self.test_evaluations += 1
        return self.ctx.eval_head(model.classifier, "test")


def _merge(cfg: RunConfig, *layers: dict[str, Any]) -> RunConfig:
    """Config with each layer's values applied; ``loss_kwargs`` / ``method_kwargs`` mappings are merged."""
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key in ("loss_kwargs", "method_kwargs"):
                values[key] = {**values.get(key, getattr(cfg, key)), **value}
            else:
                values[key] = value
    return dataclasses.replace(cfg, **values)


# ---------------------------------------------------------------------------------------------- tuning


class _Probe:
    """Answers every suggestion with its lower bound: tells whether a search space is empty."""

    def suggest_float(self, name: str, low: float, high: float, **_: Any) -> float:
        return low

    def suggest_int(self, name: str, low: int, high: int, **_: Any) -> int:
        return low

    def suggest_categorical(self, name: str, choices: list) -> Any:
        return choices[0]


def _default_trial(cand: Candidate, base: RunConfig) -> dict[str, Any]:
    """The published recipe and the method's published values of what it searches, as trial parameters (enqueued
    first)."""
    cfg = get_method(cand.method).resolve(_merge(dataclasses.replace(base, method=cand.method), cand.fixed))
    recipe = {f"stage2_{k}": getattr(cfg, f"stage2_{k}") for k in ("lr", "weight_decay", "epochs")}
    return {**get_method(cand.method).default_trial(), **recipe}


def tune(bench: Bench, cand: Candidate, cc: CompareConfig, storage: Any, bar: Any = None) -> dict[str, Any]:
    """Run the candidate's study up to the budget (resuming a stored one); its best trial's overrides."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar reports trials

    cls = get_method(cand.method)
    budget = cc.trials if cls.search_space(_Probe()) else 1
    study = optuna.create_study(study_name=cand.label, storage=storage, direction="maximize", load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=cc.sampler_seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # trials of a killed process are failed, then redone
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not study.trials:
        study.enqueue_trial(_default_trial(cand, bench.base), skip_if_exists=True)

    def objective(trial: Any) -> float:
        _, val, extra = bench.fit(cand, cls.search_space(trial), seed=0)
        trial.set_user_attr("val", val)
        return val["balanced"]

    def progress(study: Any, _trial: Any) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(method=cand.label, best_val=f"{study.best_value:.4f}")

    if bar is not None:
        bar.update(min(len(done), budget))
    remaining = budget - len(done)
    if remaining > 0:
        # workers sharing the storage spend one budget between them: each stops once the study holds it
        enough = optuna.study.MaxTrialsCallback(budget, states=(optuna.trial.TrialState.COMPLETE,))
        study.optimize(objective, n_trials=remaining, callbacks=[enough, progress])
    best = _best_within_budget(study, budget)
    overrides = cls.search_space(optuna.trial.FixedTrial(best.params))
    return {"overrides": overrides, "params": best.params, "best_val": best.value, "budget": budget,
            "resumed_trials": len(done), "trial_seconds": _trial_seconds(study)}


def _best_within_budget(study: Any, budget: int) -> Any:
    """The best of the first ``budget`` trials to finish (ties: the lower trial number).

    Workers that share a storage can finish a few trials past the budget (each was started while the study still
    had room); those are not counted, so every method is chosen from the same number of trials and every worker
    picks the same one.
    """
    import optuna

    finished = sorted((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE),
                      key=lambda t: (t.datetime_complete, t.number))[:budget]
    return max(finished, key=lambda t: (t.value, -t.number))


def _trial_seconds(study: Any) -> float:
    """Seconds the study's finished trials took, by the storage's own timestamps: the tuning cost, including trials
    that an earlier, interrupted run of the comparison finished (a resumed run's wall time does not see those)."""
    import optuna

    return round(sum((t.datetime_complete - t.datetime_start).total_seconds() for t in study.trials
                     if t.state == optuna.trial.TrialState.COMPLETE and t.datetime_start and t.datetime_complete), 1)


# ---------------------------------------------------------------------------------------------- evaluation


def _agg(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return {"mean": float("nan"), "std": float("nan")}
    return {"mean": float(np.mean(finite)), "std": float(statistics.stdev(finite)) if len(finite) > 1 else 0.0}


def evaluate_final(bench: Bench, cand: Candidate, overrides: dict[str, Any], seeds: int) -> dict[str, Any]:
    """Retrain for every seed and evaluate each on test once; aggregates and per-seed records."""
    records = []
    for seed in range(seeds):
        model, val, extra = bench.fit(cand, overrides, seed)
        test = bench.test_metrics(model)
        records.append({"seed": seed, "val": val, "test": summarize(test), "extra": extra,
                        "per_class": [float(a) for a in test["per_class"]]})
        if seed == 0:
            best_model = model
    agg = {split: {k: _agg([r[split][k] for r in records]) for k in SUMMARY_KEYS} for split in ("val", "test")}
    per_class = np.mean([r["per_class"] for r in records], axis=0).tolist()
    return {**agg, "per_seed": records, "per_class_mean": per_class, "_model": best_model}


def _best_loss_method(tuned: dict[str, dict[str, Any]]) -> str | None:
    """The loss-type method with the best tuned validation score (the X of "X + H2T")."""
    losses = [label for label, t in tuned.items()
              if get_method(t["candidate"].method).loss_is_fixed and get_method(t["candidate"].method).fusion_site is None]
    return max(losses, key=lambda label: tuned[label]["best_val"]) if losses else None


def _combos(tuned: dict[str, dict[str, Any]], methods: Iterable[str]) -> list[Candidate]:
    x = _best_loss_method(tuned)
    if x is None:
        return []
    cls = get_method(tuned[x]["candidate"].method)
    fixed = {"loss": cls.loss, "loss_kwargs": {**cls.loss_kwargs, **tuned[x]["overrides"].get("loss_kwargs", {})}}
    return [Candidate(f"{get_method(f).name}+{x}", f, fixed) for f in fusion_methods() if f in methods]


# ---------------------------------------------------------------------------------------------- the report


def _paired(rows: dict[str, dict[str, Any]], reference: str) -> None:
    """Per-seed test balanced-accuracy differences of every row to the reference row (same seeds, paired)."""
    ref = [r["test"]["balanced"] for r in rows[reference]["tuned"]["per_seed"]]
    for row in rows.values():
        diffs = [r["test"]["balanced"] - b for r, b in zip(row["tuned"]["per_seed"], ref)]
        row["paired_vs_best_baseline"] = {"reference": reference, "mean": float(np.mean(diffs)),
                                          "per_seed": diffs, "signs": "".join("+" if d > 0 else "-" if d < 0 else "="
                                                                              for d in diffs)}


def _pick(rows: dict[str, dict[str, Any]], baselines_only: bool) -> str:
    """The row with the best mean *validation* balanced accuracy (test never chooses)."""
    labels = [k for k, r in rows.items() if not baselines_only or get_method(r["method"]).fusion_site is None]
    return max(labels or list(rows), key=lambda k: rows[k]["tuned"]["val"]["balanced"]["mean"])


def format_report(report: dict[str, Any]) -> str:
    """The comparison as a Markdown table (percent, mean ± std over seeds), sorted by tuned test balanced."""
    def cell(d: dict[str, float]) -> str:
        return "n/a" if math.isnan(d["mean"]) else f"{100 * d['mean']:.2f} ± {100 * d['std']:.2f}"

    head = "| method | trials | " + " | ".join(SUMMARY_KEYS) + " | default recipe (balanced) | Δ vs best baseline |"
    lines = [head, "|" + "---|" * (len(SUMMARY_KEYS) + 4)]
    rows = sorted(report["methods"].items(), key=lambda kv: -kv[1]["balanced"]["mean"])
    for label, row in rows:
        paired = row["paired_vs_best_baseline"]
        lines.append(f"| `{label}` | {row['trials']} | " + " | ".join(cell(row["tuned"]["test"][k]) for k in SUMMARY_KEYS)
                     + f" | {cell(row['default']['test']['balanced'])} | {100 * paired['mean']:+.2f} ({paired['signs']}) |")
    return "\n".join(lines)


def _row(cand: Candidate, tuned: dict[str, Any], final: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    clean = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    test = final["test"]
    return {"method": cand.method, "fixed": cand.fixed, "params": tuned["overrides"], "trials": tuned["budget"],
            "tuning_s": tuned["trial_seconds"], "best_val_trial": tuned["best_val"], "balanced": test["balanced"],
            "few": test["few"], "many": test["many"], "tuned": clean(final), "default": clean(default)}


def _write_outputs(report: dict[str, Any], best: tuple[str, Any, dict], bench: Bench, out: Path) -> None:
    """comparison.json, comparison.md, the frequency plot of the top methods, and the best model with its card."""
    from .evaluation.plots import plot_accuracy_vs_frequency
    from .training.checkpoint import write_atomic_json

    out.mkdir(parents=True, exist_ok=True)
    write_atomic_json(out / "comparison.json", report)
    atomic_write_text(out / "comparison.md", format_report(report) + "\n")
    top = sorted(report["methods"], key=lambda k: -report["methods"][k]["tuned"]["val"]["balanced"]["mean"])
    per_class = {k: np.asarray(report["methods"][k]["tuned"]["per_class_mean"]) for k in top[:report["plot_top"]]}
    plot_accuracy_vs_frequency(per_class, bench.data["class_counts"], out / "accuracy_vs_frequency.png",
                               title="per-class test accuracy (mean over seeds), top methods by validation")
    label, model, row = best
    _export_best(bench, label, model, row, out / "best_model")


def _export_best(bench: Bench, label: str, model: Any, row: dict[str, Any], model_dir: Path) -> None:
    """The best-on-validation method's seed-0 model, saved with a card whose numbers are that model's test run."""
    from ._progress import quiet_transformers_bars
    from .hub.model_card import render_model_card, write_model_card

    with quiet_transformers_bars():
        model.save_pretrained(model_dir)
    seed0 = row["tuned"]["per_seed"][0]
    card_cfg = {**bench.base.to_dict(), "method": row["method"], "global_batch_size": bench.base.batch_size,
                "hyperparameters": {"selected_on": "validation", "label": label, **row["params"], **row["fixed"]},
                "hardware": f"1 process, torch {torch.__version__}", "backbone_tag": model.config.backbone_tag,
                "class_counts": bench.data["class_counts"].tolist()}
    try:
        write_model_card(render_model_card(card_cfg, seed0["test"], allow_empty_groups=True), model_dir)
    except (TypeError, ValueError) as err:
        print(f"model card not written: {err}")


# ---------------------------------------------------------------------------------------------- the comparison


def compare(base: RunConfig, cc: CompareConfig, progress: bool = True) -> dict[str, Any]:
    """Run the whole comparison; returns the report (also written to ``<output_dir>/comparison.json``)."""
    from ._progress import progress_bar as tqdm  # live on a terminal, one line in a log

    start = time.perf_counter()
    base = base.validate()
    methods = check_inputs(cc, base)
    storage = _open_storage(cc.storage_url(base.output_dir))
    bench = Bench(base, cc.seeds, progress=progress, max_epochs=cc.max_epochs)
    cands = [Candidate(get_method(m).name, m) for m in methods]
    bar = tqdm(total=cc.trials * (len(cands) + 2 * cc.combos), desc="trials", disable=not progress)
    tuned = {c.label: {**tune(bench, c, cc, storage, bar), "candidate": c} for c in cands}
    if cc.combos:
        for c in _combos(tuned, methods):
            tuned[c.label] = {**tune(bench, c, cc, storage, bar), "candidate": c}
    bar.close()
    rows, models = {}, {}
    final_start = time.perf_counter()
    for label, t in tuned.items():  # every study is finished: now, and only now, the test split is read
        final = evaluate_final(bench, t["candidate"], t["overrides"], cc.seeds)
        default = evaluate_final(bench, t["candidate"], {}, cc.seeds)
        rows[label], models[label] = _row(t["candidate"], t, final, default), final["_model"]
    reference = _pick(rows, baselines_only=True)
    _paired(rows, reference)
    best = _pick(rows, baselines_only=False)
    report = {"schema": SCHEMA, "setting": _setting(base, cc), "best_baseline": reference, "best": best,
              "methods": rows, "test_evaluations": bench.test_evaluations, "plot_top": cc.plot_top,
              "wall_time_s": round(time.perf_counter() - start, 1),
              "tuning_time_s": round(sum(t["trial_seconds"] for t in tuned.values()), 1),
              "final_time_s": round(time.perf_counter() - final_start, 1)}
    _write_outputs(report, (best, models[best], rows[best]), bench, Path(base.output_dir))
    return report


def _setting(base: RunConfig, cc: CompareConfig) -> dict[str, Any]:
    keys = ("dataset", "backbone", "imbalance_ratio", "profile", "max_per_class", "test_per_class", "val_fraction",
            "image_size", "seed", "stage1_epochs", "stage1_lr", "head_type")
    return {**{k: getattr(base, k) for k in keys}, "trials": cc.trials, "seeds": cc.seeds, "max_epochs": cc.max_epochs,
            "sampler": "optuna TPE", "sampler_seed": cc.sampler_seed, "selection": "validation balanced accuracy"}


__all__ = ["CompareConfig", "Candidate", "Bench", "compare", "check_inputs", "default_methods", "format_report",
           "tune", "evaluate_final", "main"]


# ---------------------------------------------------------------------------------------------- command line

_DATA_FLAGS: dict[str, type] = {
    "dataset": str, "label_column": str, "image_column": str, "imbalance_ratio": float, "profile": str,
    "max_per_class": int, "test_per_class": int, "val_fraction": float, "image_size": int, "backbone": str,
    "head_type": str, "stage1_epochs": int, "stage1_lr": float, "batch_size": int, "seed": int, "cache_dir": str,
    "num_workers": int, "feature_dtype": str, "init_from": str,
}


def build_parser() -> Any:
    import argparse

    def optional(cast: type) -> Any:
        return lambda s: None if s.lower() in ("none", "null") else cast(s)

    parser = argparse.ArgumentParser(prog="python -m pih2t_hub.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("comparison")
    g.add_argument("--methods", default=None,
                   help="comma-separated methods (default: every built-in method: " + ", ".join(default_methods()) + ")")
    g.add_argument("--trials", type=int, default=16, help="tuning budget per method, in Optuna trials (default: 16)")
    g.add_argument("--seeds", type=int, default=3, help="seeds of the final retraining (default: 3)")
    g.add_argument("--storage", default=None, help="Optuna RDB URL shared by several machines "
                   "(default: sqlite:///<output-dir>/study.db)")
    g.add_argument("--no-combos", action="store_true", help='do not add "X + H2T" / "X + PI-H2T" for the best loss X')
    g.add_argument("--sampler-seed", type=int, default=0, help="seed of the TPE sampler (default: 0)")
    g.add_argument("--max-epochs", type=int, default=None, help="cap on stage-2 epochs of every trial (default: none)")
    g.add_argument("--output-dir", default="outputs/compare", help="where the report goes (default: outputs/compare)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    d = parser.add_argument_group("data, backbone and stage 1 (as in recipes/finetune.py)")
    defaults = RunConfig()
    for name, cast in _DATA_FLAGS.items():
        d.add_argument("--" + name.replace("_", "-"), type=optional(cast), default=getattr(defaults, name),
                       help=f"default: {getattr(defaults, name)}")
    d.add_argument("--pretrained", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                   help="load pretrained backbone weights (default: true)")
    return parser


def configs_from_args(argv: list[str] | None = None) -> tuple[RunConfig, CompareConfig, bool]:
    args = build_parser().parse_args(argv)
    base = RunConfig(**{k: getattr(args, k) for k in _DATA_FLAGS}, pretrained=args.pretrained,
                     output_dir=args.output_dir, stage="both", stage1_mode="linear", stage2_mode="cached")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    cc = CompareConfig(methods=methods, trials=args.trials, seeds=args.seeds, storage=args.storage,
                       combos=not args.no_combos, sampler_seed=args.sampler_seed, max_epochs=args.max_epochs)
    return base, cc, not args.no_progress


def main(argv: list[str] | None = None) -> int:
    """``python -m pih2t_hub.compare`` / ``recipes/compare.py``: errors are one line on stderr, exit code 2."""
    import sys

    try:
        base, cc, progress = configs_from_args(argv)
        check_inputs(cc, base.validate())
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = compare(base, cc, progress=progress)
    print(format_report(report))
    print(f"report, plot and best model ({report['best']}) written to {base.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
