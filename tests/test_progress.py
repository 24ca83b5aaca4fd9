"""Progress output where stderr is no terminal (a log file, CI): one line per epoch or phase, no carriage-return
redraws, and no per-tensor bars of transformers from the package's own loads and saves."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from pih2t_hub._progress import LineProgress, progress_bar

ROOT = Path(__file__).resolve().parents[1]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_live_bar_and_a_file_one_line() -> None:
    live, log = _Terminal(), io.StringIO()
    for stream in (live, log):
        bar = progress_bar(total=5, desc="phase", file=stream, mininterval=0)
        for _ in range(5):
            bar.update(1)
            bar.set_postfix(loss="0.5")
        bar.close()
    assert not isinstance(progress_bar(total=1, file=live, disable=True), LineProgress)
    assert live.getvalue().count("\r") >= 5  # redrawn in place on a terminal
    assert "\r" not in log.getvalue()
    assert log.getvalue().splitlines() == [log.getvalue().rstrip("\n")]
    assert log.getvalue().startswith("phase: 5/5 [") and "loss=0.5" in log.getvalue()
    quiet = io.StringIO()
    progress_bar(total=3, desc="off", file=quiet, disable=True).close()
    assert quiet.getvalue() == ""


def test_a_run_logged_to_a_file_writes_one_line_per_epoch(tmp_path: Path) -> None:
    epochs = {"stage 1 (linear)": 3, "stage 2 (h2t)": 2}
    argv = ["--backbone", "test_resnet", "--pretrained", "false", "--dataset", "digits", "--image-size", "32",
            "--max-per-class", "60", "--imbalance-ratio", "10", "--test-per-class", "20", "--method", "h2t",
            "--stage1-mode", "linear", "--stage2-mode", "cached", "--stage1-epochs", str(epochs["stage 1 (linear)"]),
            "--stage2-epochs", str(epochs["stage 2 (h2t)"]), "--batch-size", "32", "--output-dir", str(tmp_path / "o")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    log = tmp_path / "stderr.log"
    with open(log, "w") as handle:
        done = subprocess.run([sys.executable, "recipes/finetune.py", *argv], cwd=ROOT, env=env, stderr=handle,
                              stdout=subprocess.DEVNULL, timeout=600)
    text = log.read_bytes().decode()  # read_text would turn carriage returns into line ends
    assert done.returncode == 0, text[-2000:]
    assert "\r" not in text
    lines = text.splitlines()
    for desc, count in epochs.items():
        per_epoch = [line for line in lines if line.startswith(desc)]
        assert [line.split(":")[0] for line in per_epoch] == [f"{desc} {e}/{count}" for e in range(1, count + 1)]
    for split in ("train", "val", "test"):  # the feature extraction: one line per split
        assert len([line for line in lines if line.startswith(f"features -> {split}:")]) == 1
    assert "Loading weights" not in text and "Writing model shards" not in text
