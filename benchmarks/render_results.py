"""Regenerate the README's result tables from ``benchmarks/results/*.json`` (never edited by hand).

Seven blocks: the default run's table and time (``default_run.json``), the cached-vs-online stage-2 epoch ratio
(``speed_stage2_epoch.json``), the fair comparison (``compare_*.json``), the choice of H2TF's default distance
(``h2tf_distance.json``), PI-H2T against H2T (from the comparisons), the PIF stage-1 study (``pif_study.json``)
and the stage-1 retrofits with lightweight fine-tuning (``peft_longtail.json``).

    python benchmarks/render_results.py          # rewrites the blocks between the markers in README.md
    python benchmarks/render_results.py --check  # exit 1 if README.md is not what the JSON files give
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ORDER = ("A", "B", "C", "digits")
NAMES = {"A": "A: IR 100, n_max 6,000", "B": "B: IR 10, n_max 6,000", "C": "C: IR 100, n_max 1,000",
         "digits": "digits-LT"}


def _reports(folder: Path = RESULTS) -> list[tuple[str, int, dict]]:
    found = []
    for path in folder.glob("compare_*_*.json"):
        setting, size = path.stem.split("_")[1:3]
        found.append((setting, int(size), json.loads(path.read_text())))
    return sorted(found, key=lambda r: (ORDER.index(r[0]) if r[0] in ORDER else 99, r[1]))


def _cell(d: dict) -> str:
    return "—" if d is None or math.isnan(d["mean"]) else f"{100 * d['mean']:.2f} ± {100 * d['std']:.2f}"


def _table(reports: list[tuple[str, int, dict]], key: str) -> list[str]:
    cols = [f"{NAMES.get(s, s)}, {px} px" for s, px, _ in reports]
    labels = sorted({m for *_, r in reports for m in r["methods"]})
    best = {i: r["best"] for i, (*_, r) in enumerate(reports)}
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for label in labels:
        cells = []
        for i, (*_, r) in enumerate(reports):
            row = r["methods"].get(label)
            if key in ("selection", "recipe_selection"):  # schema 2 on: the cross-validation score
                text = _cell(row.get(key)) if row else "—"
            else:
                text = _cell(row[key] if key in row else row["tuned"]["test"][key]) if row else "—"
            cells.append(f"**{text}**" if best[i] == label else text)
        lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    return lines


def render() -> str:
    reports = _reports()
    if not reports:
        return ("No comparison result is committed yet: the fair-comparison grid (settings A, B, C and digits at 64 px, "
                "A and C at 128 px) has not been run to the end on this project's machines. Run "
                "`OMP_NUM_THREADS=1 python benchmarks/accuracy_longtail.py`, then this script; the tables appear here.")
    lines = ["Balanced accuracy on test, % (mean ± std over seeds; each method tuned with the same budget, selected "
             "by cross-validation where the selection-score table below has the setting's column, else on the "
             "validation split; **bold**: the method the comparison picks, never on test):", ""]
    lines += _table(reports, "balanced")
    cv = [(s, px, r) for s, px, r in reports if any("selection" in row for row in r["methods"].values())]
    if cv:
        lines += ["", "Selection score, % (the tuned configuration's mean balanced accuracy over the cross-validation "
                  "folds × repeats ± its spread), for the comparisons that selected by cross-validation:", ""]
        lines += _table(cv, "selection")
        lines += ["", "The published recipe's selection score, % (the first trial of every study):", ""]
        lines += _table(cv, "recipe_selection")
        lines += ["", "How well the selection score predicts test, per comparison: Spearman rank correlation between "
                  "each method's selection score and its tuned test balanced accuracy (all rows), the methods "
                  "whose tuned configuration ends more than 0.5 points below their own published recipe on test, "
                  "and the methods that kept their recipe by the recipe rule (schema 3 on). The third column "
                  "measures the test side's own noise: for each seed, the target is the other seeds' mean test "
                  "accuracy, and the cell gives the Spearman correlation to it of the selection score and of the "
                  "left-out seed's test accuracy (averaged over seeds); where the second number is not higher, test "
                  "cannot tell the candidates apart any better than the selection score does. The last column, for "
                  "`--rescore` runs, uses training data only: each method's best trial scored on the folds that "
                  "picked it minus on the fresh deals (points, mean over the methods with several trials), beside "
                  "the same difference for the methods with one trial, which picked nothing (deals differ in "
                  "difficulty): the gap is the winner's luck that re-scoring takes out of the selection score:", ""]
        main = {(s, px): r for s, px, r in cv}
        others = [(f"{NAMES.get(s, s)}, {px} px, {_protocol_label(r, main.get((s, px)))}", r)
                  for s, px, r in _reports(RESULTS / OTHER_PROTOCOLS)]
        lines += _selection_quality([(f"{NAMES.get(s, s)}, {px} px", r) for s, px, r in cv] + others)
        if others:
            lines += ["", f"Rows naming a protocol: the same setting compared with another protocol "
                      f"(`benchmarks/results/{OTHER_PROTOCOLS}/`): one cross-validation deal instead of three where the tail "
                      "is few-shot, a recipe rule of one standard error instead of two, or `--rescore` (every "
                      "method's best trial and recipe re-scored on fresh deals, where the recipe rule and the ranking "
                      "are then judged); a row naming its processes is the committed protocol run with another "
                      "`--jobs` (the same scores: only the time differs). The rows above use the committed "
                      "comparisons' protocol, the default."]
    lines += ["", "The verdict per comparison (test balanced accuracy %, mean over seeds, and rank among all rows on "
              "test; the chosen method and the best baseline are picked on the selection score, never on test; "
              "DLSA's minutes: its fits for the selection score / for the final models):", ""]
    lines += _verdicts(reports)
    lines += ["", "Few-shot classes (≤ 20 training images), balanced accuracy % (— also where a setting has no such "
              "class: in A and B the rarest class has 60 and 600 images):", ""]
    lines += _table(reports, "few")
    lines += ["", "Wall time is that of the run that wrote the JSON; an interrupted comparison resumes its finished "
              "Optuna trials from storage, so a resumed run's wall time excludes them. Tuning time is the sum of "
              "every trial's duration from the storage's timestamps (all runs; recorded since `tuning_time_s` was "
              "added to the schema, \"—\" before), DLSA's share beside it. Processes: the worker processes that fitted "
              "a trial's cross-validation parts side by side (`--jobs`; the scores do not depend on it).", "",
              "| setting | selection | trials per method | seeds | best baseline (selection) | not run | processes | "
              "wall time | tuning time (DLSA) | final retraining |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    every = {m for *_, r in reports for m in r["methods"]}
    for s, px, r in reports:
        st = r["setting"]
        # combinations are "X + fusion" for each setting's own best X, so only single methods can be missing
        missing = ", ".join(f"`{m}`" for m in sorted(every - set(r["methods"])) if "+" not in m) or "—"
        folds = st.get("cv_folds", 1)
        rule = f", recipe rule {st['recipe_se']:g} SE" if st.get("recipe_se") else ""
        repeats = f" × {st['cv_repeats']} repeats" if st.get("cv_repeats", 1) > 1 else ""
        rescored = ", re-scored" if _rescored(r) else ""
        how = f"{folds}-fold CV{repeats}{rescored}{rule}" if folds > 1 else "validation split"
        dlsa = r["methods"].get("dlsa", {}).get("tuning_s")
        share = f" ({_minutes(dlsa)})" if dlsa is not None and r.get("tuning_time_s") is not None else ""
        lines.append(f"| {NAMES.get(s, s)}, {px} px | {how} | {st['trials']} | {st['seeds']} | "
                     f"`{r['best_baseline']}` | {missing} | {st.get('jobs', 1)} | "
                     f"{r['benchmark']['wall_time_s'] / 60:.1f} min ({r['benchmark']['machine'].get('cpus', '?')} "
                     f"CPUs) | {_minutes(r.get('tuning_time_s'))}{share} | {_minutes(r.get('final_time_s'))} |")
    return "\n".join(lines)


# The folder of ``benchmarks/results/`` that keeps the same settings compared with another protocol, for the record.
OTHER_PROTOCOLS = "other_protocols"


def _verdicts(reports: list[tuple[str, int, dict]]) -> list[str]:
    """One line per comparison: what it chose and where that lands on test, beside the best row on test, the best
    baseline, PI-H2T, H2T and DLSA, so that the prose need not restate numbers."""
    lines = ["| setting | chosen | first on test | best baseline (selection) | `pi-h2t` | `h2t` | `dlsa` |",
             "|---|---|---|---|---|---|---|"]
    for s, px, r in reports:
        rows = r["methods"]
        order = sorted(rows, key=lambda k: -rows[k]["balanced"]["mean"])

        def at(label: str) -> str:
            if label not in rows:
                return "—"
            kept = ", recipe" if rows[label].get("recipe_kept") else ""
            return f"{100 * rows[label]['balanced']['mean']:.2f} ({order.index(label) + 1}{kept})"

        dlsa = rows.get("dlsa", {})
        minutes = f"; {dlsa['tuning_s'] / 60:.1f} / {dlsa['final_s'] / 60:.1f} min" if "tuning_s" in dlsa else ""
        lines.append(f"| {NAMES.get(s, s)}, {px} px | `{r['best']}` {at(r['best'])} | `{order[0]}` {at(order[0])} | "
                     f"`{r['best_baseline']}` {at(r['best_baseline'])} | {at('pi-h2t')} | {at('h2t')} | "
                     f"{at('dlsa')}{minutes} |")
    return lines


def _protocol_label(report: dict, main: dict | None = None) -> str:
    """A comparison's protocol in words: its repeats, and its recipe rule and re-scoring where not the default's.
    A run of the committed comparison's (``main``) very protocol with another ``--jobs`` is named by its processes."""
    st = report["setting"]
    repeats = st.get("cv_repeats", 1)
    words = [f"{repeats} repeat{'s' if repeats > 1 else ''}"]
    jobs = st.get("jobs", 1)
    if main is not None and main["setting"].get("jobs", 1) != jobs and _protocol_label(main) == _protocol_label(report):
        words.append("one process" if jobs == 1 else f"{jobs} processes")
    if st.get("recipe_se", 2) != 2:
        words.append(f"recipe rule {st['recipe_se']:g} SE")
    if _rescored(report):
        words.append("`--rescore`")
    return ", ".join(words)


def _rescored(report: dict) -> bool:
    return any(row.get("rescored") for row in report["methods"].values())


def _selection_quality(reports: list[tuple[str, dict]]) -> list[str]:
    """Per comparison: Spearman's rank correlation of selection score and tuned test balanced accuracy, the rows
    whose tuned configuration ends more than 0.5 points below their recipe on test, the rows that kept their recipe."""
    from scipy.stats import spearmanr

    lines = ["| setting | Spearman (selection, test) | against the mean of all seeds but one: selection / the "
             "left-out seed | tuned > 0.5 below recipe on test | recipe kept | best trial: picking folds − fresh "
             "deals |",
             "|---|---|---|---|---|---|"]
    for name, r in reports:
        rows = r["methods"]
        selection = [row["selection"]["mean"] for row in rows.values()]
        rho = spearmanr(selection, [row["balanced"]["mean"] for row in rows.values()]).statistic
        below = [f"`{k}` {100 * (row['balanced']['mean'] - row['default']['test']['balanced']['mean']):+.2f}"
                 for k, row in rows.items()
                 if row["balanced"]["mean"] < row["default"]["test"]["balanced"]["mean"] - 0.005]
        kept = [k for k, row in rows.items() if row.get("recipe_kept")]
        kept_text = f"{len(kept)} of {len(rows)}" if "recipe_kept" in next(iter(rows.values())) else "—"
        lines.append(f"| {name} | {rho:.2f} | {_seed_agreement(selection, rows)} | "
                     f"{len(below)}: {', '.join(below) or '—'} | {kept_text} | {_optimism(rows)} |")
    return lines


def _optimism(rows: dict) -> str:
    """How much the folds that picked each method's best trial flatter it: its score there minus its score on the
    fresh deals, in points, averaged over the methods with more than one trial ("—" before re-scoring). Measured on
    training data only. Deals differ in difficulty, so the same difference for the methods with a single trial,
    which picked nothing, is shown beside it: the flattery is the gap between the two."""
    import numpy as np

    def shift(many: bool) -> float:
        found = [row["best_trial_selection"]["mean"] - row["best_trial_rescored"]["mean"] for row in rows.values()
                 if row.get("best_trial_rescored") and (row.get("trials", 1) > 1) is many]
        return 100 * float(np.mean(found)) if found else float("nan")

    tuned, single = shift(True), shift(False)
    return "—" if np.isnan(tuned) else f"{tuned:+.2f} (one trial: {single:+.2f})"


def _seed_agreement(selection: list[float], rows: dict) -> str:
    """How far test itself reproduces its ranking, beside the selection score on the same targets.

    For each seed s, the target is every method's tuned test balanced accuracy averaged over the other seeds; the
    cell is "selection / seed s" with each Spearman correlation to that target averaged over s. The second number
    is the test ranking's own seed-to-seed agreement (new splits, initialisations and final fits): a selection
    score computed from the training data cannot be expected to predict test's ranking better than test predicts
    itself, so it tells how much of a low Spearman is the test side's noise.
    """
    import numpy as np
    from scipy.stats import spearmanr

    per_seed = np.array([[p["test"]["balanced"] for p in row["tuned"]["per_seed"]] for row in rows.values()])
    seeds = per_seed.shape[1]
    if seeds < 2:
        return "—"
    rest = [np.delete(per_seed, s, axis=1).mean(axis=1) for s in range(seeds)]
    by_selection = np.mean([spearmanr(selection, rest[s]).statistic for s in range(seeds)])
    by_seed = np.mean([spearmanr(per_seed[:, s], rest[s]).statistic for s in range(seeds)])
    return f"{by_selection:.2f} / {by_seed:.2f}"


def _committed(name: str) -> dict | None:
    """A committed result file of ``benchmarks/results/``, or None when it has not been committed yet."""
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _minutes(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds / 60:.1f} min"


def _setting_name(key: str) -> str:
    """``C_64`` → ``C, 64 px`` (the study keys its settings as ``<setting>_<size>``)."""
    setting, _, size = key.rpartition("_")
    return f"{setting if setting != 'digits' else 'digits-LT'}, {size} px"


def render_distance() -> str:
    """The H2TF distance study: validation scores per setting, mean rank, the spread of ρ, and the choice."""
    r = _committed("h2tf_distance.json")
    if r is None:
        return "The H2TF distance study has not been run yet (`python benchmarks/h2tf_distance.py`)."
    keys = list(r["settings"])
    lines = ["Validation balanced accuracy, % (mean ± std over seeds; PI-H2T's stage-2 recipe, only the distance and "
             "mapping varied; the test split is not read). ρ: the keep ratio over the training rows of the first "
             "setting, 10th–90th percentile.", "",
             "| distance / mapping | " + " | ".join(_setting_name(k) for k in keys) + " | mean rank | ρ p10–p90 |",
             "|---|" + "---|" * (len(keys) + 2)]
    by = r["by_candidate"]
    for label in sorted(by, key=lambda c: by[c]["mean_rank"]):
        cells = [_cell({"mean": r["settings"][k][label]["mean"], "std": r["settings"][k][label]["std"]})
                 for k in keys]
        rho = r["settings"][keys[0]][label].get("keep_ratio", {})
        name = f"**`{label}`** (chosen)" if label == r["chosen"] else f"`{label}`"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {by[label]['mean_rank']:.1f} | "
                     f"{rho.get('p10', math.nan):.2f}–{rho.get('p90', math.nan):.2f} |")
    ref = next(label for label in r["settings"][keys[0]] if label not in by)
    lines.append(f"| `{ref}` (hand-set ratio, for reference) | " + " | ".join(
        _cell({"mean": r["settings"][k][ref]["mean"], "std": r["settings"][k][ref]["std"]}) for k in keys)
        + " | — | 0.75 |")
    return "\n".join(lines)


def _pct(d: dict) -> float:
    return 100 * d["mean"]


def render_pih2t() -> str:
    """PI-H2T against H2T and against its loss partner, per setting, from the comparison JSONs."""
    reports = [(s, px, r) for s, px, r in _reports() if "pi-h2t" in r["methods"] and "h2t" in r["methods"]]
    if not reports:
        return "No comparison with both PI-H2T and H2T is committed yet."
    lines = ["Test balanced accuracy, % (mean ± std over seeds). *Tuned*: the configuration the comparison chose on "
             "its selection score (cross-validation, or the validation split for schema 1) with the same budget; "
             "*default*: the published recipe (H2T p = 0.25; PI-H2T's default distance). X: the loss method with "
             "the best selection score, combined as `pi-h2t+X`; the best baseline is the comparison's pick on the "
             "selection score among the methods without head-to-tail fusion.",
             "",
             "| setting | PI-H2T tuned (no hand-set ratio) | H2T tuned p | gap / H2T's std | PI-H2T default | "
             "H2T p = 0.25 | `pi-h2t+X` − X: balanced, many | `pi-h2t+X` − best baseline: balanced, many |",
             "|---|---|---|---|---|---|---|---|"]
    for s, px, r in reports:
        m = r["methods"]
        pi, h2t = m["pi-h2t"]["tuned"]["test"]["balanced"], m["h2t"]["tuned"]["test"]["balanced"]
        gap = _pct(pi) - _pct(h2t)
        ratio = gap / (100 * h2t["std"]) if h2t["std"] > 0 else math.inf
        combo = next((label for label in m if label.startswith("pi-h2t+")), None)
        if combo:
            x, ref = combo.split("+", 1)[1], r["best_baseline"]
            combo_cell = f"X = `{x}`: {_gain(m, combo, x)}"
            best_cell = f"`{ref}`: {_gain(m, combo, ref)}"
        else:
            combo_cell = best_cell = "—"
        lines.append(f"| {NAMES.get(s, s)}, {px} px | {_cell(pi)} | {_cell(h2t)} | {gap:+.2f} ({ratio:+.1f} std) | "
                     f"{_cell(m['pi-h2t']['default']['test']['balanced'])} | "
                     f"{_cell(m['h2t']['default']['test']['balanced'])} | {combo_cell} | {best_cell} |")
    return "\n".join(lines)


def _gain(methods: dict, label: str, reference: str) -> str:
    """Tuned test balanced and many-shot accuracy of ``label`` minus ``reference``'s, in points."""
    a, b = methods[label]["tuned"]["test"], methods[reference]["tuned"]["test"]
    return f"{_pct(a['balanced']) - _pct(b['balanced']):+.2f}, {_pct(a['many']) - _pct(b['many']):+.2f}"


PIF_ROWS = (  # (summary key, label, shown in %: fractions as points with 2 decimals, others as they are with 3)
    ("stage1_balanced", "stage-1 test balanced, %", True),
    ("stage1_few", "stage-1 test few-shot, %", True),
    ("stage2_balanced", "after the same stage 2 (H2T p = 0.25): test balanced, %", True),
    ("stage2_few", "after stage 2: test few-shot, %", True),
    ("intra_inter_ratio", "intra / inter-class distance (validation features; lower: more clustered)", False),
    ("silhouette", "silhouette (validation features; higher: more clustered)", False),
    ("margin_mean", "mean class margin (validation logits)", False),
    ("margin_few", "few-shot class margin", False),
    ("curve_last_gain", "validation balanced gain in the last epoch, points", True),
)


def render_pif() -> str:
    """The PIF stage-1 study (``pif_study.json``): both variants as mean ± std, and the paired per-seed signs."""
    r = _committed("pif_study.json")
    if r is None:
        return "The PIF study is not committed yet (`benchmarks/pif_study.py`)."
    st, summ = r["setting"], r["summary"]
    seeds = sorted({run["seed"] for run in r["runs"]})
    lines = [f"effnet_lite0 fine-tuned end to end for {st['stage1_epochs']} epochs at {st['image_size']} px on "
             f"{st['dataset']} (IR {st['imbalance_ratio']:g}, n_max {st['max_per_class']:,}), with and without PIF "
             f"(residual, starting from the identity), seeds {', '.join(map(str, seeds))}; the same stage 2 on "
             "both. Mean ± std over seeds; the last column is PIF − baseline per seed.", "",
             "| measured | without PIF | with PIF | PIF − baseline per seed |", "|---|---|---|---|"]
    for key, label, percent in PIF_ROWS:
        def num(value: float, sign: str = "") -> str:
            return f"{100 * value:{sign}.2f}" if percent else f"{value:{sign}.3f}"

        cells = [f"{num(summ[v][key]['mean'])} ± {num(summ[v][key]['std'])}" for v in ("baseline", "pif")]
        diffs = ", ".join(num(d, "+") for d in summ["pif_minus_baseline"][key])
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {diffs} |")
    curves = {(run["variant"], run["seed"]): run["stage1_curve"] for run in r["runs"]}
    best = ", ".join(f"{v} seed {s}: epoch {1 + max(range(len(c)), key=c.__getitem__)}"
                     for (v, s), c in sorted(curves.items()))
    lines += ["", f"Best validation epoch of each stage-1 curve ({best}); the curves are in "
              "`benchmarks/results/pif_study.png`."]
    return "\n".join(lines)


def default_run_table(record: dict) -> str:
    """The table the default run prints, from its ``results.json`` (stage-1 row first, as the run prints it)."""
    from pih2t_hub.training.predict import format_table

    table = record["results"]["table"]
    order = sorted(table, key=lambda name: (not name.startswith("stage 1"), name))
    return format_table({name: table[name] for name in order})


def render_default_run() -> str:
    record = json.loads((RESULTS / "default_run.json").read_text())
    machine = record["machine"]
    threads = machine.get("OMP_NUM_THREADS") or "default"
    last = record["printed"].strip().splitlines()[-1]
    load = machine["loadavg_1_5_15_at_start"][0]
    return "\n".join([
        "```", default_run_table(record), last, "```", "",
        f"(`{record['command']}` as measured by `benchmarks/default_run.py` into "
        f"`benchmarks/results/default_run.json`: seed 0, {record['wall_s']:.0f} s wall time and "
        f"{record['cpu_s']:.0f} s CPU time on {machine['cpus']} cores of a shared {machine['cpu_model']} "
        f"(load average {load:.1f} at the start, OMP_NUM_THREADS={threads}, nice {machine['niceness']}), "
        f"torch {machine['torch']}.)"])


PEFT_LABELS = {"linear": "linear probe (frozen backbone)", "full": "full fine-tuning", "lora": "LoRA",
               "bitfit": "BitFit", "adaptformer": "AdaptFormer", "vpt": "VPT (deep)"}


def _peft_gaps(runs: list[dict], arm: str) -> str:
    """Balanced accuracy after stage 2 minus the linear probe's, per seed (points)."""
    probe = {r["seed"]: r["test"]["balanced"] for r in runs if r["arm"] == "linear"}
    gaps = [100 * (r["test"]["balanced"] - probe[r["seed"]]) for r in runs if r["arm"] == arm and r["seed"] in probe]
    return "—" if arm == "linear" or not gaps else ", ".join(f"{g:+.2f}" for g in gaps)


def render_peft() -> str:
    """Stage-1 retrofits, each followed by the same stage 2 (``peft_longtail.json``): mean ± std over seeds."""
    r = _committed("peft_longtail.json")
    if r is None:
        return "The lightweight fine-tuning benchmark is not committed yet (`benchmarks/peft_longtail.py`)."
    st, summ = r["setup"], r["summary"]
    seeds = sorted({run["seed"] for run in r["runs"]})
    lines = [f"{st['backbone']} at {st['image_size']} px on {st['setting']} (IR {st['imbalance_ratio']:g}, n_max "
             f"{st['max_per_class']:,}, {st['test_per_class']:,} test images per class), {st['stage1_epochs']} "
             f"stage-1 epochs for every arm, then the same {st['stage2'].upper()} stage 2 (its recipe) on the "
             f"features of the backbone the arm produced; seeds {', '.join(map(str, seeds))}, mean ± std. "
             "Accuracy on test, %; the gap to the linear probe is per seed, in points. Time is one whole run "
             "(stage 1, extraction of all splits, stage 2), mean over seeds: CPU time of the process, and wall "
             "clock on this project's 2-core CPU shared with other jobs (the wall clock varies with their load).",
             "", "| stage 1 | trainable backbone parameters | stage 1: balanced | + stage 2: balanced | many | "
             "medium | few | − linear probe | CPU min | wall min |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, row in summ.items():
        def cell(key: str) -> str:
            return f"{100 * row[key]['mean']:.2f} ± {100 * row[key]['std']:.2f}"

        params = f"{row['trainable_backbone_params']:,} ({row['trainable_percent']:.3g} %)"
        lines.append(f"| {PEFT_LABELS.get(arm, arm)} | {params} | {cell('stage1_test_balanced')} | "
                     f"{cell('test_balanced')} | {cell('test_many')} | {cell('test_medium')} | {cell('test_few')} | "
                     f"{_peft_gaps(r['runs'], arm)} | {row['process_s_mean'] / 60:.1f} | "
                     f"{row['wall_s_mean'] / 60:.1f} |")
    return "\n".join(lines)


def render_epoch_speedup() -> str:
    """The cached-vs-online stage-2 epoch ratio, inline in the README's speed paragraph."""
    record = json.loads((RESULTS / "speed_stage2_epoch.json").read_text())
    return f"{record['a_epoch_cached_vs_online']['speedup_per_epoch']:.0f}×"


def render_cli_latency() -> str:
    """How long the refused default command takes, directly and through ``accelerate launch`` (measured)."""
    record = json.loads((RESULTS / "speed_cli_errors.json").read_text())
    cmd, machine = record["commands"], record["machine"]
    load = machine["loadavg_1_5_15_at_start"][0]
    return (f"Measured on this project's {machine['cpus']}-core machine (load average {load:.1f} at the start; median "
            f"of {record['repeats']} fresh processes, file cache warm; `benchmarks/results/speed_cli_errors.json`): "
            f"`python recipes/finetune.py --backbone vit_base` is refused after {cmd['refused']['median_s']:.2f} s, "
            f"while importing torch, timm, datasets, accelerate and transformers' ViT alone takes "
            f"{cmd['full_imports']['median_s']:.2f} s; through `accelerate launch --quiet` the same line comes after "
            f"{cmd['launch_refused']['median_s']:.2f} s, {cmd['launch_empty']['median_s']:.2f} s of which the "
            f"launcher takes with an empty script.")


BLOCKS = {("<!-- cli-latency:start -->", "<!-- cli-latency:end -->"): render_cli_latency,
          ("<!-- default-run:start -->", "<!-- default-run:end -->"): render_default_run,
          ("<!-- stage2-epoch-speedup:start -->", "<!-- stage2-epoch-speedup:end -->"): render_epoch_speedup,
          ("<!-- compare-results:start -->", "<!-- compare-results:end -->"): render,
          ("<!-- peft-longtail:start -->", "<!-- peft-longtail:end -->"): render_peft,
          ("<!-- pif-study:start -->", "<!-- pif-study:end -->"): render_pif,
          ("<!-- h2tf-distance:start -->", "<!-- h2tf-distance:end -->"): render_distance,
          ("<!-- pi-h2t:start -->", "<!-- pi-h2t:end -->"): render_pih2t}

INLINE = {"<!-- stage2-epoch-speedup:start -->"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    readme = (ROOT / "README.md").read_text()
    new = readme
    for (start, end), make in BLOCKS.items():
        head, rest = new.split(start, 1)
        _, tail = rest.split(end, 1)
        nl = "" if start in INLINE else "\n"  # an inline value stays inside its sentence
        new = f"{head}{start}{nl}{make()}{nl}{end}{tail}"
    if args.check:
        return 0 if new == readme else 1
    (ROOT / "README.md").write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
