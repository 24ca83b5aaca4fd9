"""The default run as a user runs it: ``python recipes/finetune.py`` with no arguments, timed, its results kept.

The README's default-run block (the printed table and the time it took) is rendered from the JSON this writes
(``python benchmarks/render_results.py``), so what the README shows is what a real run printed and how long it
took on a named machine. The run happens in a scratch folder (its default ``outputs/demo`` lands there), in a
subprocess that inherits this process's environment and niceness; wall time and the child's CPU time (user +
system, from ``getrusage``) are recorded with the load average before and after, because on a shared machine wall
time depends on the other processes.

    nice -n 5 python benchmarks/default_run.py     # writes benchmarks/results/default_run.json
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, machine_info, write_json

COMMAND = ["python", "recipes/finetune.py"]
OUT = ROOT / "benchmarks" / "results" / "default_run.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def measure() -> dict:
    """Run the default command once in a scratch folder; its results, printed table and timings."""
    machine = {**machine_info(), "cpu_model": _cpu_model(), "niceness": os.nice(0),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as scratch:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(ROOT / COMMAND[1])], cwd=scratch, env=env, capture_output=True,
                              text=True, timeout=1800)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise SystemExit(f"the default run failed ({done.returncode}):\n{done.stderr[-3000:]}")
        results = json.loads((Path(scratch) / "outputs" / "demo" / "results.json").read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    machine["loadavg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return {"benchmark": "default_run", "command": " ".join(COMMAND), "machine": machine,
            "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "printed": done.stdout, "results": results}


def main() -> int:
    record = measure()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from render_results import default_run_table

    table = default_run_table(record)  # the README renders this; it must be what the run printed
    if table not in record["printed"]:
        raise SystemExit(f"the table rendered from results.json differs from the printed one:\n{table}\n"
                         f"printed:\n{record['printed']}")
    write_json(OUT, record)
    print(f"{record['wall_s']:.1f} s wall, {record['cpu_s']:.1f} s CPU -> {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
