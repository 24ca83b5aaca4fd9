"""push_to_hub refuses incomplete content before any request, and a pushed model comes back over real HTTP.

The round trip uses a Hub endpoint on 127.0.0.1 (olah serving local git repos, see ``hub_server.py``): the push is
routed into olah's repository folder as a git commit (olah is read-only), and everything after it -- repo info,
file resolution, downloads, the cache, remote code -- goes through huggingface_hub / transformers over HTTP in
separate processes that have ``HF_ENDPOINT`` set before import.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from hub_server import LocalGitHubApi, hub_client_env, run_hub_python
from pih2t_hub.hub import push_to_hub, render_model_card, validate_model_folder
from pih2t_hub.hub.model_card import DEFAULT_TEMPLATE_PATH

RUN_CONFIG = {
    "model": {"backbone": "test_resnet", "backbone_tag": "random-init"},
    "data": {"dataset": "pih2t/tiny-lt", "revision": "0123abcd", "imbalance_ratio": 10, "profile": "exponential"},
    "method": {"name": "h2t", "fusion_ratio": 0.25},
    "training": {"global_batch_size": 8, "epochs": 1},
    "seed": 0,
    "hardware": "CPU (tests)",
}
RESULTS = {"overall": 0.5, "balanced": 0.45, "many": 0.8, "medium": 0.4, "few": 0.15}
TEMPLATE = DEFAULT_TEMPLATE_PATH


class RecordingApi:
    """HfApi stand-in that records calls and snapshots what it is asked to upload."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.uploaded: dict[str, bytes] = {}
        self.folder_path: str | None = None

    def create_repo(self, repo_id, **kwargs):
        self.calls.append("create_repo")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.calls.append("upload_folder")
        self.folder_path = folder_path
        root = Path(folder_path)
        self.uploaded = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        return "ok"


def _model_folder(root: Path) -> Path:
    """A structurally complete (not loadable) model folder: config with auto_map, code, weights, processor."""
    folder = root / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "pih2t",
        "auto_map": {"AutoModelForImageClassification": "modeling_pih2t.PIH2TForImageClassification"},
    }))
    (folder / "modeling_pih2t.py").write_text("# remote code\n")
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "ViTImageProcessor"}))
    save_file({"head.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}, str(folder / "model.safetensors"))
    return folder


def _plot(root: Path) -> Path:
    from pih2t_hub.evaluation.plots import plot_accuracy_vs_frequency

    return plot_accuracy_vs_frequency({"h2t": [0.9, 0.5, 0.2]}, [200, 50, 5], root / "accuracy_vs_frequency.png")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------- refusals (no server needed)


def test_complete_push_uploads_a_staged_copy(tmp_path):
    folder = _model_folder(tmp_path)
    (folder / ".model.safetensors.partial").write_bytes(b"half")  # a write in progress
    (folder / "notes.tmp").write_text("scratch")
    api = RecordingApi()
    push_to_hub(folder, "me/tiny", config=RUN_CONFIG, results=RESULTS, plot=_plot(tmp_path), api=api)
    assert api.calls == ["create_repo", "upload_folder"]
    assert Path(api.folder_path) != folder  # uploads come from the validated staging copy
    assert sorted(api.uploaded) == [
        "README.md", "accuracy_vs_frequency.png", "config.json", "model.safetensors", "modeling_pih2t.py",
        "preprocessor_config.json",
    ]
    assert b"](accuracy_vs_frequency.png)" in api.uploaded["README.md"]
    assert not (folder / "README.md").exists()  # the source folder is not modified
    assert not Path(api.folder_path).exists()  # staging is cleaned up


def _refused(folder, match, **kwargs):
    api = RecordingApi()
    with pytest.raises(ValueError, match=match):
        push_to_hub(folder, "me/tiny", api=api, **kwargs)
    assert api.calls == [], "nothing may be sent when the push is refused"


def test_missing_results_fail_before_upload(tmp_path):
    folder = _model_folder(tmp_path)
    _refused(folder, "lack required metric", config=RUN_CONFIG, results={"overall": 0.5, "balanced": 0.4})
    _refused(folder, "needs both config", config=RUN_CONFIG)


def test_unwritten_card_fails_before_upload(tmp_path):
    folder = _model_folder(tmp_path)
    _refused(folder, "no model card")  # no README, nothing to render it from
    shutil.copy(TEMPLATE, folder / "README.md")  # the raw template: never rendered
    _refused(folder, "Jinja")
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# a model\n")  # a card without results
    _refused(folder, "no model-index")


def test_incomplete_folder_fails_before_upload(tmp_path):
    folder = _model_folder(tmp_path)
    (folder / "preprocessor_config.json").unlink()
    _refused(folder, "missing file.*preprocessor_config.json", config=RUN_CONFIG, results=RESULTS)


def test_corrupt_weights_fail_before_upload(tmp_path):
    folder = _model_folder(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated write
    _refused(folder, "model.safetensors does not parse", config=RUN_CONFIG, results=RESULTS)


def test_missing_remote_code_and_plot_fail_before_upload(tmp_path):
    folder = _model_folder(tmp_path)
    (folder / "modeling_pih2t.py").unlink()
    _refused(folder, "auto_map.*modeling_pih2t.py", config=RUN_CONFIG, results=RESULTS)
    folder = _model_folder(tmp_path / "b")
    card = render_model_card(RUN_CONFIG, RESULTS, plot_path="missing.png")
    _refused(folder, "image 'missing.png'", card=card)


def test_validate_reports_every_problem(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir(parents=True)
    with pytest.raises(ValueError) as err:
        validate_model_folder(folder)
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md"):
        assert name in str(err.value)


# ----------------------------------------------------------------------------------------- over HTTP (olah)


def _client_env(olah_server, tmp_path):
    return hub_client_env(olah_server, tmp_path / "hf_home")


def test_pushed_folder_downloads_over_http(olah_server, tmp_path):
    folder = _model_folder(tmp_path)
    api = LocalGitHubApi(olah_server)
    commit = push_to_hub(folder, "pih2t-tests/folder", config=RUN_CONFIG, results=RESULTS, plot=_plot(tmp_path),
                         api=api)
    assert [c for c, _ in api.calls] == ["create_repo", "upload_folder"]
    # A second push to the existing repo is a new commit on main (create_repo(exist_ok=True)).
    second = push_to_hub(folder, "pih2t-tests/folder", config=RUN_CONFIG, results={**RESULTS, "few": 0.2},
                         plot=_plot(tmp_path), api=api)
    assert second.oid != commit.oid
    code = f"""
import hashlib, json, os
from huggingface_hub import HfApi, ModelCard, snapshot_download
repo = "pih2t-tests/folder"
info = HfApi().model_info(repo, revision="main")
local = snapshot_download(repo, revision="main")
card = ModelCard.load(repo)
files = {{f: hashlib.sha256(open(os.path.join(local, f), "rb").read()).hexdigest() for f in os.listdir(local)}}
print("RESULT" + json.dumps({{
    "sha": info.sha, "files": files,
    "metrics": {{r.metric_type: r.metric_value for r in card.data.eval_results}},
}}))
"""
    proc = run_hub_python(code, _client_env(olah_server, tmp_path), cwd=tmp_path, timeout=60)
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["sha"] == second.oid
    for name in ("config.json", "model.safetensors", "modeling_pih2t.py", "preprocessor_config.json"):
        assert out["files"][name] == _sha(folder / name), name
    assert "README.md" in out["files"] and "accuracy_vs_frequency.png" in out["files"]
    assert out["metrics"]["few_shot_accuracy"] == pytest.approx(0.2)
    assert out["metrics"]["accuracy"] == pytest.approx(0.5)


def _sample_images(root: Path) -> list[Path]:
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    paths = []
    for name in ("chelsea", "astronaut", "coffee"):
        path = root / f"{name}.png"
        Image.fromarray(getattr(skdata, name)()).save(path)  # PNG: the client sees the exact same pixels
        paths.append(path)
    return paths


def test_model_roundtrip_pipeline_and_remote_code(olah_server, tmp_path):
    try:
        from pih2t_hub import create_model
    except ImportError as err:  # pragma: no cover - the model API is a separate module
        pytest.skip(f"pih2t_hub.create_model is not available: {err}")
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor

    torch.manual_seed(0)
    id2label = {0: "cat", 1: "astronaut", 2: "coffee"}
    model = create_model("test_resnet", num_labels=3, id2label=id2label, pretrained=False).eval()
    local_dir = tmp_path / "local"
    model.save_pretrained(local_dir)
    processor = AutoImageProcessor.from_pretrained(local_dir)
    images = _sample_images(tmp_path)
    pil = [Image.open(p).convert("RGB") for p in images]
    inputs = processor(images=pil, return_tensors="pt")
    # A random head gives every image the same class. Set the head to the centred features of the three images
    # (class i = image i), so that a wrong prediction would show up as a different label, not only a score.
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 3][-1]
    feats = []
    hook = head.register_forward_hook(lambda mod, args, out: feats.append(args[0].detach()))
    with torch.no_grad():
        model(**inputs)
        hook.remove()
        mean = feats[0].mean(0)
        g = feats[0] - mean
        head.weight.copy_(g / g.norm(dim=1, keepdim=True) * 5.0)  # logit_ij = 5 cos(g_j, f_i - mean)
        head.bias.copy_(-head.weight @ mean)
        local_logits = model(**inputs).logits.double().numpy()
    local_probs = np.exp(local_logits) / np.exp(local_logits).sum(1, keepdims=True)
    assert list(local_probs.argmax(1)) == [0, 1, 2], local_logits

    repo = "pih2t-tests/test-resnet-h2t"
    push_to_hub(model, repo, config=RUN_CONFIG, results=RESULTS, plot=_plot(tmp_path),
                api=LocalGitHubApi(olah_server))
    env = _client_env(olah_server, tmp_path)
    paths = [str(p) for p in images]

    # 1. pipeline over HTTP, with pih2t_hub installed (its import registers the Auto classes; no remote code).
    code_pipeline = f"""
import json
import pih2t_hub
from PIL import Image
from transformers import pipeline
clf = pipeline("image-classification", model={repo!r}, revision="main")
out = [{{d["label"]: d["score"] for d in clf(Image.open(p).convert("RGB"), top_k=3)}} for p in {paths!r}]
print("RESULT" + json.dumps({{"scores": out, "model_module": type(clf.model).__module__}}))
"""
    # 2. trust_remote_code in a process where pih2t_hub cannot be imported at all.
    code_remote = f"""
import json, torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline
model = AutoModelForImageClassification.from_pretrained({repo!r}, revision="main", trust_remote_code=True).eval()
proc = AutoImageProcessor.from_pretrained({repo!r}, revision="main")
imgs = [Image.open(p).convert("RGB") for p in {paths!r}]
with torch.no_grad():
    logits = model(**proc(images=imgs, return_tensors="pt")).logits.double().tolist()
clf = pipeline("image-classification", model={repo!r}, revision="main", trust_remote_code=True)
out = [{{d["label"]: d["score"] for d in clf(im, top_k=3)}} for im in imgs]
print("RESULT" + json.dumps({{"logits": logits, "scores": out, "model_module": type(model).__module__}}))
"""
    res_pipe = json.loads(run_hub_python(code_pipeline, env, cwd=tmp_path).stdout.split("RESULT", 1)[1])
    res_remote = json.loads(
        run_hub_python(code_remote, env, cwd=tmp_path, block_pih2t=True).stdout.split("RESULT", 1)[1]
    )

    assert res_pipe["model_module"].startswith("pih2t_hub")
    assert res_remote["model_module"].startswith("transformers_modules")  # the code came from the repo
    np.testing.assert_allclose(res_remote["logits"], local_logits, rtol=1e-5, atol=1e-5)
    local_top = [id2label[i] for i in local_probs.argmax(1)]
    for res in (res_pipe, res_remote):
        scores = res["scores"]
        assert [max(s, key=s.get) for s in scores] == local_top
        for i, s in enumerate(scores):
            np.testing.assert_allclose([s[id2label[c]] for c in range(3)], local_probs[i], rtol=1e-5, atol=1e-6)
