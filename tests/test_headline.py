"""The headline command end to end: ``accelerate launch recipes/finetune.py --backbone vit_base``, through a Hub.

The Hub is olah on 127.0.0.1 (``hub_server.py``) serving, under the repo id ``vit_base`` resolves to, a small
Hugging Face ViT made here. The run goes through the real path: ``HF_ENDPOINT`` → huggingface_hub download →
the HF cache → ``AutoConfig`` / ``AutoModel`` / ``AutoImageProcessor`` → training → model folder and card.
Tiny on purpose: sklearn's digits, 32-pixel images, one epoch per stage, one CPU process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from hub_server import LocalGitHubApi, hub_client_env
from pih2t_hub.registry import BACKBONES

REPO_ROOT = Path(__file__).resolve().parents[1]
VIT_BASE_REPO = BACKBONES["vit_base"].name


def _serve_tiny_vit(server, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Commit a 2-layer ViT (32 px, patch 8) and its processor as ``VIT_BASE_REPO``; return its weights."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    vit = ViTModel(config, add_pooling_layer=False)
    folder = tmp_path / "served"
    vit.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    api = LocalGitHubApi(server)
    api.create_repo(VIT_BASE_REPO, exist_ok=True)
    api.upload_folder(repo_id=VIT_BASE_REPO, folder_path=folder, commit_message="tiny ViT for the headline test")
    return {k: v.clone() for k, v in vit.state_dict().items()}


def test_headline_finetune_vit_base_through_the_hub(olah_server, tmp_path):
    served = _serve_tiny_vit(olah_server, tmp_path)
    hf_home = tmp_path / "hf_home"
    env = hub_client_env(olah_server, hf_home)
    env["PYTHONPATH"] = str(REPO_ROOT) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
           str(REPO_ROOT / "recipes" / "finetune.py"), "--backbone", "vit_base", "--dataset", "digits",
           "--image-size", "32", "--max-per-class", "60", "--test-per-class", "10", "--imbalance-ratio", "10",
           "--stage1-epochs", "1", "--stage2-epochs", "1", "--batch-size", "64", "--output-dir", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}\n{olah_server.log_tail()}"

    # the weights came over HTTP into the HF cache, and the run used them
    assert (hf_home / "hub" / ("models--" + VIT_BASE_REPO.replace("/", "--"))).is_dir()
    from safetensors.torch import load_file

    saved = load_file(str(out / "model" / "model.safetensors"))
    key = "embeddings.patch_embeddings.projection.weight"
    saved_key = next(k for k in saved if k.endswith(key))
    torch.testing.assert_close(saved[saved_key], served[key])  # frozen backbone (linear stage 1) = served weights

    results = json.loads((out / "results.json").read_text())
    assert set(results["test"]) >= {"overall", "balanced", "many", "medium", "few"}
    assert 0.0 <= results["test"]["overall"] <= 1.0
    config = json.loads((out / "model" / "config.json").read_text())
    assert (config["backbone"], config["backbone_source"], len(config["id2label"])) == (VIT_BASE_REPO, "hf", 10)

    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "model" / "README.md")
    assert card.data.base_model == VIT_BASE_REPO
    assert {r.metric_type for r in card.data.eval_results} >= {"accuracy", "balanced_accuracy"}
    assert "digits" in card.text and str(out / "model") in card.text  # usage names the local folder

