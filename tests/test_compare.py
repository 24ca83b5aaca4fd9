"""The fair comparison on digits-LT with a tiny random backbone and a small budget: trials scored by cross-validation
on the pooled rows, the test split read only after every study finished, the same seed gives the same table, a
SIGKILL mid-study then a restart gives the table of a run straight through, bad input is one line."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import dataclasses
import json
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from pih2t_hub import compare as cmp
from pih2t_hub.training.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = dict(backbone="test_resnet", pretrained=False, dataset="digits", image_size=32, max_per_class=60,
            imbalance_ratio=10, test_per_class=20, batch_size=64, stage1_epochs=2)
METHODS = ["ce", "logit_adjusted", "h2t", "tau_norm"]


class CountingSplit:
    """Delegates to a datasets.Dataset and records the wall-clock time of every attribute access."""

    def __init__(self, ds) -> None:
        object.__setattr__(self, "_ds", ds)
        object.__setattr__(self, "reads", [])

    def __getattr__(self, name):
        self.reads.append(datetime.now())
        return getattr(self._ds, name)

    def __len__(self) -> int:
        self.reads.append(datetime.now())
        return len(self._ds)

    def __getitem__(self, key):
        self.reads.append(datetime.now())
        return self._ds[key]


def _last_trial_completed(db: Path) -> datetime:
    import optuna

    url = f"sqlite:///{db}"
    ends = [t.datetime_complete for s in optuna.get_all_study_summaries(url)
            for t in optuna.load_study(study_name=s.study_name, storage=url).trials if t.datetime_complete]
    return max(ends)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same comparison twice; the first one's test split counts its reads."""
    import pih2t_hub.data.splits as splits

    original = splits.load_splits
    counted: list[CountingSplit] = []

    def counting_load_splits(cfg):
        data = original(cfg)
        data["test"] = CountingSplit(data["test"])
        counted.append(data["test"])
        return data

    reports = []
    for name in ("a", "b"):
        out = tmp_path_factory.mktemp(f"compare_{name}")
        base = RunConfig(**DATA, output_dir=str(out))
        cc = cmp.CompareConfig(methods=METHODS, trials=3, seeds=2, max_epochs=4)
        splits.load_splits = counting_load_splits
        try:
            reports.append((out, cmp.compare(base, cc, progress=False)))
        finally:
            splits.load_splits = original
    return reports, counted


def test_test_split_is_read_only_after_every_study_finished(two_runs) -> None:
    reports, splits_read = two_runs
    out, report = reports[0]
    counted = splits_read[0]
    assert counted.reads, "the test split was never read"
    assert min(counted.reads) > _last_trial_completed(out / "study.db")
    labels = set(report["methods"])
    assert labels == {"ce", "logit_adjusted", "h2t", "tau_norm", "h2t+logit_adjusted"}  # X = the only loss method
    # once per (method, seed) for the tuned configuration and once for the published recipe where it differs
    # (tau_norm has nothing to tune: its recipe is its tuned configuration, trained once)
    assert report["methods"]["tau_norm"]["recipe_is_tuned"] is True
    fits = sum(1 if row["recipe_is_tuned"] else 2 for row in report["methods"].values())
    assert report["test_evaluations"] == fits * 2
    for row in report["methods"].values():
        if row["recipe_is_tuned"]:
            assert row["default"]["per_seed"] == row["tuned"]["per_seed"]


def test_equal_budget_and_published_recipe_as_first_trial(two_runs) -> None:
    import optuna

    out, report = two_runs[0][0]
    url = f"sqlite:///{out / 'study.db'}"
    for label, row in report["methods"].items():
        trials = optuna.load_study(study_name=label, storage=url).trials
        expected = 1 if label == "tau_norm" else 3  # τ-norm has nothing to tune (τ is chosen on validation)
        assert row["trials"] == expected == len([t for t in trials if t.state.name == "COMPLETE"])
    crt_like = optuna.load_study(study_name="logit_adjusted", storage=url).trials[0].params
    assert (crt_like["stage2_lr"], crt_like["stage2_epochs"], crt_like["tau"]) == (0.2, 30, 1.0)
    assert report["methods"]["h2t+logit_adjusted"]["fixed"]["loss"] == "logit_adjusted"


def test_report_schema_table_plot_and_best_model(two_runs) -> None:
    out, report = two_runs[0][0]
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["schema"] == "pih2t_hub.compare/4" and saved["best"] in saved["methods"]
    assert saved["setting"]["cv_repeats"] == 3  # left unset, resolved from the few-shot tail, recorded as ran
    for row in saved["methods"].values():
        assert row["rescored"] is False and row["selection"]["parts"] == 15  # 5 folds x 3 repeats, no re-scoring
    for row in saved["methods"].values():
        for key in ("balanced", "few"):
            assert 0.0 <= row[key]["mean"] <= 1.0 and row[key]["std"] >= 0.0
        seeds = [r["test"]["balanced"] for r in row["tuned"]["per_seed"]]
        assert row["balanced"]["mean"] == pytest.approx(sum(seeds) / len(seeds))
        ref = saved["methods"][saved["best_baseline"]]["tuned"]["per_seed"]
        diffs = [a - r["test"]["balanced"] for a, r in zip(seeds, ref)]
        assert row["paired_vs_best_baseline"]["per_seed"] == pytest.approx(diffs)
    assert (out / "comparison.md").read_text().count("\n| `") == len(saved["methods"])
    assert (out / "accuracy_vs_frequency.png").stat().st_size > 1000
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(out / "best_model")
    assert model.config.method == saved["methods"][saved["best"]]["method"]


def test_same_seed_same_table(two_runs) -> None:
    (_, a), (_, b) = two_runs[0]
    timings = {"tuning_s", "final_s"}  # measured durations, the only thing allowed to differ between the two runs
    strip = lambda r: {k: {kk: vv for kk, vv in v.items() if kk not in timings}  # noqa: E731
                       for k, v in r["methods"].items()}
    assert json.dumps(strip(a), sort_keys=True) == json.dumps(strip(b), sort_keys=True)


def _complete(db: Path, study: str) -> list[str]:
    if not db.exists():
        return []
    try:
        con = sqlite3.connect(db)
        rows = con.execute("select t.state, p.param_value from trials t join studies s using(study_id) "
                           "left join trial_params p on p.trial_id = t.trial_id and p.param_name = 'stage2_lr' "
                           "where s.study_name = ? order by t.number", (study,)).fetchall()
        con.close()
    except sqlite3.OperationalError:  # the storage is still creating its tables
        return []
    return [f"{v!r}" for state, v in rows if state == "COMPLETE"]


def test_sigkill_resumes_without_repeating_finished_trials(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    argv = [sys.executable, "-m", "pih2t_hub.compare", "--methods", "crt", "--trials", "5", "--seeds", "1",
            "--max-epochs", "3", "--no-combos", "--no-progress", "--output-dir", str(out),
            *sum([[f"--{k.replace('_', '-')}", str(v)] for k, v in DATA.items()], [])]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = out / "study.db"
    deadline = time.monotonic() + 240
    while len(_complete(db, "crt")) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _complete(db, "crt")
    assert 2 <= len(before) < 5, before
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    after = _complete(db, "crt")
    assert len(after) == 5 and after[:len(before)] == before  # finished trials kept, not redone
    report = json.loads((out / "comparison.json").read_text())
    assert report["methods"]["crt"]["trials"] == 5
    # the tuning time counts the killed run's trials too: the storage's own timestamps, summed here in SQL
    # plus the seconds spent re-scoring on fresh deals (--rescore), kept with the study
    con = sqlite3.connect(db)
    spans = con.execute("select t.datetime_start, t.datetime_complete from trials t join studies s using(study_id) "
                        "where s.study_name = 'crt' and t.state = 'COMPLETE'").fetchall()
    rescoring = con.execute("select a.value_json from study_user_attributes a join studies s using(study_id) "
                            "where s.study_name = 'crt' and a.key = 'rescore_seconds'").fetchall()
    con.close()
    from datetime import datetime

    total = sum((datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds() for a, b in spans)
    total += sum(json.loads(value) for (value,) in rescoring)  # none without --rescore
    assert len(spans) == 5 and report["methods"]["crt"]["tuning_s"] == pytest.approx(total, abs=0.1)
    assert report["tuning_time_s"] == pytest.approx(total, abs=0.1) and total > 0


@pytest.mark.parametrize("argv, message", [
    (["--methods", "ce,ctr"], "unknown method 'ctr'"),
    (["--trials", "0"], "--trials must be >= 1"),
    (["--trials", "many"], "argument --trials: invalid int value: 'many'"),
    (["--cv-folds", "0"], "--cv-folds must be >= 2"),
    (["--cv-folds", "-3"], "--cv-folds must be >= 2"),
    (["--cv-repeats", "0"], "--cv-repeats must be >= 1"),
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--jobs", "two"], "argument --jobs: invalid int value: 'two'"),
    (["--recipe-se", "-1"], "--recipe-se must be a number >= 0, got -1"),
    (["--recipe-se", "nan"], "--recipe-se must be a number >= 0, got nan"),
    (["--dataset", "./no/such/folder"], "dataset path './no/such/folder' does not exist"),
    (["--backbone", "no_such_backbone_xyz"], "unknown backbone 'no_such_backbone_xyz'"),
    (["--dataset", "digits", "--max-per-class", "60", "--backbone", "test_resnet", "--no-pretrained", "--cv-folds",
      "100000"],
     "--cv-folds 100000 is larger than the"),
    (["--val-fraction", "0"], "val_fraction must lie in (0, 1): model selection needs a validation split"),
    (["--storage", "postgresql://nobody@127.0.0.1:1/none"], "cannot open the Optuna storage"),
])
def test_bad_input_is_one_line(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    start = time.monotonic()
    assert cmp.main([*argv, "--output-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert time.monotonic() - start < 10


class _ScoreBench:
    """A stand-in for the shared bench: the n-th trial scores ``value(n)`` on each of its parts, and can run a side
    effect (another worker finishing trials in the same storage) before returning."""

    def __init__(self, value, during=None, fresh=None) -> None:
        self.base, self.value, self.during, self.calls = RunConfig(**DATA), value, during, 0
        self.fresh, self.rescored = fresh, []  # fresh(overrides): the re-scoring parts' values; None: no such parts

    def score(self, cand, overrides):
        self.calls += 1
        if self.during is not None:
            self.during(self.calls)
        value = self.value(self.calls)
        return list(value) if isinstance(value, (list, tuple)) else [value]

    def rescore(self, cand, overrides):
        if self.fresh is None:
            return None
        self.rescored.append(overrides)
        return list(self.fresh(overrides))


def test_workers_sharing_a_storage_spend_one_budget(tmp_path: Path) -> None:
    optuna = pytest.importorskip("optuna")
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    storage = cmp._open_storage(url)
    cc = cmp.CompareConfig(methods=["logit_adjusted"], trials=4, seeds=1)
    cand = cmp.Candidate("logit_adjusted", "logit_adjusted")
    seen: dict = {}

    def other_worker(call: int) -> None:  # while this worker's first trial runs, another finishes three
        if call == 1:
            other = optuna.load_study(study_name="logit_adjusted", storage=url)
            running = other.trials[-1]  # the other worker draws the same kind of configuration
            seen.update(params=running.params, distributions=running.distributions)
            for value in (0.50, 0.60, 0.55):
                other.add_trial(optuna.trial.create_trial(value=value, **seen))

    bench = _ScoreBench(lambda n: 0.40 + 0.01 * n, during=other_worker)
    out = cmp.tune(bench, cand, cc, storage)
    assert bench.calls == 1  # the study held the budget after its first own trial: it stopped there
    study = optuna.load_study(study_name="logit_adjusted", storage=url)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == 4
    assert out["best_val"] == pytest.approx(0.60)

    # a fifth trial finishing past the budget (a worker that started it in time) is not counted, by anyone
    study.add_trial(optuna.trial.create_trial(value=0.99, **seen))
    late = _ScoreBench(lambda n: 1.0)
    again = cmp.tune(late, cand, cc, storage)
    assert late.calls == 0 and again["best_val"] == pytest.approx(0.60)
    assert [t.value for t in optuna.load_study(study_name="logit_adjusted", storage=url).trials][-1] == 0.99


def test_selection_score_is_the_mean_over_parts_with_its_spread(tmp_path: Path) -> None:
    import statistics

    optuna = pytest.importorskip("optuna")
    url = f"sqlite:///{tmp_path / 's.db'}"
    cc = cmp.CompareConfig(methods=["logit_adjusted"], trials=3, seeds=1, cv_folds=4, recipe_se=0.0)
    parts = {1: [0.5, 0.7, 0.6, 0.4], 2: [0.9, 0.1, 0.8, 0.6], 3: [0.55, 0.65, 0.6, 0.52]}  # means .55 .6 .58
    out = cmp.tune(_ScoreBench(parts.__getitem__), cmp.Candidate("logit_adjusted", "logit_adjusted"), cc,
                   cmp._open_storage(url))
    assert out["selection"]["mean"] == pytest.approx(0.6) and out["selection"]["parts"] == 4
    assert out["selection"]["std"] == pytest.approx(statistics.stdev(parts[2]))
    assert out["recipe_selection"]["mean"] == pytest.approx(0.55)  # the published recipe is the first trial
    assert out["recipe_selection"]["std"] == pytest.approx(statistics.stdev(parts[1]))
    first = optuna.load_study(study_name="logit_adjusted", storage=url).trials[0]
    assert first.params["tau"] == 1.0 and first.user_attrs["scores"] == parts[1]


@pytest.mark.parametrize("k, kept", [(0.0, False), (1.0, False), (2.5, True)])
def test_recipe_is_kept_unless_the_best_trial_beats_it_by_k_standard_errors(k: float, kept: bool,
                                                                           tmp_path: Path) -> None:
    import math
    import statistics

    pytest.importorskip("optuna")
    cc = cmp.CompareConfig(methods=["logit_adjusted"], trials=3, seeds=1, cv_folds=4, recipe_se=k)
    parts = {1: [0.60, 0.50, 0.70, 0.40], 2: [0.68, 0.52, 0.70, 0.46], 3: [0.1, 0.1, 0.1, 0.1]}
    diffs = [a - b for a, b in zip(parts[2], parts[1])]  # the best trial against the recipe, part by part
    mean, se = sum(diffs) / 4, statistics.stdev(diffs) / math.sqrt(4)  # 0.04 and 0.0183: 2.19 standard errors
    out = cmp.tune(_ScoreBench(parts.__getitem__), cmp.Candidate("logit_adjusted", "logit_adjusted"), cc,
                   cmp._open_storage(f"sqlite:///{tmp_path / 's.db'}"))
    assert out["gain_over_recipe"] == pytest.approx({"mean": mean, "se": se, "parts": 4})
    assert out["recipe_kept"] is kept
    assert out["selection"]["mean"] == pytest.approx(sum(parts[1 if kept else 2]) / 4)
    assert out["best_trial_selection"]["mean"] == pytest.approx(sum(parts[2]) / 4)
    assert (out["params"]["tau"] == 1.0) is kept  # the recipe's τ, or the trial's draw


@pytest.mark.parametrize("k, kept", [(2.0, True), (1.0, False)])
def test_best_trial_and_recipe_are_judged_on_fresh_deals(k: float, kept: bool, tmp_path: Path) -> None:
    """The best trial's luck on its tuning parts (0.9 everywhere) is not what ranks it: fresh deals are."""
    import math
    import statistics

    pytest.importorskip("optuna")
    cc = cmp.CompareConfig(methods=["logit_adjusted"], trials=3, seeds=1, cv_folds=4, recipe_se=k, rescore=True)
    tuning = {1: [0.5] * 4, 2: [0.9] * 4, 3: [0.6] * 4}  # trial 1 is the recipe (τ = 1), trial 2 the best
    recipe_fresh, best_fresh = [0.60, 0.50, 0.70, 0.40], [0.61, 0.50, 0.70, 0.41]
    fresh = lambda o: recipe_fresh if o["loss_kwargs"]["tau"] == 1.0 else best_fresh  # noqa: E731
    storage = cmp._open_storage(f"sqlite:///{tmp_path / 's.db'}")
    bench = _ScoreBench(tuning.__getitem__, fresh=fresh)
    out = cmp.tune(bench, cmp.Candidate("logit_adjusted", "logit_adjusted"), cc, storage)
    diffs = [a - b for a, b in zip(best_fresh, recipe_fresh)]  # 0.005 ± 0.0029: 1.73 standard errors
    assert out["gain_over_recipe"] == pytest.approx({"mean": sum(diffs) / 4,
                                                     "se": statistics.stdev(diffs) / math.sqrt(4), "parts": 4})
    assert out["recipe_kept"] is kept and out["rescored"] is True
    assert len(bench.rescored) == 2  # the best trial and the recipe, nothing else
    assert out["selection"]["mean"] == pytest.approx(sum(recipe_fresh if kept else best_fresh) / 4)
    assert out["recipe_selection"]["mean"] == pytest.approx(0.55)
    assert out["best_trial_selection"]["mean"] == pytest.approx(0.9)  # what chose it, reported beside
    assert out["best_trial_rescored"]["mean"] == pytest.approx(0.555)
    assert out["best_val"] == out["selection"]["mean"]  # what ranks methods (and picks the X of "X + H2T")

    again = _ScoreBench(tuning.__getitem__, fresh=lambda o: [0.0] * 4)  # resumed: the stored fresh scores
    assert cmp.tune(again, cmp.Candidate("logit_adjusted", "logit_adjusted"), cc, storage) == {
        **out, "resumed_trials": 3}
    assert again.calls == 0 and again.rescored == []

    # resumed without --rescore: the fresh scores left in the study are not read, the tuning parts judge
    plain = cmp.tune(_ScoreBench(tuning.__getitem__, fresh=fresh), cmp.Candidate("logit_adjusted", "logit_adjusted"),
                     dataclasses.replace(cc, rescore=False), storage)
    assert plain["rescored"] is False and plain["best_trial_rescored"] is None
    assert plain["recipe_selection"]["mean"] == pytest.approx(0.5) and plain["best_val"] == pytest.approx(0.9)


def test_a_method_with_one_trial_is_scored_on_the_same_fresh_deals(tmp_path: Path) -> None:
    """Every method's selection score comes from the same parts (deals differ in difficulty), one trial or many."""
    pytest.importorskip("optuna")
    cc = cmp.CompareConfig(methods=["ncm"], trials=5, seeds=1, cv_folds=4, rescore=True)
    bench = _ScoreBench(lambda n: [0.4, 0.5, 0.6, 0.7], fresh=lambda o: [0.3, 0.4, 0.5, 0.6])
    out = cmp.tune(bench, cmp.Candidate("ncm", "ncm"), cc, cmp._open_storage(f"sqlite:///{tmp_path / 's.db'}"))
    assert bench.calls == 1 and len(bench.rescored) == 1 and out["rescored"] is True  # one configuration, once
    assert out["selection"]["mean"] == pytest.approx(0.45) and out["best_trial_selection"]["mean"] == 0.55
    assert out["gain_over_recipe"] is None and out["recipe_kept"] is False  # nothing to keep it against


@pytest.mark.parametrize("counts, repeats", [([150, 40, 20], 1), ([150, 40, 19], 3), ([6], 3)])
def test_cross_validation_repeats_itself_where_the_tail_is_few_shot(counts: list[int], repeats: int) -> None:
    assert cmp.auto_repeats(counts) == repeats  # "few": under 20 training images, as the evaluation groups them


def test_bench_folds_partition_the_pooled_rows(tmp_path: Path) -> None:
    import torch

    base = RunConfig(**DATA, output_dir=str(tmp_path / "b")).validate()
    assert cmp.Bench(base, seeds=1, progress=False, cv_folds=3, cv_repeats=1).rescore_parts == []  # opt-in
    bench = cmp.Bench(base, seeds=1, progress=False, cv_folds=3, cv_repeats=None, rescore=True)
    feats = bench.ctx.features
    pooled_x = torch.cat([feats["train"].tensors[0], feats["val"].tensors[0]])
    pooled_y = torch.cat([feats["train"].tensors[1], feats["val"].tensors[1]])
    key = lambda x: sorted(map(tuple, x.tolist()))  # noqa: E731 - rows as comparable tuples
    assert bench.data["class_counts"].min() < 20 and bench.cv_repeats == 3  # a few-shot tail: three repeats
    assert len(bench.folds) == len(bench.rescore_parts) == 9
    assert {p.seed for p in bench.folds} == {0, 1, 2} and {p.seed for p in bench.rescore_parts} == {3, 4, 5}
    deal = lambda parts: [key(p.features["score"].tensors[0]) for p in parts]  # noqa: E731
    assert all(d not in deal(bench.folds) for d in deal(bench.rescore_parts))  # fresh deals, not the tuning ones
    for r in range(6):
        mine = [p for p in bench.folds + bench.rescore_parts if p.seed == r]
        assert key(torch.cat([p.features["score"].tensors[0] for p in mine])) == key(pooled_x)  # each once
        for p in mine:
            tr, va, sc = (p.features[name].tensors for name in ("train", "val", "score"))
            assert key(torch.cat([tr[0], va[0], sc[0]])) == key(pooled_x)  # train, in-fit choices, scored: disjoint
            counts = torch.bincount(tr[1], minlength=bench.data["num_classes"]).numpy()
            assert (p.counts == counts).all()  # the method's priors see the fold's own training counts
            n = torch.bincount(pooled_y, minlength=len(counts))
            scored = torch.bincount(sc[1], minlength=len(counts))
            assert ((scored == n // 3) | (scored == -(-n // 3))).all()  # stratified: floor or ceil of n_c / K
            fold_train = (n - scored).tolist()  # held out for in-fit choices as the run holds out its validation
            expect = [0 if m < 2 else min(max(1, round(base.val_fraction * m)), m - 1) for m in fold_train]
            assert torch.bincount(va[1], minlength=len(counts)).tolist() == expect
    assert "test" not in feats  # building the folds never read the test split


class _Configs:
    """The part of the bench that resolves a candidate's run config, without data."""

    base, max_epochs = RunConfig(**DATA).validate(), None
    config_for = cmp.Bench.config_for


@pytest.mark.parametrize("best_loss, expected", [
    ("balanced_softmax", ["pi-h2t+balanced_softmax"]),  # H2T with balanced softmax is the compared h2t_bsm
    ("focal", ["h2t+focal", "pi-h2t+focal"]),
])
def test_a_combination_that_is_a_compared_method_is_not_tuned_twice(best_loss: str, expected: list[str]) -> None:
    methods = ["ce", "focal", "balanced_softmax", "h2t", "pi-h2t", "h2t_bsm"]
    tuned = {m: {"candidate": cmp.Candidate(m, m), "overrides": {}, "best_val": 0.9 if m == best_loss else 0.5}
             for m in methods}
    assert [c.label for c in cmp._combos(_Configs(), tuned, methods)] == expected
    # without h2t_bsm among the compared methods, H2T with balanced softmax is a row of its own
    del tuned["h2t_bsm"]
    assert len(cmp._combos(_Configs(), tuned, methods[:-1])) == 2


def test_parts_fitted_in_worker_processes_score_as_in_one_process(tmp_path: Path) -> None:
    import psutil
    import torch

    from pih2t_hub.compare_workers import check_jobs

    base = RunConfig(**{**DATA, "stage1_epochs": 8}, output_dir=str(tmp_path / "b")).validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a worker's thread count: the same arithmetic in both
    try:
        one = cmp.Bench(base, seeds=2, progress=False, cv_folds=3)
        two = cmp.Bench(base, seeds=2, progress=False, cv_folds=3, jobs=2)
        got, before = {}, set(psutil.Process().children())
        for method, overrides in [("logit_adjusted", {"loss_kwargs": {"tau": 1.0}}),
                                  ("logit_adjusted", {"loss_kwargs": {"tau": 2.0}, "stage2_epochs": 5}), ("lws", {})]:
            cand = cmp.Candidate(method, method)
            got[method, str(overrides)] = two.score(cand, overrides)
            assert got[method, str(overrides)] == one.score(cand, overrides)  # bitwise, part by part, in order
        assert len({s for scores in got.values() for s in scores}) > 3  # scores that could tell a mix-up
        # the final retraining's models come back from the workers, seed by seed, as trained here
        for seed, (model, val, _) in enumerate(two.final_fits(cmp.Candidate("lws", "lws"), {}, 2)):
            mine, mine_val, _ = one.fit(cmp.Candidate("lws", "lws"), {}, one.final[seed])
            assert json.dumps(val, sort_keys=True) == json.dumps(mine_val, sort_keys=True)  # NaN where no class is many
            assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), mine.state_dict().values()))
        workers = [w for w in psutil.Process().children() if w not in before]
        assert len(workers) == 2 and all(w.cmdline() == psutil.Process().cmdline() for w in workers)  # forked
        two.close()
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="--jobs 2 forks CPU worker processes, which cannot share a cuda device"):
        check_jobs(2, "cuda")
    assert check_jobs(1, "cuda") == 1


def test_a_fold_is_scored_on_its_validation_part_not_on_the_rows_that_chose_its_epoch(tmp_path: Path) -> None:
    import torch

    base = RunConfig(**DATA, output_dir=str(tmp_path / "b")).validate()
    bench = cmp.Bench(base, seeds=1, progress=False, cv_folds=3)
    part = bench.folds[1]
    model, metrics, _ = bench.fit(cmp.Candidate("ce", "ce"), {"stage2_epochs": 3}, part)
    x, y = part.features["score"].tensors
    with torch.no_grad():
        pred = model.classifier(x.float()).argmax(1)
    recalls = [(pred[y == c] == c).float().mean().item() for c in torch.unique(y)]
    assert metrics["balanced"] == pytest.approx(sum(recalls) / len(recalls))


def _argv(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pih2t_hub.compare", "--methods", "crt,logit_adjusted", "--trials", "4",
            "--seeds", "1", "--max-epochs", "3", "--cv-folds", "3", "--no-combos", "--no-progress",
            "--output-dir", str(out), *sum([[f"--{k.replace('_', '-')}", str(v)] for k, v in DATA.items()], []),
            *extra]


def _table(out: Path) -> str:
    report = json.loads((out / "comparison.json").read_text())
    rows = {k: {kk: vv for kk, vv in v.items() if kk not in ("tuning_s", "final_s")}  # durations
            for k, v in report["methods"].items()}
    return json.dumps(rows, sort_keys=True) + (out / "comparison.md").read_text()


def test_sigkill_mid_study_then_restart_gives_the_straight_through_table(tmp_path: Path) -> None:
    """The killed and the resumed run fit their parts (and the resumed one its final retraining) in two worker
    processes, the straight run in one: the table is the same, and the workers do not outlive their killed
    parent."""
    import psutil

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # workers run one thread each
    straight = subprocess.run(_argv(tmp_path / "straight", "--seeds", "2"), cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(_argv(out, "--jobs", "2", "--seeds", "2"), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    db = out / "study.db"
    deadline = time.monotonic() + 300
    # kill inside the second study, after its recipe trial: the sampler's draws are what a restart used to change
    while len(_complete(db, "logit_adjusted")) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2  # forked for the first study, kept for the others
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, "worker processes outlived the killed comparison"
    assert 2 <= len(_complete(db, "logit_adjusted")) < 4
    resumed = subprocess.run(_argv(out, "--jobs", "2", "--seeds", "2"), cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=600)  # its final retraining in the workers too
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming: 4 trials done (crt)" in resumed.stderr
    assert "resuming: " in resumed.stderr.split("(crt)")[1]
    assert _table(out) == _table(tmp_path / "straight")


def test_ctrl_c_with_worker_processes_is_one_line_and_stops_them(tmp_path: Path) -> None:
    import psutil

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_argv(tmp_path / "c", "--jobs", "2"), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline, workers = time.monotonic() + 300, []

    def ignores_sigint(pid: int) -> bool:  # the kernel's view: bit 2 - 1 of the SigIgn mask
        status = Path(f"/proc/{pid}/status").read_text()
        return bool(int(status.split("SigIgn:")[1].split()[0], 16) & (1 << (signal.SIGINT - 1)))

    # wait for both workers and for the parent to take its Ctrl-C back (it ignores it while forking them)
    while time.monotonic() < deadline and proc.poll() is None and not (
            len(workers) == 2 and all(ignores_sigint(w.pid) for w in workers) and not ignores_sigint(proc.pid)):
        time.sleep(0.05)
        workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends: the whole foreground group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted: rerun the same command to resume from the Optuna storage"
    assert "Traceback" not in err
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive


def test_help_is_quick_lists_groups_and_choices_and_imports_no_torch() -> None:
    import resource

    code = ("import runpy, sys; sys.argv = ['compare.py', '--help']\n"
            "try:\n    runpy.run_path('recipes/compare.py', run_name='__main__')\n"
            "except SystemExit:\n    pass\nprint('TORCH', 'torch' in sys.modules)")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)  # process time: load-proof
    assert done.returncode == 0 and done.stdout.rstrip().endswith("TORCH False"), done.stderr
    assert cpu < 2.0, cpu
    text = done.stdout
    for group in ("comparison:", "data:", "model:", "stages:", "training:", "output:"):
        assert f"\n{group}\n" in text
    for flag in ("--cv-folds", "--cv-repeats", "--profile {exp,step}", "--head-type {linear,cosine}", "--no-pretrained",
                 "--feature-dtype {float32,float16}"):
        assert flag in text
    assert "h2t" in text and "logit_adjusted" in text  # the methods one may name
    assert "--stage2-lr" not in text and "--push-to-hub" not in text  # what the comparison decides itself


@pytest.mark.parametrize("method", ["crt", "h2t"])
def test_final_retraining_is_the_run_finetune_makes(method: str, tmp_path: Path) -> None:
    """The comparison's final retraining of a method at the run's seed and a `recipes/finetune.py` run of the same
    method and configuration (linear stage 1, stage 2 on cached features) give bitwise-equal heads."""
    import torch
    from transformers import AutoModelForImageClassification

    from pih2t_hub.training.run import run

    cfg = RunConfig(**DATA, method=method, stage="both", stage1_mode="linear", stage2_mode="cached",
                    output_dir=str(tmp_path / "run"))
    run(cfg)
    saved = AutoModelForImageClassification.from_pretrained(tmp_path / "run" / "model").classifier.state_dict()

    bench = cmp.Bench(RunConfig(**DATA, output_dir=str(tmp_path / "cmp")).validate(), seeds=1, progress=False)
    model, _, _ = bench.fit(cmp.Candidate(method, method), {}, bench.final[0])
    head = model.classifier.state_dict()
    assert saved.keys() == head.keys()
    for key in saved:
        assert torch.equal(saved[key], head[key]), key


class _ParamBench:
    """A stand-in bench whose score is a fixed function of the configuration (so the draws decide the values)."""

    base = RunConfig(**DATA)

    def score(self, cand, overrides):
        return [float(overrides["stage2_lr"]) % 0.37, float(overrides["loss_kwargs"]["tau"]) % 0.41]

    def rescore(self, cand, overrides):  # fresh deals: another fixed function of the configuration
        return [float(overrides["stage2_lr"]) % 0.23, float(overrides["loss_kwargs"]["tau"]) % 0.29]


def test_a_study_cut_short_and_a_trial_left_running_end_as_the_straight_study(tmp_path: Path) -> None:
    """Past TPE's random start-up (12 trials > 10): a resumed study draws what the straight one drew."""
    import optuna

    cand = cmp.Candidate("logit_adjusted", "logit_adjusted")
    full = cmp.CompareConfig(methods=["logit_adjusted"], trials=12, seeds=1)

    def params(url: str) -> list[dict]:
        study = optuna.load_study(study_name="logit_adjusted", storage=url)
        return [t.params for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]

    straight = f"sqlite:///{tmp_path / 'straight.db'}"
    cmp.tune(_ParamBench(), cand, full, cmp._open_storage(straight), exclusive=True)
    cut = f"sqlite:///{tmp_path / 'cut.db'}"
    cmp.tune(_ParamBench(), cand, dataclasses.replace(full, trials=7), cmp._open_storage(cut), exclusive=True)
    optuna.load_study(study_name="logit_adjusted", storage=cut).ask()  # a trial a killed process left RUNNING
    out = cmp.tune(_ParamBench(), cand, full, cmp._open_storage(cut), exclusive=True)
    states = [t.state for t in optuna.load_study(study_name="logit_adjusted", storage=cut).trials]
    assert optuna.trial.TrialState.RUNNING not in states and optuna.trial.TrialState.FAIL in states
    assert out["resumed_trials"] == 7 and len(params(cut)) == 12
    assert params(cut) == params(straight)


def test_resuming_studies_scored_another_way_is_refused(tmp_path: Path) -> None:
    import optuna

    storage = cmp._open_storage(f"sqlite:///{tmp_path / 's.db'}")
    base = RunConfig(**DATA)
    one, three = (cmp._protocol(base, cmp.CompareConfig(cv_repeats=r)) for r in (1, 3))
    optuna.create_study(study_name="legacy", storage=storage)  # recorded no protocol: taken as it is
    cmp._check_protocol(storage, three)
    cmp._open_study(cmp.Candidate("crt", "crt"), cmp.CompareConfig(), storage, True, one)
    cmp._check_protocol(storage, one)
    assert cmp._protocol(base, cmp.CompareConfig(cv_repeats=1, trials=40, seeds=5, recipe_se=0.5)) == one
    with pytest.raises(ValueError, match=r"^the stored study 'crt' scored its trials another way "
                                         r"\(cv_repeats=1 there, 3 here\)"):
        cmp._check_protocol(storage, three)
