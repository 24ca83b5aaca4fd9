"""How long a refused command line takes to print its one ``error:`` line, directly and through ``accelerate launch``.

The recipe checks its command line before it imports torch, transformers' models, timm and datasets, so a bad
command is refused in the time Python and the argument parser take; ``accelerate launch`` imports torch before it
starts the script, so the same line comes later through it. Measured, each as a fresh process (the file cache
warmed by one untimed run, then ``--repeats`` timed runs; wall time):

* ``refused``: ``python recipes/finetune.py --backbone vit_base`` with ``HF_HUB_OFFLINE=1`` and the ViT's weights
  not cached (the default command on a machine without the Hub): exit code 2 and one ``error:`` line;
* ``full_imports``: ``python -c "import torch, timm, datasets, accelerate, transformers.models.vit.modeling_vit"``,
  what the same line would cost if the checks ran after the imports;
* ``launch_empty``: ``accelerate launch --quiet`` of an empty script (the launcher's own cost);
* ``launch_refused``: ``accelerate launch --quiet recipes/finetune.py --backbone vit_base``, as ``refused``.

Each refused run is checked: a stderr of exactly one ``error:`` line and exit code 2 (``accelerate launch``
turns any failure of its script into exit code 1). Run from the repository root::

    python benchmarks/speed_cli_errors.py [--repeats 5]

Writes ``benchmarks/results/speed_cli_errors.json`` (median and min per command, the machine and its load).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine_info, write_json  # noqa: E402

IMPORTS = "import torch, timm, datasets, accelerate, transformers.models.vit.modeling_vit"


def commands(empty_script: str) -> dict[str, tuple[list[str], int]]:
    """The four measured command lines, each with the exit code it must end with: 0 runs through, any other is a
    refusal (``accelerate`` is the console script beside this interpreter)."""
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    # the values a saved ``accelerate config`` would give, so the launcher prints no warning about defaults
    launch = [launcher, "launch", "--quiet", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    recipe = [str(ROOT / "recipes" / "finetune.py"), "--backbone", "vit_base"]
    return {
        "refused": ([sys.executable, *recipe], 2),
        "full_imports": ([sys.executable, "-c", IMPORTS], 0),
        "launch_empty": ([*launch, empty_script], 0),
        "launch_refused": ([*launch, *recipe], 1),
    }


def run_once(argv: list[str], env: dict[str, str], code: int) -> float:
    """Wall seconds of one fresh process; it must exit with ``code``, and a refusal (``code`` != 0) must print
    exactly one ``error:`` line."""
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if code and (proc.returncode != code or len(lines) != 1 or not lines[0].startswith("error:")):
        raise SystemExit(f"error: {' '.join(argv)} was not refused in one line (exit {proc.returncode}): "
                         f"{proc.stderr.strip()[-300:]!r}")
    if not code and proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(argv)} failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]!r}")
    return wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per command (after one untimed)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speed_cli_errors.json"))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    report: dict = {"benchmark": "speed_cli_errors", "repeats": args.repeats, "machine": machine_info(),
                    "commands": {}}
    with tempfile.TemporaryDirectory() as tmp:
        # an empty HF cache: vit_base's weights are not there, so the default command is refused
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(Path(tmp) / "hf")}
        empty = Path(tmp) / "empty.py"
        empty.write_text("")
        for name, (cmd, code) in commands(str(empty)).items():
            run_once(cmd, env, code)  # warms the file cache
            times = [run_once(cmd, env, code) for _ in range(args.repeats)]
            shown = [Path(cmd[0]).name, *(c.replace(f"{ROOT}/", "").replace(str(empty), "empty.py") for c in cmd[1:])]
            report["commands"][name] = {"argv": shown,
                                        "median_s": round(statistics.median(times), 3),
                                        "min_s": round(min(times), 3), "runs_s": [round(t, 3) for t in times]}
            print(f"{name:15s} median {statistics.median(times):6.2f} s  min {min(times):6.2f} s")
    report["loadavg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(Path(args.out), report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
