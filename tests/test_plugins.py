"""A method from another installed package: declared in the ``pih2t_hub.methods`` entry-point group, it runs with
``--method NAME`` end to end, the comparison accepts it, and the command line still refuses an unknown name before
importing torch.

The "installed package" is a tiny distribution made in a tmp folder: a ``*.dist-info`` with ``METADATA`` and
``entry_points.txt`` beside its module, on ``PYTHONPATH`` (exactly what ``pip install`` leaves in site-packages).
Each case runs in a fresh interpreter, so what the metadata declares is all the process knows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "test_resnet", "--pretrained", "false", "--dataset", "digits", "--image-size", "32",
        "--max-per-class", "60", "--imbalance-ratio", "10", "--test-per-class", "20"]

PLUGIN = '''
"""A method of another package: cRT's re-initialised head, trained with class-balanced sampling and a knob."""
from dataclasses import dataclass

import torch

from pih2t_hub.methods import Method, Recipe
from pih2t_hub.methods.decoupling import crt_reinit


@dataclass(frozen=True)
class ScaledParams:
    init_scale: float = 0.5

    def __post_init__(self):
        if not self.init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {self.init_scale}")


class ScaledReinit(Method):  # registered by the entry point, no decorator
    summary = "a fresh head scaled by init_scale, retrained on class-balanced batches"
    recipe = Recipe(epochs=2, lr=0.05, batch_size=64, weight_decay=5e-4, source="a test plug-in")
    sampler = "balanced"
    Params = ScaledParams

    def setup_head(self, head, ctx):
        head = crt_reinit(head, generator=torch.Generator().manual_seed(self.cfg.seed + 2))
        with torch.no_grad():
            head.weight.mul_(self.params.init_scale)
        return head
'''


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An environment whose ``PYTHONPATH`` holds the project and the tiny installed plug-in distribution."""
    site = tmp_path_factory.mktemp("site")
    (site / "scaled_plugin.py").write_text(PLUGIN)
    info = site / "scaled_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: scaled-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[pih2t_hub.methods]\nscaled_reinit = scaled_plugin:ScaledReinit\n")
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)])}


def _python(code: str, env: dict[str, str], cwd: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.split("RESULT", 1)[1])


def test_the_plugin_method_runs_end_to_end_from_the_command_line(plugin_env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "recipes" / "finetune.py"), *TINY, "--method", "scaled_reinit",
           "--method-kwargs", "{init_scale: 0.25}", "--stage1-epochs", "1", "--batch-size", "32",
           "--output-dir", str(out)]
    done = subprocess.run(cmd, cwd=tmp_path, env=plugin_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    recorded = yaml.safe_load((out / "run_config.yaml").read_text())
    saved = json.loads((out / "model" / "config.json").read_text())
    assert results["method"] == recorded["method"] == saved["method"] == "scaled_reinit"
    assert recorded["method_kwargs"] == {"init_scale": 0.25}  # the plug-in's own knob, recorded as it ran
    assert recorded["stage2_epochs"] == 2 and recorded["sampler"] == "balanced"  # its recipe was applied
    assert len(results["stage2"]["history"]) == 2 and 0.0 <= results["test"]["balanced"] <= 1.0
    assert "init_scale=0.25" in (out / "model" / "README.md").read_text()  # on the card with its value


def test_the_plugin_knobs_are_checked_like_a_builtin(plugin_env: dict[str, str], tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "recipes" / "finetune.py"), *TINY, "--method", "scaled_reinit",
           "--method-kwargs", "{bogus_key: 1}", "--output-dir", str(tmp_path / "o")]
    done = subprocess.run(cmd, cwd=tmp_path, env=plugin_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: unknown method_kwargs key(s) 'bogus_key' for method scaled_reinit; "
                                   "valid keys: init_scale"), done.stderr


def test_names_come_from_metadata_before_torch_and_the_comparison_takes_the_plugin(plugin_env, tmp_path) -> None:
    out = _python(f"""
import json, sys, io, contextlib
from pih2t_hub.training import cli
from pih2t_hub import _names
cfg = cli.resolve_config({[*TINY, "--method", "scaled_reinit"]!r})
accepted_without_torch = cfg.method == "scaled_reinit" and "torch" not in sys.modules
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = cli.main({[*TINY, "--method", "scaled_reinitt", "--output-dir", str(tmp_path / "x")]!r})
refused_without_torch = "torch" not in sys.modules
from pih2t_hub.compare import CompareConfig, check_inputs
from pih2t_hub.training.config import RunConfig
names = check_inputs(CompareConfig(methods=["scaled_reinit", "ce"]), RunConfig(output_dir={str(tmp_path / "cmp")!r}))
from pih2t_hub.methods import get_method, list_methods
print("RESULT" + json.dumps({{"accepted": accepted_without_torch, "refused": refused_without_torch, "code": code,
    "err": err.getvalue().strip(), "compare": names, "listed": "scaled_reinit" in list_methods(),
    "class": get_method("scaled_reinit").__module__}}))
""", plugin_env, tmp_path)
    assert out["accepted"] and out["refused"] and out["code"] == 2
    assert out["err"].startswith("error: unknown method 'scaled_reinitt'") and "Did you mean scaled_reinit" in out["err"]
    assert out["compare"] == ["scaled_reinit", "ce"] and out["listed"] and out["class"] == "scaled_plugin"


def test_a_broken_plugin_is_named_and_does_not_break_the_others(tmp_path: Path) -> None:
    site = tmp_path / "site"
    info = site / "broken_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[pih2t_hub.methods]\nbroken = no_such_module:Nope\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)])}
    out = _python("""
import json
from pih2t_hub.methods import get_method, list_methods
try:
    get_method("broken")
    message = None
except ValueError as err:
    message = str(err)
print("RESULT" + json.dumps({"message": message, "crt": get_method("crt").name, "listed": "broken" in list_methods()}))
""", env, tmp_path)
    assert out["crt"] == "crt" and not out["listed"]
    assert "method plug-in 'broken' (no_such_module:Nope, from broken-plugin) cannot be loaded" in out["message"]
    assert "ModuleNotFoundError" in out["message"]


def test_builtins_are_entry_points_and_imported_without_metadata() -> None:
    """pyproject declares every built-in in the entry-point group (so an installed pih2t_hub lists them like any
    plug-in), and the methods package imports them itself, so they work whatever metadata is installed."""
    import tomllib

    from pih2t_hub import _names
    from pih2t_hub.methods.registry import _METHODS

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["pih2t_hub.methods"]
    builtins = {cls.name: f"{cls.__module__}:{cls.__name__}" for cls in _METHODS.values()
                if cls.__module__.startswith("pih2t_hub.")}
    assert declared == builtins
    assert set(_names.BUILTIN_METHODS) == set(builtins)
