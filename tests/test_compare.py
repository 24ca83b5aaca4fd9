"""The fair comparison on digits-LT with a tiny random backbone and a small budget: the test split is read only after
every study finished, the same seed gives the same table, a SIGKILL resumes from the Optuna storage, bad input is
one line."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

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
    # once per (method, seed) for the tuned configuration and once for the published recipe
    assert report["test_evaluations"] == len(labels) * 2 * 2


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
    assert saved["schema"] == "pih2t_hub.compare/1" and saved["best"] in saved["methods"]
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
    timings = {"tuning_s"}  # measured durations, the only thing allowed to differ between the two runs
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
    con = sqlite3.connect(db)
    spans = con.execute("select t.datetime_start, t.datetime_complete from trials t join studies s using(study_id) "
                        "where s.study_name = 'crt' and t.state = 'COMPLETE'").fetchall()
    con.close()
    from datetime import datetime

    total = sum((datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds() for a, b in spans)
    assert len(spans) == 5 and report["methods"]["crt"]["tuning_s"] == pytest.approx(total, abs=0.1)
    assert report["tuning_time_s"] == pytest.approx(total, abs=0.1) and total > 0


@pytest.mark.parametrize("argv, message", [
    (["--methods", "ce,ctr"], "unknown method 'ctr'"),
    (["--trials", "0"], "--trials must be >= 1"),
    (["--val-fraction", "0"], "val_fraction must lie in (0, 1): model selection needs a validation split"),
    (["--storage", "postgresql://nobody@127.0.0.1:1/none"], "cannot open the Optuna storage"),
])
def test_bad_input_is_one_line(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    start = time.monotonic()
    assert cmp.main([*argv, "--output-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert time.monotonic() - start < 10


class _ScoreBench:
    """A stand-in for the shared bench: each fit scores ``score(n)`` for the n-th call, and can run a side effect
    (another worker finishing trials in the same storage) before returning."""

    def __init__(self, score, during=None) -> None:
        self.base, self.score, self.during, self.calls = RunConfig(**DATA), score, during, 0

    def fit(self, cand, overrides, seed):
        self.calls += 1
        if self.during is not None:
            self.during(self.calls)
        return None, {"balanced": self.score(self.calls)}, {}


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
