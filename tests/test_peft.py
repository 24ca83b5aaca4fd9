"""Lightweight fine-tuning (``--stage1-mode peft``): LoRA, AdaptFormer, BitFit and VPT on tiny random backbones.

The invariants: an adapted backbone starts equal to the pretrained one (LoRA's B and AdaptFormer's up-projection
are zero), merging LoRA changes no logit, gradients reach only the module and the head, the trainable counts are
the ones the layer shapes give, a saved model reloads (Auto classes, and ``trust_remote_code`` where neither
pih2t_hub nor peft can be imported) with the same logits, and bad flags are one ``error:`` line before torch.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageClassification, ViTConfig

from pih2t_hub import create_model
from pih2t_hub.models.adapt import adapt, resolve_spec

ROOT = Path(__file__).resolve().parents[1]


def tiny_vit_config() -> ViTConfig:
    return ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     image_size=32, patch_size=8)


BACKBONES = {"timm_vit": "test_vit", "hf_vit": tiny_vit_config(), "timm_cnn": "test_resnet"}
VIT_KEYS = ("timm_vit", "hf_vit")


def _model(key: str, seed: int = 0):
    torch.manual_seed(seed)
    return create_model(BACKBONES[key], num_labels=3, class_counts=[30, 10, 3]).eval()


def _input(model, batch: int = 2) -> torch.Tensor:
    _, h, w = model.config.backbone_data_config["input_size"]
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1))


def _perturb(module: torch.nn.Module, names: tuple[str, ...], seed: int = 3) -> None:
    """Give the zero-initialised tensors (LoRA's B, AdaptFormer's up-projection) values, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(n in name for n in names):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


# ---------------------------------------------------------------------------------------------- identity at start


@pytest.mark.parametrize("key, kind", [(k, kind) for k in VIT_KEYS for kind in ("lora", "adaptformer", "bitfit")]
                         + [("timm_cnn", "lora"), ("timm_cnn", "bitfit")])
def test_the_adapted_backbone_starts_as_the_pretrained_one(key, kind):
    model = _model(key)
    x = _input(model)
    with torch.no_grad():
        before = model(x).logits.clone()
    adapt(model, resolve_spec(model, kind, rank=2))
    with torch.no_grad():
        after = model(x).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("key", VIT_KEYS)
def test_the_modules_act_once_trained(key):
    """Identity at start is not identity forever: non-zero up-projections / prompts change the logits."""
    for kind, names in (("adaptformer", ("up_proj",)), ("vpt", ("prompt",)), ("lora", ("lora_B",))):
        model = _model(key)
        x = _input(model)
        with torch.no_grad():
            before = model(x).logits.clone()
        adapt(model, resolve_spec(model, kind, rank=2, prompts=3))
        _perturb(model, names)
        with torch.no_grad():
            assert not torch.allclose(model(x).logits, before), kind


# ---------------------------------------------------------------------------------------------- merged == unmerged


@pytest.mark.parametrize("key", list(BACKBONES))
def test_merged_lora_gives_the_unmerged_logits(key):
    model = _model(key)
    x = _input(model)
    adapted = adapt(model, resolve_spec(model, "lora", rank=2))
    _perturb(model, ("lora_B",))
    with torch.no_grad():
        unmerged = model(x).logits.clone()
    merged = adapted.finish()
    names = [n for n, _ in merged.named_parameters()]
    assert not any("lora_" in n for n in names)  # plain layers again
    assert set(names) == {n for n, _ in _model(key).named_parameters()}  # the pretrained model's own keys
    assert merged.config.tuning["merged"] is True
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, unmerged, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- gradients


def _expected_trainable(model, kind: str) -> set[str]:
    """What may receive a gradient, by name and layer type, written independently of the implementation."""
    names = set()
    norm_types = (torch.nn.BatchNorm2d, torch.nn.LayerNorm)
    norm_params = {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, norm_types)
                   for p, _ in mod.named_parameters(recurse=False)}
    for name, _ in model.named_parameters():
        if name.startswith("classifier."):
            names.add(name)
        elif kind == "lora" and "lora_" in name:
            names.add(name)
        elif kind in ("adaptformer", "vpt") and name.startswith("pih2t.tuning."):
            names.add(name)
        elif kind == "bitfit" and name.startswith("pih2t.backbone.") and (
                name.endswith(".bias") or name in norm_params):
            names.add(name)
    return names


@pytest.mark.parametrize("key, kind", [(k, kind) for k in VIT_KEYS for kind in ("lora", "adaptformer", "bitfit", "vpt")]
                         + [("timm_cnn", "lora"), ("timm_cnn", "bitfit")])
def test_gradients_reach_only_the_module_and_the_head(key, kind):
    model = _model(key)
    adapt(model, resolve_spec(model, kind, rank=2, prompts=3))
    _perturb(model, ("lora_B", "up_proj"))  # so that LoRA's A and AdaptFormer's down-projection get gradients too
    model(_input(model)).logits.square().sum().backward()
    expected = _expected_trainable(model, kind)
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    nonzero = {n for n, p in model.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
    assert any(not n.startswith("classifier.") for n in nonzero)  # the module really learns


# ---------------------------------------------------------------------------------------------- trainable counts


def test_trainable_counts_are_the_layer_shapes():
    """test_vit: width d = 64... read from the model; L blocks; qkv is d → 3d (timm fuses q, k, v)."""
    model = _model("timm_vit")
    vit = model.get_backbone().model
    d, blocks = vit.embed_dim, len(vit.blocks)
    r = 2
    spec = adapt(model, resolve_spec(model, "lora", rank=r)).spec
    assert spec["trainable_params"] == blocks * r * (d + 3 * d)
    assert spec["backbone_params"] == sum(p.numel() for p in _model("timm_vit").get_backbone().parameters())
    model = _model("timm_vit")
    spec = adapt(model, resolve_spec(model, "adaptformer", rank=r)).spec
    assert spec["trainable_params"] == blocks * (2 * d + d * r + r + r * d + d + 1)  # LN, down, up, scale
    model = _model("timm_vit")
    spec = adapt(model, resolve_spec(model, "vpt", prompts=5)).spec
    assert spec["trainable_params"] == blocks * 5 * d
    assert spec["trainable_percent"] == pytest.approx(100 * blocks * 5 * d / spec["backbone_params"], abs=1e-3)


def test_lift_rank_rule():
    from pih2t_hub.models.pih2t.tuning import lift_rank

    # LIFT's published values for ViT-B (12 blocks): ImageNet-LT 32, Places-LT 8, CIFAR-100 4, iNat 2018 256
    assert [lift_rank(c, 12) for c in (1000, 365, 100, 8142, 10)] == [32, 8, 4, 256, 1]


def test_the_light_kind_lists_agree_with_the_model_code():
    from pih2t_hub._tuning_names import PEFT_KINDS, PEFT_MODULE_KINDS
    from pih2t_hub.models.pih2t.tuning import MODULE_KINDS, TUNING_KINDS

    assert PEFT_KINDS == TUNING_KINDS and PEFT_MODULE_KINDS == MODULE_KINDS


@pytest.mark.parametrize("key", VIT_KEYS)
def test_vpt_keeps_the_token_count_of_every_block(key):
    model = _model(key)
    x = _input(model)
    with torch.no_grad():
        ref = model.pih2t(x, output_hidden_states=True)
    adapt(model, resolve_spec(model, "vpt", prompts=4))
    with torch.no_grad():
        out = model.pih2t(x, output_hidden_states=True)
    assert out.last_hidden_state.shape == ref.last_hidden_state.shape
    # every block's output; transformers records block 0's *input* (with its prompts) as its first hidden state
    first = 0 if key.startswith("timm") else 1
    assert [h.shape for h in out.hidden_states[first:]] == [h.shape for h in ref.hidden_states[first:]]


# ---------------------------------------------------------------------------------------------- save, load, export


def _trained(key: str, kind: str):
    model = _model(key)
    adapted = adapt(model, resolve_spec(model, kind, rank=2, prompts=3))
    _perturb(model, ("lora_B", "up_proj", "prompt"))
    if kind == "bitfit":
        _perturb(model, ("bias",))
    return adapted.finish().eval()


@pytest.mark.parametrize("key, kind", [("timm_vit", "adaptformer"), ("hf_vit", "vpt"), ("hf_vit", "adaptformer"),
                                       ("timm_cnn", "lora")])
def test_saved_adapted_model_reloads_with_its_logits(tmp_path, key, kind):
    model = _trained(key, kind)
    x = _input(model)
    with torch.no_grad():
        logits = model(x).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "tuning.py").is_file()
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.tuning["kind"] == kind
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, logits)


def test_trust_remote_code_without_pih2t_hub_and_without_peft(tmp_path):
    """A saved LoRA, BitFit and AdaptFormer model loads in a process where neither pih2t_hub nor peft can be
    imported: ``sys.modules[name] = None`` makes every ``import name`` raise ImportError, so a hidden dependency of
    the remote code on either fails this test. The process runs from ``tmp_path`` without the project on its path."""
    script = tmp_path / "load.py"
    script.write_text(
        "import sys, torch\n"
        "for name in ('pih2t_hub', 'peft'):\n"
        "    sys.modules[name] = None  # any import of it now raises ImportError\n"
        "from transformers import AutoModelForImageClassification\n"
        "path, xfile, out = sys.argv[1:4]\n"
        "m = AutoModelForImageClassification.from_pretrained(path, trust_remote_code=True).eval()\n"
        "assert 'transformers_modules' in type(m).__module__, type(m).__module__\n"
        "assert not any(k.startswith('peft') and sys.modules[k] is not None for k in sys.modules)\n"
        "x = torch.load(xfile, weights_only=True)\n"
        "with torch.no_grad():\n"
        "    torch.save(m(x).logits, out)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    for key, kind in (("timm_cnn", "lora"), ("timm_cnn", "bitfit"), ("timm_vit", "adaptformer")):
        model = _trained(key, kind)
        x = _input(model)
        with torch.no_grad():
            logits = model(x).logits
        path = tmp_path / f"{key}_{kind}"
        model.save_pretrained(path)
        torch.save(x, tmp_path / "x.pt")
        proc = subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert torch.equal(torch.load(tmp_path / "y.pt", weights_only=True), logits), kind


def test_timm_export_of_merged_lora_and_bitfit_and_refusal_of_modules(tmp_path):
    from pih2t_hub.hub.timm_export import TimmExportError, build_timm_model

    for kind in ("lora", "bitfit"):
        model = _trained("timm_cnn", kind)
        exported = build_timm_model(model)
        x = _input(model)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), model(x).logits, rtol=1e-5, atol=1e-5)
    for kind in ("adaptformer", "vpt"):
        with pytest.raises(TimmExportError, match=f"{kind} modules sit inside the backbone's blocks"):
            build_timm_model(_trained("timm_vit", kind))


def test_model_card_states_the_tuning():
    from pih2t_hub.hub.model_card import render_model_card

    tuning = {"kind": "lora", "rank": 4, "alpha": 1.0, "trainable_params": 22843, "backbone_params": 3371008,
              "trainable_percent": 0.6776, "merged": True}
    config = {"backbone": "effnet_lite0", "dataset": "mnist", "method": "h2t", "tuning": tuning}
    results = {"overall": 0.9, "balanced": 0.9, "many": 0.95, "medium": 0.9, "few": 0.8}
    text = str(render_model_card(config, results, plot_path=None))
    assert ("| Lightweight fine-tuning | lora (rank 4, alpha 1.0): 22,843 trainable parameters, 0.678 % of the "
            "backbone's 3,371,008; merged into the backbone's weights |") in text
    assert "Lightweight fine-tuning" not in str(render_model_card({**config, "tuning": None}, results, plot_path=None))


# ---------------------------------------------------------------------------------------------- the command line

TINY = ["--pretrained", "false", "--dataset", "digits", "--image-size", "32", "--max-per-class", "60",
        "--imbalance-ratio", "10", "--test-per-class", "20"]
PEFT = ["--stage1-mode", "peft", "--peft"]
ERRORS = [
    (["--backbone", "test_resnet", *PEFT, "lorra"], "unknown --peft kind 'lorra' (did you mean lora?)"),
    (["--backbone", "test_resnet", *PEFT, "lora", "--peft-rank", "0"], "peft_rank must be >= 1, got 0"),
    (["--backbone", "test_resnet", *PEFT, "adaptformer"], "--peft adaptformer applies to ViT-family backbones"),
    (["--backbone", "effnet_lite0", *PEFT, "vpt"], "--peft vpt applies to ViT-family backbones"),
    (["--backbone", "test_resnet", "--peft", "lora"], "--peft lora needs --stage1-mode peft (got --stage1-mode linea"),
    (["--backbone", "test_resnet", "--stage1-mode", "peft"], "--stage1-mode peft needs --peft: one of lora, adaptform"),
    (["--backbone", "test_vit", *PEFT, "vpt", "--export", "timm"], "--peft vpt adds modules plain timm does not have"),
    (["--init-from", "{tmp}/adapted", *PEFT, "bitfit"], "was already adapted (lora); lightweight fine-tuning starts"),
]


@pytest.mark.parametrize("extra, words", ERRORS, ids=[e[1][:30] for e in ERRORS])
def test_bad_peft_flags_are_one_line_before_torch(tmp_path, extra, words):
    (tmp_path / "adapted").mkdir()
    (tmp_path / "adapted" / "config.json").write_text(json.dumps(
        {"model_type": "pih2t", "backbone": "test_resnet", "backbone_source": "timm", "tuning": {"kind": "lora"}}))
    extra = [a.format(tmp=tmp_path) for a in extra]
    tiny = TINY[2:] if "--init-from" in extra else TINY  # a saved model carries its weights: no --pretrained
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-X", "importtime", "recipes/finetune.py", *tiny, *extra,
                           "--output-dir", str(tmp_path / "o")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
                if line.startswith("import time:") and line.count("|") == 2}
    assert "pih2t_hub.training.cli" in imported and "torch" not in imported
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- end to end


def _hf_folder(tmp_path: Path) -> str:
    folder = tmp_path / "tiny_hf_vit"
    tiny_vit_config().save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("backbone, kind", [("test_vit", "adaptformer"), ("hf", "vpt"), ("test_resnet", "lora"),
                                            ("hf", "adaptformer"), ("test_vit", "vpt")])
def test_a_peft_run_end_to_end(tmp_path, backbone, kind):
    """recipes/finetune.py's pipeline: peft stage 1, features of the adapted backbone, H2T, the saved model; the
    folder re-evaluated gives the reported test numbers, and its card states the tuning."""
    from pih2t_hub.training.config import RunConfig
    from pih2t_hub.training.run import run

    bb = _hf_folder(tmp_path) if backbone == "hf" else backbone
    cfg = RunConfig(backbone=bb, pretrained=False, dataset="digits", image_size=32, max_per_class=60,
                    imbalance_ratio=10.0, test_per_class=20, stage1_mode="peft", peft=kind, peft_prompts=2,
                    stage1_epochs=1, stage2_epochs=1, batch_size=64, output_dir=str(tmp_path / "out"))
    results = run(cfg)
    folder = tmp_path / "out" / "model"
    saved = json.loads((folder / "config.json").read_text())
    assert saved["tuning"]["kind"] == kind and saved["head_type"] == "cosine"
    assert "Lightweight fine-tuning" in (folder / "README.md").read_text()
    assert results["stage1"]["history"][0]["val_balanced"] >= 0
    loaded = AutoModelForImageClassification.from_pretrained(folder).eval()
    model_logits = _test_logits(loaded, cfg)
    assert model_logits is not None
    ref = results["test"]["balanced"]
    assert _balanced(model_logits) == pytest.approx(ref, abs=1e-6)


def _test_logits(model, cfg):
    from pih2t_hub.data.splits import load_splits
    from pih2t_hub.data.transforms import apply_transform, build_transform

    data = load_splits(cfg)
    tf = build_transform(dict(model.config.backbone_data_config), train=False)
    ds = apply_transform(data["test"], tf, image_column=cfg.image_column, label_column=data["label_column"])
    xs = torch.stack([ds[i]["pixel_values"] for i in range(len(ds))])
    ys = torch.tensor([int(ds[i]["labels"]) for i in range(len(ds))])
    with torch.no_grad():
        return model(xs).logits, ys


def _balanced(logits_and_labels) -> float:
    logits, y = logits_and_labels
    pred = logits.argmax(1)
    return float(torch.stack([(pred[y == c] == c).float().mean() for c in y.unique()]).mean())


def test_the_comparison_starts_from_an_adapted_backbone(tmp_path):
    """``python -m pih2t_hub.compare --init-from <saved peft model>``: the methods are compared on the adapted
    backbone's features (AdaptFormer modules included), and the best model it saves still carries them."""
    import pih2t_hub.compare as cmp
    from pih2t_hub.compare_cli import resolve_configs

    model = _trained("timm_vit", "adaptformer")
    model.config.num_labels = 10  # re-labelled for digits: a fresh head, the adapted backbone kept
    from pih2t_hub.models.pih2t.heads import build_head

    model.classifier = build_head("linear", model.config.num_features, 10)
    model.config.class_counts = None
    model.save_pretrained(tmp_path / "adapted")
    argv = ["--init-from", str(tmp_path / "adapted"), "--methods", "ce", "--trials", "1", "--seeds", "1",
            "--max-epochs", "1", "--dataset", "digits", "--image-size", "32", "--max-per-class", "60",
            "--imbalance-ratio", "10", "--test-per-class", "20", "--stage1-epochs", "1", "--pretrained", "false",
            "--output-dir", str(tmp_path / "cmp"), "--no-progress"]
    base, cc = resolve_configs(argv)
    assert base.init_from == str(tmp_path / "adapted")
    report = cmp.compare(base, cc, progress=False)
    assert "ce" in report["methods"]
    best = json.loads((tmp_path / "cmp" / "best_model" / "config.json").read_text())
    assert best["tuning"]["kind"] == "adaptformer"
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "cmp" / "best_model").eval()
    assert loaded.pih2t.tuning is not None and torch.equal(
        loaded.pih2t.tuning.blocks[0].up_proj.weight, model.pih2t.tuning.blocks[0].up_proj.weight)


@pytest.mark.parametrize("kind", ["lora", "bitfit"])
def test_a_peft_run_resumes_mid_epoch_bitwise(tmp_path, kind):
    """Stopped after 3 peft steps (checkpoint 2, mid-epoch, LoRA layers in the checkpointed model), then
    ``resume=True``: the saved model, the stage-1 history and the test numbers equal an uninterrupted run's."""
    from safetensors.torch import load_file

    from pih2t_hub.training.config import RunConfig
    from pih2t_hub.training.loop import StopAfterSteps
    from pih2t_hub.training.run import run

    def cfg(out: Path, **extra) -> RunConfig:
        return RunConfig(backbone="test_resnet", pretrained=False, dataset="digits", image_size=32, max_per_class=60,
                         imbalance_ratio=10.0, test_per_class=20, batch_size=32, stage1_mode="peft", peft=kind,
                         stage1_epochs=2, stage2_epochs=1, checkpoint_every=2, output_dir=str(out), **extra)

    ref = run(cfg(tmp_path / "ref"))
    partial = run(cfg(tmp_path / "cut"), callbacks=[StopAfterSteps(3)])
    assert "test" not in partial
    resumed = run(cfg(tmp_path / "cut", resume=True))
    a = load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key in ("stage1", "test"):
        assert json.dumps(resumed[key], sort_keys=True) == json.dumps(ref[key], sort_keys=True)


def test_five_crops_are_the_corners_and_centre_of_the_enlarged_image():
    """LIFT's test-time ensemble input, against crops cut by hand from the resized image."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms import functional as TF

    from pih2t_hub.training.lightweight import FiveCrops

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    dc = {"input_size": [3, 32, 32], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear"}
    crops = FiveCrops(dc)(image)
    assert crops.shape == (5, 3, 32, 32)
    big = TF.to_tensor(TF.resize(image, 56))  # short side 32 + 24 = 56: (56, 70)
    assert big.shape[1:] == (56, 70)
    mean, std = torch.tensor(dc["mean"])[:, None, None], torch.tensor(dc["std"])[:, None, None]
    by_hand = [big[:, :32, :32], big[:, :32, -32:], big[:, -32:, :32], big[:, -32:, -32:], big[:, 12:44, 19:51]]
    for crop, ref in zip(crops, by_hand):
        torch.testing.assert_close(crop, (ref - mean) / std)


def test_tta_reports_the_averaged_five_crop_logits(tmp_path):
    """``tta=True`` adds a ``test_tta`` row: the saved model's logits averaged over five crops, recomputed here."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    from pih2t_hub.data.splits import load_splits
    from pih2t_hub.training.config import RunConfig
    from pih2t_hub.training.run import run

    cfg = RunConfig(backbone="test_resnet", pretrained=False, dataset="digits", image_size=32, max_per_class=60,
                    imbalance_ratio=10.0, test_per_class=20, stage1_mode="peft", peft="bitfit", stage1_epochs=1,
                    stage2_epochs=1, batch_size=64, tta=True, output_dir=str(tmp_path / "out"))
    results = run(cfg)
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "out" / "model").eval()
    dc = model.config.backbone_data_config
    mean, std = torch.tensor(dc["mean"])[:, None, None], torch.tensor(dc["std"])[:, None, None]
    data = load_splits(cfg)
    test = data["test"]
    image_col = next(k for k, f in test.features.items() if type(f).__name__ == "Image")
    logits, labels = [], []
    for row in test:
        image = row[image_col]
        image = (image if isinstance(image, Image.Image) else Image.open(image["path"])).convert("RGB")
        big = TF.to_tensor(TF.resize(image, 32 + 24, interpolation=TF.InterpolationMode.BICUBIC
                                     if dc.get("interpolation") == "bicubic" else TF.InterpolationMode.BILINEAR))
        crops = torch.stack([(c - mean) / std for c in TF.five_crop(big, [32, 32])])
        with torch.no_grad():
            logits.append(model(crops).logits.mean(0))
        labels.append(int(row[data["label_column"]]))
    assert _balanced((torch.stack(logits), torch.tensor(labels))) == pytest.approx(results["test_tta"]["balanced"],
                                                                                  abs=1e-6)
