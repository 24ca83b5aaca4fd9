"""Regenerate the README's accuracy table from ``benchmarks/results/compare_*.json`` (never edited by hand).

    python benchmarks/render_results.py          # rewrites the block between the markers in README.md
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
START, END = "<!-- compare-results:start -->", "<!-- compare-results:end -->"
ORDER = ("A", "B", "C", "digits")
NAMES = {"A": "A: IR 100, n_max 6,000", "B": "B: IR 10, n_max 6,000", "C": "C: IR 100, n_max 1,000",
         "digits": "digits-LT"}


def _reports() -> list[tuple[str, int, dict]]:
    found = []
    for path in RESULTS.glob("compare_*_*.json"):
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
    lines = ["Balanced accuracy on test, % (mean ± std over seeds; each method tuned with the same budget on "
             "validation; **bold**: the method the comparison picks on validation):", ""]
    lines += _table(reports, "balanced")
    lines += ["", "Few-shot classes (≤ 20 training images), balanced accuracy %:", ""]
    lines += _table(reports, "few")
    lines += ["", "| setting | trials per method | seeds | best baseline (validation) | wall time |", "|---|---|---|---|---|"]
    for s, px, r in reports:
        st = r["setting"]
        lines.append(f"| {NAMES.get(s, s)}, {px} px | {st['trials']} | {st['seeds']} | `{r['best_baseline']}` | "
                     f"{r['benchmark']['wall_time_s'] / 60:.1f} min ({r['benchmark']['machine'].get('cpus', '?')} CPUs) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    readme = (ROOT / "README.md").read_text()
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{render()}\n{END}{tail}"
    if args.check:
        return 0 if new == readme else 1
    (ROOT / "README.md").write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
