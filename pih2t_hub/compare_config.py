"""What a comparison adds to a run's configuration: the methods, the budget, the cross-validation, the storage.

Light on purpose (no torch): the comparison's command line is built from this dataclass and :class:`RunConfig`
by ``HfArgumentParser``, and ``--help`` or a bad value must answer before any heavy import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CompareConfig", "RUN_FIELDS_SET_BY_COMPARISON", "FIXED_RUN_VALUES", "FEW_SHOT_REPEATS"]

#: cross-validation repeats when ``--cv-repeats`` is unset and the train split has a few-shot class: one deal of
#: such a class's few images into folds ranks configurations mostly by which image lands where
FEW_SHOT_REPEATS = 3

#: RunConfig fields the comparison decides itself (each method's recipe and search space, one shared linear stage 1
#: on cached features, no checkpoints or Hub upload; it always resumes from its study and takes over the lock of a
#: killed comparison): not flags of the comparison.
RUN_FIELDS_SET_BY_COMPARISON = frozenset({
    "method", "loss", "sampler", "fusion_ratio", "h2tf_mode", "loss_kwargs", "method_kwargs",
    "stage", "stage1_mode", "stage2_mode", "stage2_epochs", "stage2_lr", "stage2_batch_size", "stage2_weight_decay",
    "mixup_alpha", "shift_bn", "grad_accum", "report_to", "resume", "resume_strict", "force_unlock",
    "checkpoint_every", "keep_last", "export", "push_to_hub", "hub_model_id", "hub_format",
})
#: and the values it runs them with
FIXED_RUN_VALUES: dict[str, Any] = {"stage": "both", "stage1_mode": "linear", "stage2_mode": "cached"}


def _f(default: Any, help: str) -> Any:  # noqa: A002 - argparse's name
    return field(default=default, metadata={"help": help, "group": "comparison"})


@dataclass
class CompareConfig:
    """What to compare and with which budget (data, backbone and stage-1 settings come from a ``RunConfig``)."""

    methods: list[str] | None = _f(None, "comma-separated methods; none: every built-in method")
    trials: int = _f(16, "tuning budget per method, in Optuna trials (>= 1)")
    seeds: int = _f(3, "seeds of the final retraining, each evaluated on test once (>= 1)")
    cv_folds: int = _f(5, "folds of the stratified cross-validation that scores every trial on the pooled train "
                          "and validation rows (>= 2); 1: train on the train split, score on the validation split")
    cv_repeats: int | None = _f(None, "repeats of the cross-validation, each with its own deal of the rows into "
                                      f"folds (>= 1). Unset: {FEW_SHOT_REPEATS} where the train split has a "
                                      "few-shot class (under 20 images), else 1")
    rescore: bool = _f(False, "re-score each method's best trial and recipe on as many fresh deals and judge the "
                              "recipe rule and the ranking there (removes the best trial's luck on its picking "
                              "folds, at the price of ranking on fewer deals' worth of information)")
    recipe_se: float = _f(2.0, "the best trial replaces the published recipe only if its paired gain over it "
                               "across the cross-validation parts exceeds this many standard errors (>= 0; 0: the "
                               "best trial whenever it scores higher)")
    storage: str | None = _f(None, "Optuna RDB URL shared by several machines; none: "
                                   "sqlite:///<output-dir>/study.db")
    combos: bool = _f(True, 'add "X + H2T" and "X + PI-H2T" for the best loss X')
    sampler_seed: int = _f(0, "seed of the TPE sampler")
    plot_top: int = _f(4, "methods drawn in the accuracy-vs-frequency plot")
    max_epochs: int | None = _f(None, "cap on the stage-2 epochs of every trial and retraining; none: no cap")
    jobs: int = _f(1, "worker processes that fit a trial's cross-validation parts, and the final retraining's "
                      "seeds, side by side, one thread each (CPU only; forked once the stage-1 heads are "
                      "trained). The scores do not depend on it; on a CPU with N free cores, N makes the studies "
                      "about N times faster")
    progress: bool = _f(True, "progress bars")

    def storage_url(self, output_dir: str | Path) -> str:
        return self.storage or f"sqlite:///{Path(output_dir).resolve() / 'study.db'}"

    def validate(self) -> "CompareConfig":
        """Values that cannot run, refused before any data is read."""
        for name in ("trials", "seeds", "cv_repeats", "jobs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.cv_folds < 1:
            raise ValueError(f"--cv-folds must be >= 2 (cross-validation) or 1 (the single validation split), "
                             f"got {self.cv_folds}")
        if not (isinstance(self.recipe_se, (int, float)) and 0 <= self.recipe_se < float("inf")):
            raise ValueError(f"--recipe-se must be a number >= 0, got {self.recipe_se:g}")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ValueError(f"--max-epochs must be >= 1, got {self.max_epochs}")
        return self

    @property
    def selection(self) -> str:
        """How trials are scored, in words (recorded in the report)."""
        if self.cv_folds == 1:
            return "balanced accuracy on the validation split"
        repeats = ("" if self.cv_repeats == 1 else f", {self.cv_repeats} repeats" if self.cv_repeats
                   else f", {FEW_SHOT_REPEATS} repeats with a few-shot tail")
        rule = (f"; the published recipe kept unless the best trial beats it by more than {self.recipe_se:g} "
                f"standard errors" if self.recipe_se > 0 else "")
        fresh = ", the best trial and the recipe re-scored on fresh deals" if self.rescore else ""
        return f"mean balanced accuracy of stratified {self.cv_folds}-fold cross-validation{repeats}{fresh}{rule}"
