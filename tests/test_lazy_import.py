"""``import pih2t_hub`` is cheap and still gives every public name, and still registers the Auto classes.

Each case runs in a fresh interpreter: what is imported, and in which order, is the point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter that prints one JSON line prefixed ``RESULT``; return it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.split("RESULT", 1)[1])


def test_import_is_light_and_every_public_name_resolves() -> None:
    out = _python("""
import json, sys
import pih2t_hub
light = sorted(m for m in ("torch", "timm", "transformers", "datasets") if m in sys.modules)
listed = sorted(set(pih2t_hub.__all__) - set(dir(pih2t_hub)))
from pih2t_hub import *
from pih2t_hub import create_model, PIH2TConfig, PIH2TForImageClassification, BACKBONES, resolve_backbone
import pih2t_hub.models.pih2t as family
print("RESULT" + json.dumps({
    "heavy_after_import": light, "missing_from_dir": listed,
    "star": sorted(n for n in pih2t_hub.__all__ if n in globals()),
    "same_objects": PIH2TForImageClassification is family.PIH2TForImageClassification and callable(create_model),
    "aliases": "vit_base" in BACKBONES and resolve_backbone("vit_base").source == "hf",
    "submodule": pih2t_hub.registry.list_backbones() == sorted(BACKBONES),
}))
""")
    assert out["heavy_after_import"] == []
    assert out["missing_from_dir"] == []
    from pih2t_hub import __all__ as public

    assert out["star"] == sorted(public)
    assert out["same_objects"] and out["aliases"] and out["submodule"]


def test_unknown_attribute_is_an_attribute_error() -> None:
    import pih2t_hub

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pih2t_hub.nope  # noqa: B018
    assert not hasattr(pih2t_hub, "nope")


REGISTERED = """
import json, sys
{imports}
registered_early = "pih2t_hub.models.pih2t" in sys.modules  # by the imports above alone
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers import AutoModel, AutoModelForImageClassification
from pih2t_hub.models.pih2t import PIH2TConfig, PIH2TForImageClassification, PIH2TModel, backbones
print("RESULT" + json.dumps({{
    "config": CONFIG_MAPPING["pih2t"] is PIH2TConfig,
    "model": AutoModel._model_mapping[PIH2TConfig] is PIH2TModel,
    "classifier": AutoModelForImageClassification._model_mapping[PIH2TConfig] is PIH2TForImageClassification,
    "early": registered_early, "checkpointing_layer": backbones.GradientCheckpointingLayer is not None,
}}))
"""


@pytest.mark.parametrize("imports", [
    "import pih2t_hub\nfrom transformers import AutoModelForImageClassification",  # ours first, Auto later
    "from transformers import AutoModelForImageClassification\nimport pih2t_hub",  # Auto first (the card's order)
    "import pih2t_hub\nfrom transformers import AutoConfig",  # AutoConfig alone
    "import pih2t_hub\nfrom transformers import ViTModel",  # Auto imported deep inside transformers' own chain
    "import pih2t_hub\nfrom transformers import PreTrainedModel",
], ids=["ours-first", "auto-first", "autoconfig", "nested", "pretrainedmodel"])
def test_the_auto_classes_know_pih2t_whatever_the_import_order(imports: str) -> None:
    """Registered by the time transformers' Auto classes can be called, and never from a half-imported
    transformers module (``GradientCheckpointingLayer`` would silently be missing)."""
    out = _python(REGISTERED.format(imports=imports))
    assert out == {"config": True, "model": True, "classifier": True, "early": True, "checkpointing_layer": True}


def test_a_saved_model_loads_through_auto_after_import_pih2t_alone(tmp_path: Path) -> None:
    """The model card's promise, in the order a user writes it: ``import pih2t_hub`` then the Auto class, no
    ``trust_remote_code``."""
    from pih2t_hub import create_model

    model = create_model("test_resnet", num_labels=3, pretrained=False)
    model.save_pretrained(tmp_path / "saved")
    out = _python(f"""
import json, sys
import pih2t_hub
from transformers import AutoModelForImageClassification
m = AutoModelForImageClassification.from_pretrained({str(tmp_path / "saved")!r})
print("RESULT" + json.dumps({{"type": type(m).__module__ + "." + type(m).__name__}}))
""")
    assert out["type"] == "pih2t_hub.models.pih2t.modeling_pih2t.PIH2TForImageClassification"
