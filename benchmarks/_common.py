"""What every benchmark records: the machine, the code version, and an atomically written JSON.

Imported by the scripts in this folder (run as ``python benchmarks/<script>.py``, so this folder is on
``sys.path``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def git_state() -> dict[str, Any]:
    """The commit measured, and whether the working tree differed from it (numbers belong to a code version)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "pih2t_hub"], cwd=ROOT, capture_output=True,
                               text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "pih2t_hub_modified": None}
    return {"commit": head.stdout.strip(), "pih2t_hub_modified": sorted(
        line[3:] for line in dirty.stdout.splitlines() if line.strip())}


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (the JSON must say): cores, threads, versions, load, commit."""
    import numpy as np
    import timm
    import torch

    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "loadavg_1_5_15_at_start": [round(x, 2) for x in os.getloadavg()],
        "git": git_state(),
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` through a temp file and a rename (a result file is complete or absent)."""
    from pih2t_hub._atomic import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=2) + "\n", parents=True)
