"""The fair comparison: which long-tailed method, on this data, with this backbone, and how much does it buy?

One feature cache, many methods, the same rules for all:

1. the frozen backbone's train and validation features are extracted once;
2. every method gets **the same tuning budget**: ``trials`` Optuna trials (TPE, seeded per trial) over the search
   space the method declares. A trial is scored by stratified K-fold cross-validation on the pooled train and
   validation rows (:mod:`pih2t_hub.data.folds`; every image validates once per repeat). Each fold repeats the
   final run in miniature: its training part is split like the run's data (``val_fraction`` held out per class)
   into rows that train (its own linear CE head in stage 1, then the method) and rows that make the in-fit
   choices (best epoch, τ, DLSA's flow epochs); its validation part only scores, by balanced accuracy. Scoring on
   the rows that chose the best epoch would reward configurations whose validation curve is noisy. The trial's
   score is the mean over folds x repeats, its spread is kept. ``--cv-folds 1`` scores on the validation split
   instead (which then also makes the in-fit choices);
   ``--cv-repeats`` left unset repeats the cross-validation 3 times where the train split has a few-shot class
   (under 20 images, the evaluation's "few" group) and once otherwise;
3. the method's published recipe is the first trial, and stays the method's configuration unless the best trial
   beats it by more than ``--recipe-se`` (default 2) standard errors of their paired per-part differences: the best
   of many trials is partly the luckiest on the parts that picked it (the expected maximum of 15 standard normal
   draws is 1.7), so a smaller gain is what chance alone gives the winner. The kept configuration's score ranks the
   methods. A method without hyper-parameters (NCM, τ-norm, DLSA) needs one trial. ``--rescore`` judges the rule
   and the ranking on fresh deals of the same rows instead (as many repeats again, which chose nothing; every
   method, one trial or many, is re-scored there, so all selection scores come from the same parts): unbiased, but
   it ranks on half the deals, and measured on the benchmark settings it ranked the methods worse against test;
4. only after every study has finished is the test split read: each method's best configuration, and its
   published recipe untuned, are retrained for every seed exactly as ``recipes/finetune.py`` trains them (linear
   stage 1 on the train split, in-fit choices such as the best epoch on the validation split) and evaluated on
   test once per (method, seed);
5. "X + H2T" and "X + PI-H2T" take the best loss X (chosen on the selection score) with X's tuned loss arguments
   fixed and get the same budget over the fusion method's own space, unless a compared method already is that
   combination (``h2t_bsm``).

Studies live in an Optuna RDB storage (SQLite in the output folder by default, any URL with ``--storage``), so an
interrupted comparison resumes where it stopped, and ends with the same table as one run straight through;
several machines can share one study.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from ._atomic import atomic_write_text
from .compare_config import FEW_SHOT_REPEATS, CompareConfig
from .methods import fusion_methods, get_method, list_methods
from .training.config import RunConfig
from .training.predict import SUMMARY_KEYS, summarize

SCHEMA = "pih2t_hub.compare/4"


@dataclass(frozen=True)
class Candidate:
    """One row of the comparison: a registered method with some config values fixed (e.g. the loss of "X + H2T")."""

    label: str
    method: str
    fixed: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- validation


def check_inputs(cc: CompareConfig, base: RunConfig) -> list[str]:
    """Everything that can be refused before any extraction: names, budget, folds, validation split, storage."""
    cc.validate()
    methods = list(cc.methods) if cc.methods else default_methods()
    for name in methods:
        get_method(name)  # ValueError naming close ones
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


@dataclass
class Part:
    """Rows one fit trains on, makes its in-fit choices on and is scored on, and the stage-1 head it starts from:
    a cross-validation fold (``score`` its validation part), or the train / validation split itself (the final
    retraining, scored on test; ``--cv-folds 1``, scored on the validation split)."""

    seed: int
    features: dict[str, Any]  # "train", "val" (in-fit choices) and, for a fold, "score" feature datasets
    counts: np.ndarray  # training images per class of this part (what the method's priors see)
    head: torch.nn.Module | None = None  # its stage-1 head, trained on first use


class Bench:
    """Data, model, cached train/val features, the cross-validation folds and their stage-1 heads, shared by every
    trial; the final retraining on the train / validation split, and the only read of the test split."""

    def __init__(self, base: RunConfig, seeds: int, progress: bool = True, max_epochs: int | None = None,
                 cv_folds: int = 1, cv_repeats: int | None = 1, rescore: bool = False, jobs: int = 1) -> None:
        from .compare_workers import check_jobs
        from .training.cache import extract_features
        from .training.run import build_context, load_data, start_accelerator

        self.base = base  # stage-2 values stay unset: each method resolves its own recipe
        self.accelerator, _ = start_accelerator(base)
        self.jobs = check_jobs(jobs, self.accelerator.device.type)  # before any data is read
        self._pool: Any = None  # forked on the first score that needs it, once every stage-1 head is trained
        self.data = load_data(self.base)  # the run's steps: its splits, its model (initial head included)
        pooled = len(self.data["train"]) + len(self.data["val"])
        if cv_folds > pooled:
            raise ValueError(f"--cv-folds {cv_folds} is larger than the {pooled} pooled train and validation rows")
        self.ctx = build_context(self.base, self.accelerator, self.data, get_method("ce"))
        self.ctx.checkpoints, self.ctx.progress = False, progress
        self.initial_head = copy.deepcopy(self.ctx.model.classifier)  # where the run's own stage 1 starts
        extract_features(self.ctx, ("train", "val"))  # test: only at the final evaluation
        self.final = {s: self._split_part(s) for s in range(seeds)}
        self.cv_repeats = cv_repeats if cv_repeats is not None else auto_repeats(self.data["class_counts"])
        self.folds = self._cv_parts(cv_folds, range(self.cv_repeats))
        # fresh deals of the same rows: they score each study's winner without the luck that made it the winner
        self.rescore_parts = self._cv_parts(cv_folds, range(self.cv_repeats, 2 * self.cv_repeats)) \
            if rescore and cv_folds > 1 else []
        self.test_evaluations = 0
        self.max_epochs = max_epochs

    def _split_part(self, seed: int) -> Part:
        return Part(seed, {k: self.ctx.features[k] for k in ("train", "val")}, self.data["class_counts"])

    def _cv_parts(self, k: int, repeats: range) -> list[Part]:
        """One part per (repeat, fold) of the pooled rows for the given repeats (repeat ``r`` deals its folds with
        seed ``seed + r``, whichever other repeats are asked for); ``k == 1``: the validation split, one seed per
        repeat.

        A fold's training part is split as the run splits its data (:func:`~pih2t_hub.data.splits.stratified_split`
        with ``val_fraction``, seeded per fold): most rows train, the held-out ones make the in-fit choices, and the
        fold's validation part is only scored. A class whose every pooled image validates in one fold (a single
        image) has no training image there: its count is taken as 1 so that count-based priors (logit adjustment,
        balanced softmax, class-balanced weights) stay finite; its validation image is scored like any other.
        """
        from torch.utils.data import TensorDataset

        from .data.folds import cv_folds
        from .data.splits import stratified_split

        if k == 1:
            return [self.final.get(r) or self._split_part(r) for r in repeats]
        tr, va = self.ctx.features["train"].tensors, self.ctx.features["val"].tensors
        x, y = torch.cat([tr[0], va[0]]), torch.cat([tr[1], va[1]])
        n = self.data["num_classes"]
        parts = []
        for fold in cv_folds(y.numpy(), k, repeats.stop, seed=self.base.seed):
            if fold.repeat not in repeats:
                continue
            seed = int(np.random.SeedSequence([self.base.seed, fold.repeat, fold.fold]).generate_state(1)[0])
            keep, held = stratified_split(y[fold.train].numpy(), self.base.val_fraction, seed=seed)
            rows = {"train": fold.train[keep], "val": fold.train[held], "score": fold.val}
            counts = np.maximum(np.bincount(y.numpy()[rows["train"]], minlength=n), 1)
            parts.append(Part(fold.repeat, {name: TensorDataset(x[r], y[r]) for name, r in rows.items()}, counts))
        return parts

    def _context(self, cfg: RunConfig, method: Any, part: Part, model: Any) -> Any:
        from .training.context import RunContext

        return RunContext(accelerator=self.accelerator, cfg=cfg, method=method,
                          data={**self.data, "class_counts": part.counts}, model=model, train_tf=self.ctx.train_tf,
                          eval_tf=self.ctx.eval_tf, features=dict(part.features),
                          fusion_generator=torch.Generator().manual_seed(cfg.seed + 1), checkpoints=False,
                          progress=False)

    def _stage1_head(self, part: Part) -> torch.nn.Module:
        """The part's linear CE head on its training rows. The run's seed starts from the model's own initial head
        (so the final retraining of that seed is the run ``recipes/finetune.py`` makes); other seeds from a head
        initialised after seeding with theirs."""
        from accelerate.utils import set_seed

        from .models.pih2t.heads import build_head
        from .training.stage1 import linear_stage1

        if part.head is None:
            c = self.ctx.model.config
            set_seed(part.seed)
            head = (copy.deepcopy(self.initial_head) if part.seed == self.base.seed else
                    build_head(c.head_type, c.num_features, c.num_labels, bias=c.head_bias, scale=c.cosine_scale))
            model = copy.deepcopy(self.ctx.model)
            model.classifier = head
            ctx = self._context(dataclasses.replace(self.base, seed=part.seed), self.ctx.method, part, model)
            linear_stage1(ctx)
            part.head = copy.deepcopy(head)
        return part.head

    def fit(self, cand: Candidate, overrides: dict[str, Any], part: Part) -> tuple[Any, dict[str, float], dict]:
        """Train the candidate with ``overrides`` on the part's training rows from its stage-1 head; the metrics of
        the part's scored rows (a fold's validation part; the validation split of a train / validation part)."""
        from accelerate.utils import set_seed

        from .training.run import train_stage2

        cls = get_method(cand.method)
        cfg = self.config_for(cand, overrides, part.seed)
        head = self._stage1_head(part)
        set_seed(part.seed)  # a fit never depends on what ran before it in the process (resumed = straight through)
        method = cls(cfg)
        model = copy.deepcopy(self.ctx.model)
        model.classifier = copy.deepcopy(head)
        ctx = self._context(cfg, method, part, model)
        extra: dict[str, Any] = {}  # what the method reports of its fit (e.g. the τ it chose)
        train_stage2(ctx, extra)  # the run's stage-2 step: the method's head, exported into ctx.model
        scored = "score" if "score" in part.features else "val"
        return ctx.model, summarize(ctx.eval_head(ctx.model.classifier, scored)), extra

    def config_for(self, cand: Candidate, overrides: dict[str, Any], seed: int) -> RunConfig:
        """The resolved run config a fit of the candidate with ``overrides`` trains with (epochs capped)."""
        cls = get_method(cand.method)
        cfg = cls.resolve(_merge(dataclasses.replace(self.base, method=cand.method, seed=seed), cand.fixed,
                                 overrides)).validate()
        if self.max_epochs is not None and cfg.stage2_epochs is not None:
            cfg = dataclasses.replace(cfg, stage2_epochs=min(cfg.stage2_epochs, self.max_epochs))
        return cfg

    def score(self, cand: Candidate, overrides: dict[str, Any]) -> list[float]:
        """Balanced accuracy on the scored rows of every cross-validation part (what a trial is tuned on)."""
        return self._balanced(cand, overrides, "folds")

    def rescore(self, cand: Candidate, overrides: dict[str, Any]) -> list[float] | None:
        """Balanced accuracy on the scored rows of every re-scoring part: fresh deals of the same pooled rows, which
        no trial was chosen on. None without ``--rescore``, and with ``--cv-folds 1`` (no other validation data)."""
        return self._balanced(cand, overrides, "rescore_parts") if self.rescore_parts else None

    def _balanced(self, cand: Candidate, overrides: dict[str, Any], which: str) -> list[float]:
        """The scores of the parts in ``getattr(self, which)``, in order: here, or side by side in ``jobs`` forked
        workers (each fit seeds itself from its part, so where it runs does not change what it computes)."""
        parts = getattr(self, which)
        if self.jobs == 1 or len(parts) == 1:
            return [self.fit(cand, overrides, part)[1]["balanced"] for part in parts]
        return self._workers().scores(cand, overrides, which, range(len(parts)))

    def final_fits(self, cand: Candidate, overrides: dict[str, Any],
                   seeds: int) -> Iterator[tuple[Any, dict[str, float], dict]]:
        """The final retraining's fits of seeds 0 .. seeds-1, in order (model, validation metrics, extra): here, or
        side by side in the workers (the models come back; the test split is read only here)."""
        if self.jobs == 1 or seeds == 1:
            return (self.fit(cand, overrides, self.final[seed]) for seed in range(seeds))
        return self._workers().fits(cand, overrides, "final", range(seeds))

    def _workers(self) -> Any:
        """The worker processes, forked on first use once every part's stage-1 head is trained (here, once, not
        once per worker)."""
        if self._pool is None:
            from .compare_workers import PartPool

            for part in [*self.folds, *self.rescore_parts, *self.final.values()]:
                self._stage1_head(part)
            self._pool = PartPool(self, self.jobs)
        return self._pool

    def close(self) -> None:
        """Stop the worker processes (if any were forked)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def test_metrics(self, model: Any) -> dict[str, Any]:
        """The only place the test split is read (its features are extracted on the first call)."""
        from .training.cache import extract_features

        if "test" not in self.ctx.features:
            extract_features(self.ctx, ("test",))
        self.test_evaluations += 1
        return self.ctx.eval_head(model.classifier, "test")


def auto_repeats(class_counts: Iterable[int]) -> int:
    """``--cv-repeats`` left unset: :data:`FEW_SHOT_REPEATS` where a class of the train split is few-shot (the
    evaluation's own "few" group, under 20 images), else 1."""
    from .data.shots import shot_groups

    return FEW_SHOT_REPEATS if (shot_groups(np.asarray(list(class_counts))) == "few").any() else 1


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
    """Answers every suggestion with its lower bound and records what it was asked: tells whether a search space is
    empty, and whether two methods search the same space."""

    def __init__(self) -> None:
        self.asked: list[tuple] = []

    def suggest_float(self, name: str, low: float, high: float, **kw: Any) -> float:
        self.asked.append(("float", name, low, high, sorted(kw.items())))
        return low

    def suggest_int(self, name: str, low: int, high: int, **kw: Any) -> int:
        self.asked.append(("int", name, low, high, sorted(kw.items())))
        return low

    def suggest_categorical(self, name: str, choices: list) -> Any:
        self.asked.append(("categorical", name, list(choices)))
        return choices[0]


def _space(method: str) -> list[tuple]:
    """What the method's search space asks of a trial, in order."""
    probe = _Probe()
    get_method(method).search_space(probe)
    return probe.asked


def _budget(method: str, trials: int) -> int:
    """The trials a method's study gets: the budget, or one where the method has nothing to tune."""
    return trials if _space(method) else 1


def _default_trial(cand: Candidate, base: RunConfig) -> dict[str, Any]:
    """The published recipe and the method's published values of what it searches, as trial parameters (enqueued
    first)."""
    cfg = get_method(cand.method).resolve(_merge(dataclasses.replace(base, method=cand.method), cand.fixed))
    recipe = {f"stage2_{k}": getattr(cfg, f"stage2_{k}") for k in ("lr", "weight_decay", "epochs")}
    return {**get_method(cand.method).default_trial(), **recipe}


def _trial_seeded_tpe(seed: int) -> Any:
    """A TPE sampler whose random state is re-derived before every trial from (seed, trials completed before it).

    Optuna's sampler draws from one random stream for the life of the process, so a study resumed in a new
    process drew other configurations than the same study run straight through (and could pick another winner).
    Seeding each trial from the number of trials completed before it makes the k-th trial's draw the same either
    way: the completed trials (values included) are the same, and so is the state they are drawn from.
    """
    import optuna

    class TrialSeededTPE(optuna.samplers.TPESampler):
        def before_trial(self, study: Any, trial: Any) -> None:
            done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
            state = int(np.random.SeedSequence([seed, done]).generate_state(1)[0])
            self._rng.rng.seed(state)
            self._random_sampler._rng.rng.seed(state)
            super().before_trial(study, trial)

    return TrialSeededTPE(seed=seed)


def _clean_running(study: Any, exclusive: bool) -> None:
    """Fail the trials a killed process left RUNNING, so that they are redone and no sampler counts them.

    ``exclusive``: the study lives in this comparison's own (locked) output folder, so every RUNNING trial is a
    dead one; in a shared storage only those whose heartbeat stopped are.
    """
    import warnings

    import optuna

    if not exclusive:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        return
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL)


def _enqueue_recipe(study: Any, cand: Candidate, base: RunConfig) -> None:
    """The published recipe is the study's first trial: enqueued unless it finished or waits (again after a kill
    during it)."""
    import optuna

    live = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.WAITING)
    if not any("fixed_params" in t.system_attrs for t in study.get_trials(deepcopy=False, states=live)):
        study.enqueue_trial(_default_trial(cand, base))


def _protocol(base: RunConfig, cc: CompareConfig) -> dict[str, Any]:
    """What a trial's score depends on: the data, the backbone, the folds and repeats, the sampler. Not the budget,
    the final seeds, the recipe rule or the worker count, which a resumed comparison may change without
    invalidating a trial."""
    skip = ("trials", "seeds", "recipe_se", "rescore", "selection", "jobs")
    return {k: v for k, v in _setting(base, cc).items() if k not in skip}


def _check_protocol(storage: Any, protocol: dict[str, Any]) -> None:
    """Refuse to resume studies whose trials were scored another way (their scores would be mixed with this
    comparison's); a study from before the protocol was recorded is taken as it is."""
    import optuna

    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        theirs = summary.user_attrs.get("protocol")
        if theirs is not None and theirs != protocol:
            changed = ", ".join(f"{k}={theirs.get(k)!r} there, {v!r} here" for k, v in protocol.items()
                                if theirs.get(k) != v)
            raise ValueError(f"the stored study {summary.study_name!r} scored its trials another way ({changed}): "
                             f"use another --output-dir or --storage")


def _open_study(cand: Candidate, cc: CompareConfig, storage: Any, exclusive: bool,
                protocol: dict[str, Any] | None = None) -> Any:
    import optuna

    # the progress bar reports trials; a failed trial's error (Ctrl-C included) propagates and is reported once,
    # by the command line, not also as Optuna's warning with its traceback
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(study_name=cand.label, storage=storage, direction="maximize", load_if_exists=True,
                                sampler=_trial_seeded_tpe(cc.sampler_seed))
    if protocol is not None and "protocol" not in study.user_attrs:
        study.set_user_attr("protocol", protocol)
    _clean_running(study, exclusive)
    return study


def tune(bench: Bench, cand: Candidate, cc: CompareConfig, storage: Any, bar: Any = None,
         exclusive: bool = False) -> dict[str, Any]:
    """Run the candidate's study up to the budget (resuming a stored one); its best trial's overrides and score.

    A trial's score is the mean balanced accuracy over the cross-validation parts; the per-part values and their
    spread are kept with the trial. With ``--rescore`` the best trial and the recipe are then re-scored on fresh
    deals (:func:`_rescore`), as is the single trial of a method with nothing to tune (every method's selection
    score then comes from the same parts, so they compare pairwise), and the rule below is judged there.
    The recipe is kept unless the best trial's paired gain over it exceeds ``cc.recipe_se`` standard errors
    (``recipe_kept``); the kept configuration's score is the method's selection score, and the best trial's score
    on its tuning parts is reported beside it.
    """
    import optuna

    cls = get_method(cand.method)
    budget = _budget(cand.method, cc.trials)
    study = _open_study(cand, cc, storage, exclusive, _protocol(bench.base, cc))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    _enqueue_recipe(study, cand, bench.base)

    def objective(trial: Any) -> float:
        scores = bench.score(cand, cls.search_space(trial))
        trial.set_user_attr("scores", scores)
        return float(np.mean(scores))

    def progress(study: Any, _trial: Any) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(method=cand.label, best=f"{study.best_value:.4f}")

    if bar is not None:
        bar.update(min(len(done), budget))
    remaining = budget - len(done)
    if remaining > 0:
        # workers sharing the storage spend one budget between them: each stops once the study holds it
        enough = optuna.study.MaxTrialsCallback(budget, states=(optuna.trial.TrialState.COMPLETE,))
        study.optimize(objective, n_trials=remaining, callbacks=[enough, progress])
    top = _best_within_budget(study, budget)
    recipe = _recipe_trial(study)
    # without --rescore, fresh scores a --rescore run left in the study are not read
    rescored = _rescore(study, bench, cand, [top, recipe]) if cc.rescore else None
    scores = (lambda t: rescored[t.number]) if rescored else _tuning_scores  # noqa: E731
    gain = _paired_gain(scores(top), scores(recipe)) if recipe is not None and top.number != recipe.number else None
    keep = gain is not None and not gain["mean"] > cc.recipe_se * gain["se"]
    best = recipe if keep else top
    overrides = cls.search_space(optuna.trial.FixedTrial(best.params))
    selection = _spread(scores(best))
    return {"overrides": overrides, "params": best.params, "best_val": selection["mean"], "budget": budget,
            "selection": selection, "recipe_selection": _spread(scores(recipe)) if recipe is not None else None,
            "best_trial_selection": _spread(_tuning_scores(top)),
            "best_trial_rescored": _spread(scores(top)) if rescored else None, "rescored": rescored is not None,
            "gain_over_recipe": gain, "recipe_kept": keep, "resumed_trials": len(done),
            "trial_seconds": round(_trial_seconds(study)
                                   + (study.user_attrs.get("rescore_seconds", 0.0) if rescored else 0.0), 1)}


def _rescore(study: Any, bench: Bench, cand: Candidate, trials: list[Any]) -> dict[int, list[float]] | None:
    """The trials' scores on the bench's re-scoring parts, by trial number; None where the bench has none.

    The best of many trials scored on the same parts is partly the luckiest on those parts, so its score there
    overstates it, by more the more trials and the noisier the parts: its gain over the recipe and its rank among
    methods are judged on fresh deals instead. The scores are stored with the study (and the seconds they took), so
    a resumed comparison reuses them; a fit is deterministic, so recomputing would give the same numbers.
    """
    import optuna

    cls, stored, out = get_method(cand.method), study.user_attrs, {}  # one read of the storage
    for trial in {t.number: t for t in trials if t is not None}.values():
        key = f"rescore_{trial.number}"
        if key not in stored:
            start = time.perf_counter()
            found = bench.rescore(cand, cls.search_space(optuna.trial.FixedTrial(trial.params)))
            if found is None:
                return None
            stored[key] = found
            stored["rescore_seconds"] = stored.get("rescore_seconds", 0.0) + time.perf_counter() - start
            study.set_user_attr(key, found)
            study.set_user_attr("rescore_seconds", stored["rescore_seconds"])
        out[trial.number] = list(stored[key])
    return out


def _tuning_scores(trial: Any) -> list[float]:
    """A trial's per-part scores on the parts it was tuned on."""
    return list(trial.user_attrs.get("scores", [trial.value]))


def _paired_gain(ours: list[float], theirs: list[float]) -> dict[str, float] | None:
    """Mean and standard error of the per-part score differences of a trial to the recipe (the same parts, paired).

    None when there is a single part (``--cv-folds 1 --cv-repeats 1``): no spread to judge a gain by, so the best
    trial is taken as it is.
    """
    if len(ours) < 2 or len(ours) != len(theirs):
        return None
    diffs = [a - b for a, b in zip(ours, theirs)]
    return {"mean": float(np.mean(diffs)), "se": float(statistics.stdev(diffs) / math.sqrt(len(diffs))),
            "parts": len(diffs)}


def _recipe_trial(study: Any) -> Any:
    import optuna

    return next((t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                 if "fixed_params" in t.system_attrs), None)


def _spread(scores: list[float]) -> dict[str, Any]:
    """A selection score: mean, standard deviation and number of the cross-validation parts' values."""
    std = float(statistics.stdev(scores)) if len(scores) > 1 else 0.0
    return {"mean": float(np.mean(scores)), "std": std, "parts": len(scores)}


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


def evaluate_final(bench: Bench, cand: Candidate, overrides: dict[str, Any], seeds: int,
                   bar: Any = None) -> dict[str, Any]:
    """Retrain for every seed on the train / validation split and evaluate each on test once; aggregates and
    per-seed records."""
    records = []
    for seed, (model, val, extra) in enumerate(bench.final_fits(cand, overrides, seeds)):
        test = bench.test_metrics(model)
        records.append({"seed": seed, "val": val, "test": summarize(test), "extra": extra,
                        "per_class": [float(a) for a in test["per_class"]]})
        if seed == 0:
            best_model = model
        if bar is not None:
            bar.update(1)
            bar.set_postfix(method=cand.label)
    agg = {split: {k: _agg([r[split][k] for r in records]) for k in SUMMARY_KEYS} for split in ("val", "test")}
    per_class = np.mean([r["per_class"] for r in records], axis=0).tolist()
    return {**agg, "per_seed": records, "per_class_mean": per_class, "_model": best_model}


def _best_loss_method(tuned: dict[str, dict[str, Any]]) -> str | None:
    """The loss-type method with the best selection score (the X of "X + H2T")."""
    losses = [label for label, t in tuned.items()
              if get_method(t["candidate"].method).loss_is_fixed and get_method(t["candidate"].method).fusion_site is None]
    return max(losses, key=lambda label: tuned[label]["best_val"]) if losses else None


def _combos(bench: Bench, tuned: dict[str, dict[str, Any]], methods: Iterable[str]) -> list[Candidate]:
    """"F + X" for every fusion method F compared and the best loss X, except where a compared method already is
    that combination (H2T with balanced softmax is ``h2t_bsm``): the same recipe over the same search space would
    run the same study again and count one configuration as two rows."""
    x = _best_loss_method(tuned)
    if x is None:
        return []
    cls = get_method(tuned[x]["candidate"].method)
    fixed = {"loss": cls.loss, "loss_kwargs": {**cls.loss_kwargs, **tuned[x]["overrides"].get("loss_kwargs", {})}}
    combos = [Candidate(f"{get_method(f).name}+{x}", f, fixed) for f in fusion_methods() if f in methods]
    return [c for c in combos if _same_study(bench, c, [t["candidate"] for t in tuned.values()]) is None]


def _same_study(bench: Bench, cand: Candidate, others: list[Candidate]) -> str | None:
    """The label of another candidate whose study would be this one's: the same resolved recipe (its method's name
    aside) and the same search space."""
    def recipe(c: Candidate) -> RunConfig:
        return dataclasses.replace(bench.config_for(c, {}, bench.base.seed), method="")

    mine, space = recipe(cand), _space(cand.method)
    return next((o.label for o in others if _space(o.method) == space and recipe(o) == mine), None)


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
    """The row with the best selection score (cross-validation, or the validation split; test never chooses)."""
    labels = [k for k, r in rows.items() if not baselines_only or get_method(r["method"]).fusion_site is None]
    return max(labels or list(rows), key=lambda k: rows[k]["selection"]["mean"])


def format_report(report: dict[str, Any]) -> str:
    """The comparison as a Markdown table (percent), sorted by tuned test balanced, the chosen method marked."""
    def cell(d: dict[str, float] | None) -> str:
        return "n/a" if d is None or math.isnan(d["mean"]) else f"{100 * d['mean']:.2f} ± {100 * d['std']:.2f}"

    head = ("| method | trials | selection | recipe selection | " + " | ".join(SUMMARY_KEYS)
            + " | recipe test (balanced) | Δ vs best baseline |")
    lines = [head, "|" + "---|" * (len(SUMMARY_KEYS) + 6)]
    rows = sorted(report["methods"].items(), key=lambda kv: -kv[1]["balanced"]["mean"])
    for label, row in rows:
        paired, mark = row["paired_vs_best_baseline"], " **chosen**" if label == report["best"] else ""
        mark += " (recipe kept)" if row.get("recipe_kept") else ""
        lines.append(f"| `{label}`{mark} | {row['trials']} | {cell(row['selection'])} | "
                     f"{cell(row['recipe_selection'])} | "
                     + " | ".join(cell(row["tuned"]["test"][k]) for k in SUMMARY_KEYS)
                     + f" | {cell(row['default']['test']['balanced'])} | {100 * paired['mean']:+.2f} ({paired['signs']}) |")
    setting = report["setting"]
    lines += ["", f"`{report['best']}` is chosen on the selection score: {setting['selection']} (mean ± std "
              f"over its parts), never on test; (recipe kept): no trial beat the published recipe by more than "
              f"{setting.get('recipe_se', 0):g} standard errors. Test columns: mean ± std over {setting['seeds']} "
              f"seeds; Δ: paired "
              f"per-seed test balanced-accuracy difference to the best baseline `{report['best_baseline']}`."]
    return "\n".join(lines)


def _row(cand: Candidate, tuned: dict[str, Any], final: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    clean = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    test = final["test"]
    return {"method": cand.method, "fixed": cand.fixed, "params": tuned["overrides"], "trials": tuned["budget"],
            "tuning_s": tuned["trial_seconds"], "selection": tuned["selection"],
            "recipe_selection": tuned["recipe_selection"], "best_trial_selection": tuned["best_trial_selection"],
            "best_trial_rescored": tuned["best_trial_rescored"], "rescored": tuned["rescored"],
            "gain_over_recipe": tuned["gain_over_recipe"], "recipe_kept": tuned["recipe_kept"],
            "balanced": test["balanced"], "few": test["few"],
            "many": test["many"], "tuned": clean(final), "default": clean(default)}


def _write_outputs(report: dict[str, Any], best: tuple[str, Any, dict], bench: Bench, out: Path) -> None:
    """comparison.json, comparison.md, the frequency plot of the top methods, and the best model with its card."""
    from .evaluation.plots import plot_accuracy_vs_frequency
    from .training.checkpoint import write_atomic_json

    out.mkdir(parents=True, exist_ok=True)
    write_atomic_json(out / "comparison.json", report)
    atomic_write_text(out / "comparison.md", format_report(report) + "\n")
    top = sorted(report["methods"], key=lambda k: -report["methods"][k]["selection"]["mean"])
    per_class = {k: np.asarray(report["methods"][k]["tuned"]["per_class_mean"]) for k in top[:report["plot_top"]]}
    plot_accuracy_vs_frequency(per_class, bench.data["class_counts"], out / "accuracy_vs_frequency.png",
                               title="per-class test accuracy (mean over seeds), top methods by selection score")
    label, model, row = best
    _export_best(bench, label, model, row, out / "best_model")


def _export_best(bench: Bench, label: str, model: Any, row: dict[str, Any], model_dir: Path) -> None:
    """The chosen method's seed-0 model, saved with a card whose numbers are that model's test run."""
    from ._progress import quiet_transformers_bars
    from .hub.model_card import render_model_card, write_model_card

    with quiet_transformers_bars():
        model.save_pretrained(model_dir)
    seed0 = row["tuned"]["per_seed"][0]
    card_cfg = {**bench.base.to_dict(), "method": row["method"], "global_batch_size": bench.base.batch_size,
                "hyperparameters": {"selected_on": "cross-validation", "label": label, **row["params"],
                                    **row["fixed"]},
                "hardware": f"1 process, torch {torch.__version__}", "backbone_tag": model.config.backbone_tag,
                "class_counts": bench.data["class_counts"].tolist()}
    try:
        write_model_card(render_model_card(card_cfg, seed0["test"], allow_empty_groups=True), model_dir)
    except (TypeError, ValueError) as err:
        print(f"model card not written: {err}")


# ---------------------------------------------------------------------------------------------- the comparison


def compare(base: RunConfig, cc: CompareConfig, progress: bool | None = None) -> dict[str, Any]:
    """Run the whole comparison; returns the report (also written to ``<output_dir>/comparison.json``).

    The output folder is locked for the comparison (a live comparison in it is refused; the lock of a killed one is
    taken over, since resuming from the study is what a restart does); with the default storage (a SQLite study in
    that folder) every trial left running is then a killed one, and is redone.
    """
    import sys

    from .training.lock import output_lock

    from .training.preflight import preflight

    progress = cc.progress if progress is None else progress
    base = preflight(base)  # validated; a dataset path or backbone that does not exist: one line, here
    methods = check_inputs(cc, base)
    report = lambda message: print(message.split(": taken over")[0] + ": resuming", file=sys.stderr)  # noqa: E731
    with output_lock(base.output_dir, force=True, report=report):
        return _compare(base, cc, methods, progress)


def _tune_all(bench: Bench, cc: CompareConfig, methods: list[str], storage: Any, exclusive: bool,
              progress: bool) -> dict[str, dict[str, Any]]:
    import sys

    from ._progress import progress_bar as tqdm  # live on a terminal, one line in a log

    cands = [Candidate(get_method(m).name, m) for m in methods]
    fusions = [m for m in fusion_methods() if m in methods] if cc.combos else []
    bar = tqdm(total=sum(_budget(m, cc.trials) for m in [*methods, *fusions]), desc="trials", disable=not progress)
    tuned: dict[str, dict[str, Any]] = {}

    def run(c: Candidate) -> None:
        tuned[c.label] = {**tune(bench, c, cc, storage, bar, exclusive), "candidate": c}
        if tuned[c.label]["resumed_trials"]:
            bar.write(f"resuming: {tuned[c.label]['resumed_trials']} trials done ({c.label})", file=sys.stderr)

    for c in cands:
        run(c)
    combos = _combos(bench, tuned, methods) if cc.combos else []
    if len(combos) < len(fusions):  # a combination that is a compared method is not run
        bar.total = bar.n + sum(_budget(c.method, cc.trials) for c in combos)
        bar.refresh()
    for c in combos:
        run(c)
    bar.close()
    return tuned


def _compare(base: RunConfig, cc: CompareConfig, methods: list[str], progress: bool) -> dict[str, Any]:
    start = time.perf_counter()
    storage = _open_storage(cc.storage_url(base.output_dir))
    bench = Bench(base, cc.seeds, progress=progress, max_epochs=cc.max_epochs, cv_folds=cc.cv_folds,
                  cv_repeats=cc.cv_repeats, rescore=cc.rescore, jobs=cc.jobs)
    cc = dataclasses.replace(cc, cv_repeats=bench.cv_repeats)  # what ran is what is recorded
    _check_protocol(storage, _protocol(base, cc))
    try:
        tuned = _tune_all(bench, cc, methods, storage, cc.storage is None, progress)
        final_start = time.perf_counter()
        rows, models = _retrain_all(bench, cc, tuned, progress)
    finally:
        bench.close()
    reference = _pick(rows, baselines_only=True)
    _paired(rows, reference)
    best = _pick(rows, baselines_only=False)
    report = {"schema": SCHEMA, "setting": _setting(base, cc), "best_baseline": reference, "best": best,
              "chosen_on": cc.selection, "methods": rows, "test_evaluations": bench.test_evaluations,
              "plot_top": cc.plot_top, "wall_time_s": round(time.perf_counter() - start, 1),
              "tuning_time_s": round(sum(t["trial_seconds"] for t in tuned.values()), 1),
              "final_time_s": round(time.perf_counter() - final_start, 1)}
    _write_outputs(report, (best, models[best], rows[best]), bench, Path(base.output_dir))
    return report


def _retrain_all(bench: Bench, cc: CompareConfig, tuned: dict[str, dict[str, Any]],
                 progress: bool) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Every method's chosen configuration and published recipe retrained per seed and evaluated on test: the
    report's rows, and each row's seed-0 model."""
    from ._progress import progress_bar as tqdm  # live on a terminal, one line in a log

    rows, models = {}, {}
    bar = tqdm(total=2 * cc.seeds * len(tuned), desc="final retraining", disable=not progress)
    for label, t in tuned.items():  # every study is finished: now, and only now, the test split is read
        method_start = time.perf_counter()
        final = evaluate_final(bench, t["candidate"], t["overrides"], cc.seeds, bar)
        # the published recipe retrained only where tuning chose something else: a fit is deterministic, so the
        # same config would give the same models (methods with nothing to tune, or whose recipe won its study)
        same = bench.config_for(t["candidate"], t["overrides"], 0) == bench.config_for(t["candidate"], {}, 0)
        default = final if same else evaluate_final(bench, t["candidate"], {}, cc.seeds, bar)
        if same and bar is not None:
            bar.update(cc.seeds)
        rows[label], models[label] = _row(t["candidate"], t, final, default), final["_model"]
        rows[label]["recipe_is_tuned"] = same
        rows[label]["final_s"] = round(time.perf_counter() - method_start, 1)  # its retraining and test runs
    bar.close()
    return rows, models


def _setting(base: RunConfig, cc: CompareConfig) -> dict[str, Any]:
    keys = ("dataset", "backbone", "imbalance_ratio", "profile", "max_per_class", "test_per_class", "val_fraction",
            "image_size", "seed", "stage1_epochs", "stage1_lr", "head_type")
    return {**{k: getattr(base, k) for k in keys}, "trials": cc.trials, "seeds": cc.seeds, "max_epochs": cc.max_epochs,
            "cv_folds": cc.cv_folds, "cv_repeats": cc.cv_repeats, "recipe_se": cc.recipe_se, "rescore": cc.rescore,
            "sampler": "optuna TPE, seeded per trial",
            "sampler_seed": cc.sampler_seed, "selection": cc.selection, "jobs": cc.jobs}


def main(argv: list[str] | None = None) -> int:
    """``python -m pih2t_hub.compare``: the comparison's command line (:mod:`pih2t_hub.compare_cli`)."""
    from .compare_cli import main as cli_main

    return cli_main(argv)


__all__ = ["CompareConfig", "Candidate", "Bench", "Part", "compare", "check_inputs", "default_methods",
           "format_report", "tune", "evaluate_final", "main"]


if __name__ == "__main__":
    raise SystemExit(main())
