"""Every bad argument of ``recipes/finetune.py`` is one ``error: ...`` line naming the problem, exit code 2, early.

Each case runs the recipe's ``main(argv)`` in this process (the interpreter's import of torch / transformers is
paid once for all cases) and checks: exit code 2, exactly one stderr line starting ``error:`` that contains the
expected words, no traceback, under 10 s, and nothing written for errors knowable from the config alone. A few
cases also run the literal ``python recipes/finetune.py`` command, for the process's own exit code and stream.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "test_resnet", "--pretrained", "false", "--dataset", "digits", "--image-size", "32",
        "--max-per-class", "60", "--imbalance-ratio", "10", "--test-per-class", "20"]


finetune = load_script("recipes/finetune.py", "finetune_errors")
import pih2t_hub.training.run  # noqa: E402,F401 - the one-time import the data cases would otherwise pay first


def _files(tmp: Path) -> dict[str, str]:
    """Files the cases refer to, made once per case in its tmp dir."""
    from PIL import Image

    (tmp / "bad_types.yaml").write_text("batch_size: '16'\n")
    (tmp / "list.yaml").write_text("- method: h2t\n")
    (tmp / "old_keys.yaml").write_text("epochs: 3\n")
    (tmp / "broken.yaml").write_text("method: [h2t\n")
    (tmp / "not_a_model").mkdir()
    (tmp / "a_file").write_text("x")
    for folder in ("one_class/cat", "two_class/cat", "two_class/dog"):
        (tmp / folder).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(tmp / folder / f"{i}.png")
    return {"tmp": str(tmp)}


# (extra argv, words the message must contain, whether the error is knowable before any data is read)
CASES = [
    (["--stage1-lr", "-1"], "stage1_lr must be finite and > 0, got -1.0", True),
    (["--stage2-lr", "nan"], "stage2_lr must be finite and > 0, got nan", True),
    (["--weight-decay", "nan"], "weight_decay must be finite and >= 0, got nan", True),
    (["--stage2-weight-decay", "-0.1"], "stage2_weight_decay must be finite and >= 0", True),
    (["--stage2-epochs", "0"], "stage2_epochs must be >= 1, got 0", True),
    (["--epochs", "0"], "unrecognized arguments: --epochs 0 (--epochs is now --stage1-epochs / --stage2-epochs)", True),
    (["--image-size", "0"], "image_size must be >= 1, got 0", True),
    (["--val-fraction", "0"], "val_fraction must lie in (0, 1)", True),
    (["--imbalance-ratio", "0.5"], "imbalance_ratio must be finite and >= 1, got 0.5", True),
    (["--fusion-ratio", "1.5"], "fusion_ratio must lie in [0, 1], got 1.5", True),
    (["--method", "h2tt"], "unknown method 'h2tt'", True),
    (["--loss", "nope"], "unknown loss 'nope'", True),
    (["--stage", "3"], "argument --stage: invalid choice: '3'", True),
    (["--mixed-precision", "fp32"], "argument --mixed-precision: invalid choice: 'fp32'", True),
    (["--batch-size", "abc"], "argument --batch-size: invalid int value: 'abc'", True),
    (["--resume", "maybe"], "argument --resume", True),
    (["--loss-kwargs", "[1, 2]"], "argument --loss-kwargs: expected a YAML mapping", True),
    (["--sampler", "random"], "sampler must be one of", True),
    (["--report-to", "nope"], "report_to must be one of", True),
    (["--max-per-class", "0"], "max_per_class must be >= 1, got 0", True),
    (["--seed", "-1"], "seed must be >= 0, got -1", True),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag", True),
    (["--dataset", "./no/such/folder"], "dataset path './no/such/folder' does not exist", True),
    (["--dataset", "{tmp}/a_file"], "is a file", True),
    (["--init-from", "/no/such/model"], "--init-from folder '/no/such/model' does not exist", True),
    (["--init-from", "{tmp}/not_a_model"], "is not a saved model folder (no config.json)", True),
    (["--config", "no_such_recipe"], "recipe 'no_such_recipe' not found", True),
    (["--config", "{tmp}/bad_types.yaml"], "batch_size must be an integer, got str '16'", True),
    (["--config", "{tmp}/list.yaml"], "a recipe must be a YAML mapping", True),
    (["--config", "{tmp}/old_keys.yaml"], "unknown config keys ['epochs']", True),
    (["--config", "{tmp}/broken.yaml"], "not valid YAML", True),
    (["--push-to-hub"], "--push-to-hub needs --hub-model-id", True),
    (["--push-to-hub", "--hub-model-id", "bad id!"], "hub_model_id 'bad id!' is not a Hub repo id", True),
    (["--push-to-hub", "--hub-model-id", "me/model"], "--push-to-hub needs a Hub token", True),
    (["--output-dir", "{tmp}/a_file"], "output_dir '{tmp}/a_file' is a file", True),
    (["--momentum", "50"], "momentum must lie in [0, 1), got 50.0", True),
    (["--momentum", "1"], "momentum must lie in [0, 1), got 1.0", True),
    # flags that would do nothing in the combination given
    (["--stage", "1", "--stage2-epochs", "3", "--stage2-lr", "0.1"],
     "--stage2-epochs, --stage2-lr does nothing with --stage 1", True),
    (["--resume-strict"], "--resume-strict does nothing without --resume", True),
    (["--method", "tau_norm", "--stage2-lr", "0.1", "--stage2-epochs", "3"],
     "--stage2-epochs, --stage2-lr does nothing with --method tau_norm", True),
    (["--method", "dlsa", "--stage2-batch-size", "64"], "--stage2-batch-size does nothing with --method dlsa", True),
    (["--mixup-alpha", "0.2"], "--mixup-alpha applies to stage 1 with --stage1-mode finetune only", True),
    (["--stage", "2", "--stage1-mode", "finetune", "--mixup-alpha", "0.2", "--init-from", "{tmp}/not_a_model"],
     "--mixup-alpha applies to stage 1 with --stage1-mode finetune only", True),
    (["--init-from", "{tmp}/not_a_model", "--backbone", "test_vit"], "--backbone does nothing with --init-from", True),
    # data errors: known once the dataset is read, still before any extraction or training
    (["--dataset", "{tmp}/two_class", "--label-column", "nope"], "label column 'nope' not in the dataset", False),
    (["--dataset", "{tmp}/one_class"], "an image folder needs one sub-folder per class", False),
]


@pytest.mark.parametrize("extra, words, config_only", CASES, ids=[" ".join(c[0])[:40] for c in CASES])
def test_bad_argument_is_one_clear_line(tmp_path: Path, monkeypatch, capsys, extra, words, config_only) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # no token on this machine, whatever is stored
    fill = _files(tmp_path)
    out = tmp_path / "out"
    start = TINY[4:] if "--init-from" in extra else TINY  # a saved start model: no --backbone / --pretrained
    argv = [a.format(**fill) for a in start + ["--output-dir", str(out)] + extra]
    capsys.readouterr()
    t0 = time.monotonic()
    code = finetune.main(argv)
    elapsed = time.monotonic() - t0
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, (code, err)
    if config_only:  # nothing ran: the error is all there is
        assert err.splitlines() == [err], err
    else:  # datasets may have drawn a progress bar while reading; the error is the last line, and one line
        assert [line for line in err.splitlines() if "error" in line.lower()] == [err.splitlines()[-1]], err
        err = err.splitlines()[-1]
    assert err.startswith("error: ") and words.format(**fill) in err, err
    assert "Traceback" not in captured.err + captured.out
    # config errors: under 10 s (in practice well under a second). Data errors need the dataset read (an image
    # folder is built by datasets) and the accelerator set up: bounded looser, for a loaded 2-core test machine.
    assert elapsed < (10 if config_only else 30), elapsed
    if config_only:  # refused before the output directory was even created
        assert not out.exists()
    else:  # refused before extraction / training
        assert not (out / "features").exists() and not (out / "checkpoints" / "stage1").exists()


@pytest.mark.parametrize("extra, words", [
    (["--stage2-epochs", "0"], "error: stage2_epochs must be >= 1"),
    (["--stage", "3"], "error: argument --stage: invalid choice"),
    (["--dataset", "/no/such/dir"], "error: dataset path '/no/such/dir' does not exist"),
])
def test_the_literal_command_exits_2_with_one_line(tmp_path: Path, extra, words) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "recipes/finetune.py", *extra, "--output-dir", str(tmp_path / "o")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and done.stderr.startswith(words)
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    from pih2t_hub.training.config import ConfigError

    with pytest.raises(ConfigError, match="stage2_epochs must be >= 1"):
        finetune.main(["--stage2-epochs", "0", "--debug", "--output-dir", str(tmp_path / "o")])


# ---------------------------------------------------------------------------------------------- before the heavy imports

#: Libraries a refused command must not have imported: the error is known from the arguments, paths and environment.
HEAVY = ("torch", "timm", "datasets", "accelerate", "transformers.modeling_utils", "sklearn")
VIT_BASE_REPO = "google/vit-base-patch16-224-in21k"


def _imported_modules(importtime_stderr: str) -> set[str]:
    """Module names from ``python -X importtime``'s report (``import time: self | cumulative | name``)."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime_stderr.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


@pytest.mark.parametrize("extra, words", [
    (["--stage2-epochs", "0"], "error: stage2_epochs must be >= 1"),
    (["--method", "h2tt"], "error: unknown method 'h2tt'"),
    (["--loss", "nope"], "error: unknown loss 'nope'"),
    (["--dataset", "/no/such/dir"], "error: dataset path '/no/such/dir' does not exist"),
    (["--config", "no_such_recipe"], "error: recipe 'no_such_recipe' not found"),
    (["--backbone", "vit_base"], f"error: backbone 'vit_base' needs {VIT_BASE_REPO} from the Hugging Face Hub"),
    (["--backbone", "resnet50"], "error: backbone 'resnet50' needs timm/resnet50.a1_in1k from the Hugging Face Hub"),
])
def test_a_refused_command_imports_no_torch(tmp_path: Path, extra, words) -> None:
    """The literal command under ``-X importtime``: one error line, exit code 2, and none of the heavy libraries in
    the interpreter's own import report (a deterministic check of "fast", whatever the machine's load)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "HF_HOME": str(tmp_path / "empty_hf_home")}  # nothing cached: a Hub backbone cannot load offline
    done = subprocess.run([sys.executable, "-X", "importtime", "recipes/finetune.py", *extra,
                           "--output-dir", str(tmp_path / "o")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(words), lines
    imported = _imported_modules(done.stderr)
    assert "pih2t_hub.training.cli" in imported  # the report is there and covers our code
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    assert not (tmp_path / "o").exists()


def test_accelerate_launch_quiet_shows_only_our_line(tmp_path: Path) -> None:
    """``accelerate launch`` turns a failed script into its own ``CalledProcessError`` traceback unless ``--quiet``;
    with it, the headline command offline and uncached ends with our one line naming the missing repository."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "PYTHONPATH": str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--num_processes", "1", "--cpu",
           str(ROOT / "recipes" / "finetune.py"), "--backbone", "vit_base"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and VIT_BASE_REPO in errors[0] and "HF_HUB_OFFLINE" in errors[0], done.stderr[-3000:]
    assert not (tmp_path / "outputs").exists()  # refused before the default output directory was made


# ---------------------------------------------------------------------------------------------- light name lists


def test_the_light_name_lists_are_what_the_packages_register() -> None:
    """``--method`` / ``--loss`` are checked against lists that need no torch; they must be the registries' own."""
    from pih2t_hub import _names
    from pih2t_hub.losses import _LOSSES
    from pih2t_hub.methods.base import _METHODS

    builtin_methods = {cls.name for cls in _METHODS.values() if cls.__module__.startswith("pih2t_hub.methods")}
    assert set(_names.BUILTIN_METHODS) == builtin_methods
    builtin_losses = {key for key, fn in _LOSSES.items() if fn.__module__ == "pih2t_hub.losses"}
    assert {_names.loss_key(n) for n in _names.BUILTIN_LOSSES} == builtin_losses


def test_timm_aliases_name_the_hub_repo_timm_itself_names() -> None:
    """The availability check derives a timm alias's repository without timm; timm's pretrained config agrees."""
    import timm.models

    from pih2t_hub.registry import BACKBONES, backbone_hub_id

    for alias, entry in BACKBONES.items():
        if entry.source != "timm" or alias.startswith("test_"):
            continue
        cfg = timm.models.get_pretrained_cfg(entry.name)
        assert backbone_hub_id(alias) == cfg.hf_hub_id, alias
        assert not getattr(cfg, "hf_hub_filename", None), alias  # the usual weight file names, nothing extra
