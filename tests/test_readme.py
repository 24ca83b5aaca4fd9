"""The README's commands are the ones that work: CI runs its test command, this runs its default-run command."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from _scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _install_block() -> list[str]:
    block = re.search(r"## Install, run, test\n\n```bash\n(.*?)```", README, re.S)
    assert block, "README lost its 'Install, run, test' block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command():
    test_cmd = _install_block()[2]
    assert "pytest" in test_cmd
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd.split("HF_DATASETS_OFFLINE=1 ")[-1] in ci  # `python -m pytest`
    assert "HF_HUB_OFFLINE=1" in ci and "HF_DATASETS_OFFLINE=1" in ci


def test_readme_default_run_command_works_offline(tmp_path):
    """`python recipes/finetune.py` with no arguments: the offline demo, results table and outputs."""
    cmd = shlex.split(_install_block()[1])
    assert cmd[:2] == ["python", "recipes/finetune.py"] and len(cmd) == 2
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # run from a scratch folder so the default output_dir (outputs/demo) lands there
    proc = subprocess.run([sys.executable, str(ROOT / cmd[1])], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if "overall" in line and "balanced" in line)
    assert header.split() == ["overall", "balanced", "many", "medium", "few", "ece"]
    row = next(line for line in lines if line.startswith("h2t"))
    values = [float(v) for v in row.split()[1:]]
    assert len(values) == 6 and all(0.0 <= v <= 100.0 for v in values)
    assert values[0] > 50.0  # pretrained ImageNet features separate MNIST digits far above chance (10 %)
    out = tmp_path / "outputs" / "demo"
    for rel in ("run_config.yaml", "results.json", "model/model.safetensors", "model/README.md",
                "model/accuracy_vs_frequency.png"):
        assert (out / rel).is_file(), rel
    # what the README shows (rendered from the committed run) is what this run prints: the run is seeded, so only
    # a change of code or recipe moves it; 0.5 points leave room for another CPU's float rounding (one or two of
    # the 500 test images), far below a drift such as 71.00 -> 64.20
    committed = json.loads((ROOT / "benchmarks" / "results" / "default_run.json").read_text())["results"]["table"]
    printed = {line[:22].strip(): [float(v) for v in line[22:].split()] for line in lines[lines.index(header) + 2:]
               if line[:22].strip() in committed}
    assert set(printed) == set(committed)
    for name, values in printed.items():
        expected = [100 * committed[name][k] for k in ("overall", "balanced", "many", "medium", "few", "ece")]
        assert values == pytest.approx(expected, abs=0.5), (name, values, expected)


def test_readme_results_tables_are_generated_from_the_committed_json():
    """The accuracy tables are rendered from benchmarks/results/compare_*.json, never typed in."""
    module = load_script("benchmarks/render_results.py")
    assert module.main(["--check"]) == 0, "run `python benchmarks/render_results.py` after a benchmark"


def test_selection_quality_row_ranks_selection_against_test():
    """The README's selection-quality row: Spearman's rho of selection score vs tuned test (ties averaged), the rows
    more than 0.5 points below their recipe on test, and how many kept their recipe."""
    pytest.importorskip("scipy")
    quality = load_script("benchmarks/render_results.py")._selection_quality

    def row(selection: float, seeds: tuple[float, float], recipe_test: float, kept: bool) -> dict:
        return {"selection": {"mean": selection}, "balanced": {"mean": sum(seeds) / 2}, "recipe_kept": kept,
                "tuned": {"per_seed": [{"test": {"balanced": t}} for t in seeds]},
                "default": {"test": {"balanced": {"mean": recipe_test}}}}

    # selection ranks a, b, c, d; the seed means (0.80, 0.70, 0.75, 0.60) rank a, c, b, d:
    # d = (0, 1, 1, 0), rho = 1 - 6 * 2 / (4 * 15) = 0.8.
    # Seed 0 ranks a, b, c, d (ranks 1, 2, 3, 4); seed 1 ties a and c (ranks 1.5, 3, 1.5, 4). Pearson of the ranks:
    # deviations (-1.5, -0.5, 0.5, 1.5) and (-1, 0.5, -1, 1.5): 3 / sqrt(5 * 4.5) = 0.632. With two seeds "the
    # others' mean" is the other seed: selection (= seed 0's ranking) scores 0.632 against seed 1 and 1 against
    # seed 0, mean 0.816; each seed against the other: 0.632.
    report = {"methods": {"a": row(0.90, (0.80, 0.80), 0.80, True), "b": row(0.85, (0.72, 0.68), 0.71, False),
                          "c": row(0.80, (0.70, 0.80), 0.752, False), "d": row(0.70, (0.60, 0.60), 0.70, False)}}
    line = quality([("X", report)])[2]
    assert line == "| X | 0.80 | 0.82 / 0.63 | 2: `b` -1.00, `d` -10.00 | 1 of 4 | — |"  # — : not re-scored

    # re-scored: the best trials of a and b (several trials) lose 3 and 1 points on the fresh deals, d's single
    # trial 0.5: (3 + 1) / 2 = +2.00 beside +0.50
    for label, trials, picking, fresh in (("a", 16, 0.93, 0.90), ("b", 16, 0.86, 0.85), ("d", 1, 0.705, 0.70)):
        report["methods"][label].update(trials=trials, best_trial_selection={"mean": picking},
                                        best_trial_rescored={"mean": fresh})
    assert quality([("X", report)])[2].endswith("| 1 of 4 | +2.00 (one trial: +0.50) |")


def test_readme_create_model_calls_say_whether_the_weights_are_pretrained():
    """``create_model`` follows timm (``pretrained=False`` by default) while the CLI defaults to pretrained weights:
    every README call on a backbone that has pretrained weights says which it gives, in code or in its comment."""
    import ast
    import inspect

    from pih2t_hub import create_model

    assert inspect.signature(create_model).parameters["pretrained"].default is False
    assert "pretrained=True" in create_model.__doc__ and "timm" in create_model.__doc__
    calls = [line for block in re.findall(r"```python\n(.*?)```", README, re.S) for line in block.splitlines()
             if re.search(r"(?<![.\w])create_model\(", line)]
    assert calls, "the README shows no create_model call"
    for line in calls:
        call = ast.parse(line.split("#")[0].strip()).body[0].value
        backbone = ast.literal_eval(call.args[0])
        if backbone.startswith("test_"):
            continue  # random-init test models: no pretrained weights exist
        given = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg == "pretrained"}
        assert given.get("pretrained") is True or "random" in line.split("#", 1)[-1], line
def test_the_default_run_block_is_the_committed_run():
    """The README's default-run block is rendered from benchmarks/results/default_run.json (table and time), and
    the time claims elsewhere carry no number of their own that could drift from it."""
    record = json.loads((ROOT / "benchmarks" / "results" / "default_run.json").read_text())
    block = README.split("<!-- default-run:start -->", 1)[1].split("<!-- default-run:end -->", 1)[0]
    for name, row in record["results"]["table"].items():
        cells = " ".join(f"{100 * row[k]:.2f}" for k in ("overall", "balanced", "many", "medium", "few", "ece"))
        assert " ".join([name, cells]) in " ".join(block.split()), name
    assert f"{record['wall_s']:.0f} s wall time" in block and f"{record['cpu_s']:.0f} s CPU time" in block
    assert record["command"] == "python recipes/finetune.py" and record["machine"]["cpus"] >= 1
    timing = re.compile(r"\b(about|~)\s*(a|an|\d+)\s*(minute|minutes|min|s|seconds)\b|\d+\s*s on", re.I)
    assert not timing.search(_install_block()[1] + README.split("## Install, run, test", 1)[1].split("```", 2)[1])
    finetune_doc = (ROOT / "recipes" / "finetune.py").read_text().split('"""')[1]
    assert not timing.search(finetune_doc), finetune_doc
