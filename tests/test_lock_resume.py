"""The output lock (live holder, stale holder, re-entrancy) and the config check of ``--resume``, without training."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pih2t_hub.training.checkpoint import list_checkpoints, save_checkpoint
from pih2t_hub.training.config import RunConfig
from pih2t_hub.training.lock import LOCK_NAME, OutputLockedError, StaleLockError, output_lock, read_lock
from pih2t_hub.training.resume import (
    RESULT_NEUTRAL,
    ResumeError,
    clear_earlier_run,
    config_differences,
    prepare_checkpoints,
)

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pih2t_hub.training.lock import output_lock
    with output_lock(sys.argv[1]):
        Path(sys.argv[2]).write_text("held")
        time.sleep(120)
""")


@pytest.fixture()
def holder(tmp_path: Path):
    """Another process holding the lock on ``tmp_path / 'out'``."""
    script, ready = tmp_path / "holder.py", tmp_path / "ready"
    script.write_text(HOLDER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "out"), str(ready)], env=env)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    yield proc
    proc.kill()
    proc.wait()


def test_a_live_holder_is_named_and_the_lock_refused(tmp_path: Path, holder) -> None:
    info = read_lock(tmp_path / "out" / LOCK_NAME)
    assert info["pid"] == holder.pid and info["host"] == socket.gethostname()
    t0 = time.monotonic()
    with pytest.raises(OutputLockedError, match=f"locked by pid {holder.pid} on {socket.gethostname()}"):
        with output_lock(tmp_path / "out", force=True):  # force never overrides a live holder
            pass
    assert time.monotonic() - t0 < 1


def test_a_dead_holders_lock_is_stale_and_taken_over_only_with_force(tmp_path: Path, holder) -> None:
    holder.kill()  # SIGKILL: no cleanup, the lock file stays, the kernel drops the flock
    holder.wait()
    out = tmp_path / "out"
    assert (out / LOCK_NAME).exists()
    with pytest.raises(StaleLockError, match=f"pid {holder.pid} .* is no longer running.*rerun with --resume to "
                                             "continue it, or with --force-unlock"):
        with output_lock(out):
            pass
    assert read_lock(out / LOCK_NAME)["pid"] == holder.pid  # a refusal leaves the record as it was
    reports: list[str] = []
    with output_lock(out, force=True, report=reports.append):
        assert read_lock(out / LOCK_NAME)["pid"] == os.getpid()
    assert len(reports) == 1 and "taken over" in reports[0] and str(holder.pid) in reports[0]
    assert not (out / LOCK_NAME).exists()


def _proc_start(pid: int) -> str:
    """Field 22 of ``/proc/<pid>/stat`` (proc(5)): the process's start time in clock ticks after boot."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[22 - 3]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_the_lock_records_what_proves_its_holder_gone(tmp_path: Path, holder) -> None:
    info = read_lock(tmp_path / "out" / LOCK_NAME)
    assert info["proc_start"] == _proc_start(holder.pid)
    assert info["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def test_resume_takes_over_a_lock_whose_holder_was_killed(tmp_path: Path, holder) -> None:
    """After a SIGKILL, ``--resume`` alone continues (the README's advice), saying in one line whose lock it took."""
    holder.kill()
    holder.wait()
    out = tmp_path / "out"
    reports: list[str] = []
    with output_lock(out, take_over_dead=True, report=reports.append):
        assert read_lock(out / LOCK_NAME)["pid"] == os.getpid()
    assert len(reports) == 1 and str(holder.pid) in reports[0] and "is no longer running" in reports[0]
    assert "taken over (--resume" in reports[0]


def _dead_looking_lock(out: Path, **changes) -> dict:
    """A lock file no process holds (the flock is free), recording this process unless ``changes`` say otherwise."""
    out.mkdir(parents=True, exist_ok=True)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-01-01T00:00:00+0000",
            "command": "finetune.py", "boot_id": _boot_id(), "proc_start": _proc_start(os.getpid()),
            **changes}
    (out / LOCK_NAME).write_text(json.dumps(info))
    return info


def _boot_id() -> str | None:
    path = Path("/proc/sys/kernel/random/boot_id")
    return path.read_text().strip() if path.exists() else None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_resume_takes_over_a_reused_pid_but_not_an_unprovable_holder(tmp_path: Path) -> None:
    """The recorded pid runs again, but as another process (another start time): the holder is gone. Still
    refused with --resume: a holder on another host, one from another boot, and a pid that runs with the
    recorded start time (this very process, not holding the lock): none proves the holder gone."""
    reused = tmp_path / "reused"
    _dead_looking_lock(reused, proc_start=str(int(_proc_start(os.getpid())) + 1))
    reports: list[str] = []
    with output_lock(reused, take_over_dead=True, report=reports.append):
        pass
    assert len(reports) == 1 and "its pid now belongs to another process" in reports[0] and "taken over" in reports[0]
    for name, changes, why in [("other_host", {"host": "elsewhere.example"}, "ran on another machine"),
                               ("other_boot", {"boot_id": "another-boot"}, "before this machine's last boot"),
                               ("alive", {}, "its pid is in use")]:
        out = tmp_path / name
        before = _dead_looking_lock(out, **changes)
        with pytest.raises(StaleLockError, match=f"{why}.*rerun with --force-unlock to take the lock over"):
            with output_lock(out, take_over_dead=True):
                pass
        assert read_lock(out / LOCK_NAME) == before  # refused: the record stays as it was
        with output_lock(out, force=True, report=lambda _m: None):  # --force-unlock still can
            pass


def test_lock_is_reentrant_and_released_on_exceptions(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with output_lock(tmp_path):
            with output_lock(tmp_path):  # the CLI locks, then run() locks again
                pass
            assert (tmp_path / LOCK_NAME).exists()  # still held by the outer block
            raise RuntimeError("crash")
    assert not (tmp_path / LOCK_NAME).exists()
    with output_lock(tmp_path):  # free again
        pass


# ---------------------------------------------------------------------------------------------- resume


def _checkpoint(root: Path, stage: str, step: int) -> None:
    save_checkpoint(root / "checkpoints" / stage, step, lambda d: Path(d, "model.safetensors").write_bytes(b"x"),
                    {"global_step": step})


def _cfg(out: Path, **kw) -> RunConfig:
    return RunConfig(output_dir=str(out), **kw).validate()


def test_resume_refuses_another_config_and_lists_the_keys(tmp_path: Path) -> None:
    clear_earlier_run(_cfg(tmp_path, method="h2t", backbone="test_resnet"))
    _checkpoint(tmp_path, "stage2", 5)
    # the cases: another method, --pretrained false, another backbone
    with pytest.raises(ResumeError) as err:
        prepare_checkpoints(_cfg(tmp_path, method="crt", backbone="test_vit", pretrained=False, resume=True))
    msg = str(err.value)
    assert "method: 'h2t' -> 'crt'" in msg and "backbone: 'test_resnet' -> 'test_vit'" in msg
    assert "pretrained: True -> False" in msg and "seed" not in msg
    # keys that do not change the result may differ (and the checkpoints stay)
    same = _cfg(tmp_path, method="h2t", backbone="test_resnet", resume=True, checkpoint_every=3, keep_last=5,
                num_workers=2)
    assert prepare_checkpoints(same) is True
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints" / "stage2")] == ["checkpoint-5"]


def test_config_differences_by_hand() -> None:
    base = RunConfig().to_dict()
    assert config_differences(base, base) == {}
    other = {**base, "seed": 1, "imbalance_ratio": 100.0, "output_dir": "elsewhere", "report_to": "tensorboard"}
    assert config_differences(other, base) == {"seed": (0, 1), "imbalance_ratio": (50.0, 100.0)}
    recorded = {k: v for k, v in base.items() if k != "mixup_alpha"}  # a record from before the key existed
    assert config_differences(base, recorded) == {}
    assert {"output_dir", "resume", "checkpoint_every", "keep_last", "report_to"} <= RESULT_NEUTRAL
    assert not {"method", "backbone", "pretrained", "dataset", "imbalance_ratio", "seed"} & RESULT_NEUTRAL


def test_resume_without_a_valid_checkpoint_says_so_or_refuses(tmp_path: Path) -> None:
    reports: list[str] = []
    assert prepare_checkpoints(_cfg(tmp_path, resume=True), reports.append) is False
    assert reports == [f"no valid checkpoint in {tmp_path / 'checkpoints'}: starting fresh"]
    _checkpoint(tmp_path, "stage1", 3)
    (tmp_path / "checkpoints" / "stage1" / "checkpoint-3" / "model.safetensors").write_bytes(b"corrupt")
    with pytest.raises(ResumeError, match="no valid checkpoint in .*--resume-strict"):
        prepare_checkpoints(_cfg(tmp_path, resume=True, resume_strict=True))


def test_a_fresh_run_removes_an_earlier_runs_checkpoints_only_right_before_training(tmp_path: Path) -> None:
    """Otherwise a later --resume could pick the earlier run's newer step; but the check alone removes nothing."""
    clear_earlier_run(_cfg(tmp_path, seed=1))
    _checkpoint(tmp_path, "stage1", 100)
    reports: list[str] = []
    assert prepare_checkpoints(_cfg(tmp_path, seed=2), reports.append) is False
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints" / "stage1")] == ["checkpoint-100"]
    assert json.loads((tmp_path / "checkpoints" / "run_config.json").read_text())["seed"] == 1
    assert reports == []
    assert clear_earlier_run(_cfg(tmp_path, seed=2), report=reports.append) is True
    assert list_checkpoints(tmp_path / "checkpoints" / "stage1") == []
    assert reports == [f"removing 1 checkpoint(s) of an earlier run in {tmp_path / 'checkpoints'} (no --resume)"]
    assert json.loads((tmp_path / "checkpoints" / "run_config.json").read_text())["seed"] == 2


def test_a_resumed_run_keeps_its_checkpoints(tmp_path: Path) -> None:
    clear_earlier_run(_cfg(tmp_path, seed=1))
    _checkpoint(tmp_path, "stage1", 4)
    assert prepare_checkpoints(_cfg(tmp_path, seed=1, resume=True)) is True
    assert clear_earlier_run(_cfg(tmp_path, seed=1, resume=True)) is False
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints" / "stage1")] == ["checkpoint-4"]


def test_a_rerun_refused_on_its_data_keeps_the_earlier_runs_checkpoints(tmp_path: Path, capsys) -> None:
    """A rerun without --resume whose label column does not exist fails on reading the data: the earlier run's
    checkpoints and recorded config are untouched, so ``--resume`` with the earlier settings still continues it."""
    from PIL import Image

    from _scripts import load_script

    for name in ("cat", "dog"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(tmp_path / "images" / name / f"{i}.png")
    out = tmp_path / "out"
    earlier = _cfg(out, backbone="test_resnet", pretrained=False, dataset=str(tmp_path / "images"))
    clear_earlier_run(earlier)
    for step in (2, 4):
        _checkpoint(out, "stage1", step)
    record = (out / "checkpoints" / "run_config.json").read_text()
    finetune = load_script("recipes/finetune.py", "finetune_rerun")
    argv = ["--backbone", "test_resnet", "--pretrained", "false", "--dataset", str(tmp_path / "images"),
            "--image-size", "32", "--output-dir", str(out)]
    capsys.readouterr()
    assert finetune.main(argv + ["--label-column", "nope"]) == 2
    captured = capsys.readouterr()
    assert "label column 'nope'" in captured.err and "removing" not in captured.out + captured.err
    assert [p.name for p in list_checkpoints(out / "checkpoints" / "stage1")] == ["checkpoint-2", "checkpoint-4"]
    assert (out / "checkpoints" / "run_config.json").read_text() == record
    assert prepare_checkpoints(_cfg(out, backbone="test_resnet", pretrained=False, dataset=str(tmp_path / "images"),
                                    resume=True)) is True


def test_checkpoints_without_a_recorded_config_are_not_resumed(tmp_path: Path) -> None:
    _checkpoint(tmp_path, "stage1", 3)
    with pytest.raises(ResumeError, match="run_config.json is missing or unreadable"):
        prepare_checkpoints(_cfg(tmp_path, resume=True))
