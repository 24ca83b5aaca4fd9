"""A PIH2T model on a timm backbone exports to a plain timm checkpoint that loads without pih2t_hub.

The exported folders are loaded in a fresh interpreter in which ``import pih2t_hub`` fails, through
``timm.create_model("local-dir:...")`` and through transformers' ``AutoModelForImageClassification`` (TimmWrapper),
with no ``trust_remote_code``; their logits must equal the PIH2T model's and ``pipeline`` must give its labels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hub_server import BLOCK_PIH2T
from pih2t_hub import create_model
from pih2t_hub.hub import TimmExportError, export_timm, fold_logit_adjustment, fold_tau_norm, posthoc_offsets

LABELS = {0: "cat", 1: "astronaut", 2: "coffee"}
COUNTS = [500, 60, 4]
SIZE = 64


def _images(root: Path) -> list[Path]:
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    paths = []
    for name in ("chelsea", "astronaut", "coffee"):
        path = root / f"{name}.png"
        Image.fromarray(getattr(skdata, name)()).save(path)
        paths.append(path)
    return paths


def _trained_like(images: list[Path]) -> torch.nn.Module:
    """test_resnet with moved BN statistics and a head that tells the three images apart (class i = image i)."""
    from PIL import Image

    torch.manual_seed(0)
    model = create_model("test_resnet", num_labels=3, id2label=LABELS, class_counts=COUNTS, method="h2t")
    model.config.backbone_data_config = {**model.config.backbone_data_config, "input_size": [3, SIZE, SIZE]}
    model.train()
    with torch.no_grad():
        for _ in range(3):  # running statistics that differ from the init: the export must carry the buffers
            model(pixel_values=torch.randn(4, 3, SIZE, SIZE) * 2 + 0.5)
    model.eval()
    proc = model.get_image_processor()
    pixels = proc(images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = model.pih2t(pixel_values=pixels).pooler_output
        centred = feats - feats.mean(0)
        model.classifier.weight.copy_(centred / centred.norm(dim=1, keepdim=True) * 5.0)
        model.classifier.bias.copy_(-model.classifier.weight @ feats.mean(0))
    return model


def _local_predictions(model, images: list[Path], x: torch.Tensor) -> tuple[np.ndarray, list[str]]:
    from PIL import Image
    from transformers import pipeline

    with torch.no_grad():
        logits = model(pixel_values=x).logits.double().numpy()
    clf = pipeline("image-classification", model=model, image_processor=model.get_image_processor())
    labels = [clf(Image.open(p).convert("RGB"), top_k=1)[0]["label"] for p in images]
    return logits, labels


CLIENT = """
import json, sys, timm, torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, pipeline
inputs, n_folders = sys.argv[1], int(sys.argv[2])
folders, paths = sys.argv[3:3 + n_folders], sys.argv[3 + n_folders:]
x = load_file(inputs)["x"]
images = [Image.open(p).convert("RGB") for p in paths]
out = []
for folder in folders:
    tm = timm.create_model("local-dir:" + folder, pretrained=True).eval()
    hf = AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        timm_logits = tm(x).double().tolist()
        hf_logits = hf(pixel_values=x).logits.double().tolist()
    clf = pipeline("image-classification", model=folder)
    out.append({
        "timm": timm_logits, "hf": hf_logits, "hf_class": type(hf).__name__,
        "timm_labels": tm.pretrained_cfg["label_names"],
        "pipeline": [clf(im, top_k=1)[0]["label"] for im in images],
    })
print("RESULT" + json.dumps(out))
"""


def _load_without_pih2t(folders: list[Path], x: torch.Tensor, images: list[Path], tmp_path: Path) -> list[dict]:
    """Load each folder in one fresh interpreter where ``import pih2t_hub`` fails."""
    save_file({"x": x.contiguous()}, str(tmp_path / "x.safetensors"))
    script = tmp_path / "client.py"
    script.write_text(BLOCK_PIH2T + CLIENT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [str(tmp_path / "x.safetensors"), str(len(folders)), *map(str, folders), *map(str, images)]
    proc = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def _assert_same(res: dict, logits: np.ndarray, labels: list[str]) -> None:
    assert res["hf_class"] == "TimmWrapperForImageClassification"
    assert res["timm_labels"] == [LABELS[i] for i in range(3)]
    np.testing.assert_allclose(res["timm"], logits, rtol=0, atol=1e-5)
    np.testing.assert_allclose(res["hf"], logits, rtol=0, atol=1e-5)
    assert res["pipeline"] == labels


def test_h2t_and_logit_adjusted_exports_load_without_pih2t(tmp_path):
    images = _images(tmp_path)
    model = _trained_like(images)
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    logits, labels = _local_predictions(model, images, x)
    assert labels == ["cat", "astronaut", "coffee"]  # the head separates the images, so a wrong load shows

    # post-hoc logit adjustment folded into the bias: logits - tau * log(n_c / N), tau = 1
    base_head = model.classifier
    model.classifier = fold_logit_adjustment(base_head, posthoc_offsets(COUNTS, tau=1.0))
    la_logits, la_labels = _local_predictions(model, images, x)
    prior = np.asarray(COUNTS, dtype=np.float64) / sum(COUNTS)
    np.testing.assert_allclose(la_logits, logits - np.log(prior), rtol=0, atol=1e-5)
    la_dir = export_timm(model, tmp_path / "export-la")
    model.classifier = base_head
    h2t_dir = export_timm(model, tmp_path / "export-h2t")

    assert sorted(os.listdir(h2t_dir)) == ["config.json", "model.safetensors"]
    cfg = json.loads((h2t_dir / "config.json").read_text())
    assert (cfg["architecture"], cfg["num_classes"], cfg["label_names"]) == ("test_resnet", 3, list(LABELS.values()))
    assert cfg["pretrained_cfg"]["input_size"] == [3, SIZE, SIZE]
    assert (os.stat(h2t_dir).st_mode & 0o777, os.stat(h2t_dir / "config.json").st_mode & 0o777) == (
        0o777 & ~_umask(), 0o666 & ~_umask())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp sibling left behind

    res_h2t, res_la = _load_without_pih2t([h2t_dir, la_dir], x, images, tmp_path)
    _assert_same(res_h2t, logits, labels)
    _assert_same(res_la, la_logits, la_labels)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_tau_norm_folds_into_weights():
    torch.manual_seed(0)
    head = torch.nn.Linear(5, 3)
    folded = fold_tau_norm(head, 0.5)
    norms = head.weight.detach().norm(dim=1, keepdim=True)
    torch.testing.assert_close(folded.weight, head.weight.detach() / norms**0.5)
    torch.testing.assert_close(folded.bias, head.bias.detach())


def test_existing_folder_is_not_replaced_unless_asked(tmp_path):
    model = create_model("test_resnet", num_labels=2)
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="already exists"):
        export_timm(model, target)
    export_timm(model, target, overwrite=True)
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors"]


def _hf_vit_model():
    from transformers import ViTConfig

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=32, patch_size=8)
    return create_model(cfg, num_labels=2)


@pytest.mark.parametrize(
    "build, match",
    [
        (_hf_vit_model, "needs a timm backbone"),
        (lambda: create_model("test_resnet", num_labels=2, head_type="cosine"), "cosine head"),
        (lambda: create_model("test_resnet", num_labels=2, pif=True), "PIF"),
        (lambda: create_model("test_resnet", num_labels=2, method="dlsa", head_type="dlsa",
                              head_config={"num_clusters": 2}), "DLSA"),
    ],
)
def test_models_that_are_not_timm_plus_linear_are_refused(build, match, tmp_path):
    model = build()
    with pytest.raises(TimmExportError, match=match) as err:
        export_timm(model, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_unfolded_lws_head_is_refused(tmp_path):
    from pih2t_hub.hub import fold_lws
    from pih2t_hub.methods.decoupling import LWSHead

    model = create_model("test_resnet", num_labels=2)
    lws = LWSHead(model.classifier)
    with torch.no_grad():
        lws.scales.copy_(torch.tensor([0.5, 2.0]))
    model.classifier = lws
    with pytest.raises(TimmExportError, match="fold_lws"):
        export_timm(model, tmp_path / "out")
    feats = torch.randn(3, lws.linear.in_features)
    model.classifier = fold_lws(lws)
    torch.testing.assert_close(model.classifier(feats), (feats @ lws.linear.weight.T + lws.linear.bias) * lws.scales)
    export_timm(model, tmp_path / "out")


class _RecordingApi:
    """HfApi stand-in: records the calls and what would be uploaded."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.files: dict[str, bytes] = {}

    def create_repo(self, repo_id, **kwargs):
        self.calls.append("create_repo")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.calls.append("upload_folder")
        self.files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        return "ok"


RUN_CONFIG = {"backbone": "test_resnet", "dataset": "mnist", "method": "h2t", "pretrained": False,
              "output_dir": "outputs/demo", "imbalance_ratio": 100}
RESULTS = {"overall": 0.5, "balanced": 0.45, "many": 0.8, "medium": 0.4, "few": 0.15}


def test_push_in_timm_format(tmp_path):
    from huggingface_hub import ModelCard

    from pih2t_hub.hub import push_to_hub

    model = create_model("test_resnet", num_labels=2)
    api = _RecordingApi()
    push_to_hub(model, "me/h2t-timm", config=RUN_CONFIG, results=RESULTS, plot=None, api=api, hub_format="timm")
    assert api.calls == ["create_repo", "upload_folder"]
    assert sorted(api.files) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads(api.files["config.json"])["architecture"] == "test_resnet"
    card = ModelCard(api.files["README.md"].decode())
    assert card.data.library_name == "timm"
    assert 'timm.create_model("hf-hub:me/h2t-timm"' in card.text
    assert "trust_remote_code=True" not in card.text

    # a pih2t-format folder is not a timm repo; an HF backbone cannot become one: refused before any request
    model.save_pretrained(tmp_path / "pih2t")
    for source, match in ((tmp_path / "pih2t", "not a timm config"), (_hf_vit_model(), "needs a timm backbone")):
        api = _RecordingApi()
        with pytest.raises(ValueError, match=match):
            push_to_hub(source, "me/x", config=RUN_CONFIG, results=RESULTS, api=api, hub_format="timm")
        assert api.calls == []
    with pytest.raises(ValueError, match="hub_format"):
        push_to_hub(model, "me/x", config=RUN_CONFIG, results=RESULTS, api=_RecordingApi(), hub_format="onnx")


def test_timm_format_push_loads_over_http_without_pih2t(olah_server, tmp_path):
    """Pushed in timm format to a Hub on loopback, the repo loads with ``hf-hub:`` and with TimmWrapper."""
    from hub_server import LocalGitHubApi, hub_client_env, run_hub_python
    from pih2t_hub.hub import push_to_hub

    torch.manual_seed(0)
    model = create_model("test_resnet", num_labels=3, id2label=LABELS).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0, 0.5)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(pixel_values=x).logits.double().numpy()
    repo = "pih2t-tests/test-resnet-timm"
    push_to_hub(model, repo, config=RUN_CONFIG, results=RESULTS, api=LocalGitHubApi(olah_server), hub_format="timm")
    save_file({"x": x.contiguous()}, str(tmp_path / "x.safetensors"))
    code = f"""
import json, timm, torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification
x = load_file({str(tmp_path / "x.safetensors")!r})["x"]
tm = timm.create_model("hf-hub:{repo}", pretrained=True).eval()
hf = AutoModelForImageClassification.from_pretrained({repo!r}).eval()
with torch.no_grad():
    out = {{"timm": tm(x).double().tolist(), "hf": hf(pixel_values=x).logits.double().tolist()}}
out["library"] = ModelCard.load({repo!r}).data.library_name
print("RESULT" + json.dumps(out))
"""
    proc = run_hub_python(code, hub_client_env(olah_server, tmp_path / "hf_home"), cwd=tmp_path, block_pih2t=True)
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    np.testing.assert_allclose(res["timm"], logits, rtol=0, atol=1e-5)
    np.testing.assert_allclose(res["hf"], logits, rtol=0, atol=1e-5)
    assert res["library"] == "timm"


@pytest.mark.parametrize("backbone", ["test_vit", "test_convnext"])
def test_other_timm_families_export(backbone, tmp_path):
    """ViT (token pooling, fc_norm) and ConvNeXt (norm head) rebuild with their classifier in the right place."""
    import timm

    torch.manual_seed(0)
    model = create_model(backbone, num_labels=4).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0, 0.5)
        model.classifier.bias.normal_(0, 0.5)
    folder = export_timm(model, tmp_path / backbone)
    size = json.loads((folder / "config.json").read_text())["pretrained_cfg"]["input_size"]
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(3))
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(pixel_values=x).logits, rtol=0, atol=1e-5)
