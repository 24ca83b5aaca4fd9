"""What a run checks before it trains: the output lock, and whether ``--resume`` continues the same experiment.

A checkpoint only makes sense for the config that wrote it: resuming an H2T checkpoint with ``--method crt``
reported a "crt" number that no cRT run gives, and another ``--backbone`` failed late on a tensor shape. At run
start :func:`prepare_checkpoints` therefore

* with ``--resume`` and a valid checkpoint: compares the run's config with the one recorded beside the checkpoints
  (``checkpoints/run_config.json``) on every key that changes the result and refuses, listing the differences;
* with ``--resume`` and no valid checkpoint: says "no valid checkpoint in ...: starting fresh" (or refuses with
  ``--resume-strict``);
* without ``--resume``: nothing yet. Checkpoints left by an earlier run in the same directory must go (a later
  ``--resume`` must never pick up another experiment's newer step), but only once this run has passed every check
  (config, data, model build): :func:`clear_earlier_run`, called right before training, removes them and records
  this run's config. A rerun refused for a bad ``--label-column`` leaves the earlier run resumable.

:func:`run_guard` wraps a whole run: lock (main process only), then :func:`prepare_checkpoints`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from .checkpoint import latest_valid_checkpoint, list_checkpoints, write_atomic_json
from .config import RunConfig
from .lock import output_lock

__all__ = ["RESULT_NEUTRAL", "ResumeError", "clear_earlier_run", "config_differences", "prepare_checkpoints",
           "run_guard"]

RUN_RECORD = "run_config.json"
#: Keys that do not change what is trained or reported: where things go, how often they are saved, which tracker
#: sees them, and how the finished model is exported / shared. Everything else must match to resume.
RESULT_NEUTRAL = frozenset({
    "output_dir", "resume", "resume_strict", "force_unlock", "checkpoint_every", "keep_last", "report_to",
    "num_workers", "cache_dir", "export", "push_to_hub", "hub_model_id", "hub_format",
})
_STAGES = ("stage1", "stage2")
#: Output dirs guarded in this process (the CLI guards, then run() is called inside), with the config the guard
#: checked: the one :func:`clear_earlier_run` records, so that a later ``--resume`` is compared like-for-like.
_ACTIVE: dict[str, RunConfig] = {}


class ResumeError(ValueError):
    """``--resume`` cannot continue: the checkpoints come from another config, or there is none (strict)."""


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def config_differences(current: dict[str, Any], recorded: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (recorded, current)}`` for every result-changing key that differs.

    A key the record lacks (written before the key existed) counts as its default value.
    """
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(RunConfig)}
    out = {}
    for key, now in current.items():
        if key in RESULT_NEUTRAL:
            continue
        before = recorded.get(key, defaults.get(key))
        if not _same(before, now):
            out[key] = (before, now)
    return out


def _valid_checkpoints(root: Path) -> list[Path]:
    return [c for c in (latest_valid_checkpoint(root / s, lambda _msg: None) for s in _STAGES) if c is not None]


def _check_resume(cfg: RunConfig, root: Path, report: Callable[[str], None]) -> bool:
    """True when the run will resume from a checkpoint of the same config; raise or report otherwise."""
    if not _valid_checkpoints(root):
        if cfg.resume_strict:
            raise ResumeError(f"--resume: no valid checkpoint in {root} (--resume-strict)")
        report(f"no valid checkpoint in {root}: starting fresh")
        return False
    record = root / RUN_RECORD
    import json

    try:
        recorded = json.loads(record.read_text())
    except (OSError, ValueError) as err:
        raise ResumeError(f"--resume: {record} is missing or unreadable ({err.__class__.__name__}), so the "
                          "checkpoints cannot be matched to this config; rerun without --resume") from None
    diff = config_differences(cfg.to_dict(), recorded)
    if diff:
        listed = "; ".join(f"{k}: {before!r} -> {now!r}" for k, (before, now) in sorted(diff.items()))
        raise ResumeError(f"--resume: the checkpoints in {root} were written with another config ({listed}); "
                          "rerun with the same settings, or without --resume to start over")
    return True


def prepare_checkpoints(cfg: RunConfig, report: Callable[[str], None] = print) -> bool:
    """Check ``--resume`` against the recorded config; True when the run resumes.

    Removes and writes nothing: an earlier run's checkpoints stay until :func:`clear_earlier_run`. Call on the main
    process, under the output lock, before any work.
    """
    return bool(cfg.resume) and _check_resume(cfg, Path(cfg.output_dir) / "checkpoints", report)


def clear_earlier_run(cfg: RunConfig, accelerator: Any | None = None, report: Callable[[str], None] = print) -> bool:
    """Right before training: unless the run resumes, remove an earlier run's checkpoints and record this config.

    Called once the run has passed every check, so a rerun that fails on its data or model never costs the earlier
    run its checkpoints. The config recorded is the one :func:`run_guard` checked (in a CLI run, the command line's
    before the method's recipe fills it), which a later ``--resume`` is compared with. The main process acts, the
    others wait for it. Returns True when the run starts fresh.
    """
    root = Path(cfg.output_dir) / "checkpoints"
    fresh = not (cfg.resume and _valid_checkpoints(root))  # a resume was checked by prepare_checkpoints
    if fresh and (accelerator.is_main_process if accelerator is not None else _is_main_process()):
        stale = [c for s in _STAGES for c in list_checkpoints(root / s)]
        if stale and not cfg.resume:
            report(f"removing {len(stale)} checkpoint(s) of an earlier run in {root} (no --resume)")
        for stage in _STAGES:
            if (root / stage).exists():
                shutil.rmtree(root / stage)
        root.mkdir(parents=True, exist_ok=True)
        checked = _ACTIVE.get(str(Path(cfg.output_dir).resolve()), cfg)
        write_atomic_json(root / RUN_RECORD, checked.to_dict())
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return fresh


def _is_main_process() -> bool:
    """Rank 0 of a launched job (torchrun / accelerate set ``RANK``), or a plain process."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def run_guard(cfg: RunConfig, report: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the output lock and check / record the checkpoints' config for the duration of a run.

    Re-entrant per output directory; other ranks of a launched job skip it (rank 0 speaks for the job).
    """
    key = str(Path(cfg.output_dir).resolve())
    if key in _ACTIVE or not _is_main_process():
        yield
        return
    with output_lock(cfg.output_dir, force=cfg.force_unlock, report=report, take_over_dead=cfg.resume):
        _ACTIVE[key] = cfg
        try:
            prepare_checkpoints(cfg, report)
            yield
        finally:
            _ACTIVE.pop(key, None)
