"""Transforms from timm data configs and HF image processors, applied with Dataset.with_transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image, Value
from PIL import Image as PILImage
from torch.utils.data import DataLoader

from pih2t_hub.data import apply_transform, build_transform

CFG = {"input_size": (3, 32, 32), "mean": (0.5, 0.4, 0.3), "std": (0.25, 0.2, 0.1), "interpolation": "bilinear",
       "crop_pct": 1.0}


def grey(value: int, size=(40, 40)) -> PILImage.Image:
    return PILImage.fromarray(np.full(size, value, dtype=np.uint8), mode="L")


def expected_constant(value: int, mean, std) -> torch.Tensor:
    return torch.tensor([(value / 255.0 - m) / s for m, s in zip(mean, std)])


def test_timm_config_eval_converts_grey_to_rgb_and_normalises():
    transform = build_transform(CFG, train=False)
    out = transform(grey(128))
    assert out.shape == (3, 32, 32)
    want = expected_constant(128, CFG["mean"], CFG["std"])
    assert torch.allclose(out.mean(dim=(1, 2)), want, atol=1e-5)
    assert torch.allclose(out.amax(dim=(1, 2)), out.amin(dim=(1, 2)))


def test_timm_model_source_and_input_size_override():
    import timm

    model = timm.create_model("resnet10t", pretrained=False, num_classes=2)
    cfg = model.pretrained_cfg
    out = build_transform(model, input_size=48)(grey(200, (60, 80)))
    assert out.shape == (3, 48, 48)
    assert torch.allclose(out[:, 20, 20], expected_constant(200, cfg["mean"], cfg["std"]), atol=1e-5)
    assert build_transform(CFG, input_size=(3, 24, 20))(grey(3)).shape == (3, 24, 20)


def test_train_variant_is_random_and_sized():
    image = PILImage.fromarray(np.random.default_rng(0).integers(0, 255, (50, 50, 3), dtype=np.uint8))
    transform = build_transform(CFG, train=True)
    torch.manual_seed(0)
    a = transform(image)
    b = transform(image)
    assert a.shape == b.shape == (3, 32, 32)
    assert not torch.equal(a, b)
    assert "RandomResizedCrop" in repr(transform) and "train=True" in repr(transform)


def test_repr_tracks_settings():
    assert repr(build_transform(CFG)) != repr(build_transform(CFG, input_size=28))
    assert repr(build_transform(CFG)) == repr(build_transform(dict(CFG)))


def test_hf_processor_eval_and_train():
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    out = build_transform(processor)(grey(255, (30, 20)))
    assert out.shape == (3, 16, 16)
    assert torch.allclose(out, torch.full_like(out, (1.0 - 0.5) / 0.25), atol=1e-4)
    assert build_transform(processor, input_size=12)(grey(9)).shape == (3, 12, 12)
    train = build_transform(processor, train=True)
    assert train(grey(0)).shape == (3, 16, 16)
    assert torch.allclose(train(grey(0)), torch.full((3, 16, 16), -2.0))


def image_dataset() -> Dataset:
    features = Features({"image": Image(), "label": ClassLabel(num_classes=3), "score": Value("float32")})
    images = [np.full((10, 12), 40 * i, dtype=np.uint8) for i in range(6)]
    return Dataset.from_dict({"image": images, "label": [0, 1, 2, 0, 1, 2], "score": [0.0] * 6}, features=features)


def test_apply_transform_with_dataset_and_loader():
    ds = apply_transform(image_dataset(), CFG, train=False)
    item = ds[4]
    assert set(item) == {"pixel_values", "labels"}
    assert item["labels"] == 1 and item["pixel_values"].shape == (3, 32, 32)
    assert torch.allclose(item["pixel_values"][:, 0, 0], expected_constant(160, CFG["mean"], CFG["std"]), atol=1e-5)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["labels"].tolist() == [0, 1, 2, 0]


def test_apply_transform_with_plain_callable():
    ds = apply_transform(image_dataset(), lambda im: torch.tensor(np.asarray(im)).permute(2, 0, 1))
    assert ds[1]["pixel_values"].shape == (3, 10, 12)  # the callable already receives RGB


def test_errors():
    ds = image_dataset()
    with pytest.raises(TypeError, match="not an image column"):
        apply_transform(ds, CFG, image_column="score")
    with pytest.raises(ValueError, match="no Image column"):
        apply_transform(ds.remove_columns("image"), CFG)
    with pytest.raises(TypeError, match="cannot build a transform"):
        build_transform(object())
    with pytest.raises(ValueError, match="input_size"):
        build_transform(CFG, input_size="big")
    with pytest.raises(TypeError, match="not a label column"):
        apply_transform(ds, CFG, label_column="score")


# ---------------------------------------------------------------------------------------------- bit depths, files


def _constant_after_eval(image) -> torch.Tensor:
    """The per-channel value a constant image has after the eval transform (CFG normalisation)."""
    out = build_transform(CFG, train=False)(image)
    assert torch.allclose(out.amax(dim=(1, 2)), out.amin(dim=(1, 2)))
    return out.mean(dim=(1, 2))


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    """A 16-bit PNG at 51400/65535 is grey level 200/255 (51400 = 200 * 257); convert("RGB") clipped it to 255."""
    path = tmp_path / "grey16.png"
    PILImage.fromarray(np.full((40, 40), 51400, dtype=np.uint16)).save(path)
    image = PILImage.open(path)
    assert image.mode.startswith("I")  # "I;16" (Pillow >= 10) or "I"
    want = expected_constant(200, CFG["mean"], CFG["std"])
    assert torch.allclose(_constant_after_eval(image), want, atol=1e-5)
    clipped = expected_constant(255, CFG["mean"], CFG["std"])
    assert not torch.allclose(want, clipped, atol=1e-2)


@pytest.mark.parametrize("make, level", [
    (lambda: PILImage.fromarray(np.full((40, 40), 257 * 77, dtype=np.int32), mode="I"), 77),
    (lambda: PILImage.fromarray(np.full((40, 40), 0.6, dtype=np.float32), mode="F"), 153),  # 0.6 * 255
    (lambda: np.full((40, 40), 257 * 10, dtype=np.uint16), 10),
    (lambda: np.full((40, 40, 3), 0.2, dtype=np.float64), 51),
    (lambda: np.ones((40, 40), dtype=bool), 255),
    (lambda: torch.full((3, 40, 40), 90, dtype=torch.uint8), 90),  # C x H x W, as torchvision tensors are
    (lambda: torch.full((40, 40, 1), 90, dtype=torch.uint8), 90),
])
def test_high_bit_depth_modes_and_arrays_become_8_bit_rgb(make, level):
    assert torch.allclose(_constant_after_eval(make()), expected_constant(level, CFG["mean"], CFG["std"]), atol=1e-5)


@pytest.mark.parametrize("array, match", [
    (np.full((8, 8), 1.5, dtype=np.float32), r"float image must hold values in \[0, 1\]"),
    (np.full((8, 8), np.nan, dtype=np.float32), "non-finite"),
    (np.full((8, 8), -3, dtype=np.int16), "must lie in 0..65535"),
])
def test_out_of_range_values_are_refused_not_clipped(array, match):
    with pytest.raises(ValueError, match=match):
        build_transform(CFG)(array)


def _files_dataset(tmp_path, names):
    from datasets import Dataset

    return Dataset.from_dict({"image": [str(tmp_path / n) for n in names], "label": [0, 1, 0][:len(names)]},
                             features=Features({"image": Image(), "label": ClassLabel(names=["a", "b"])}))


def _write_images(tmp_path):
    good = tmp_path / "good.jpg"
    PILImage.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "not_an_image.png").write_bytes(b"hello")
    return ["good.jpg", "truncated.jpg", "not_an_image.png"]


def test_an_unreadable_file_is_named_in_the_error(tmp_path):
    from pih2t_hub.data.transforms import UnreadableImageError

    ds = apply_transform(_files_dataset(tmp_path, _write_images(tmp_path)), CFG)
    assert ds[0]["pixel_values"].shape == (3, 32, 32)
    with pytest.raises(UnreadableImageError, match=f"cannot read image {tmp_path / 'truncated.jpg'}"):
        ds[1]
    with pytest.raises(UnreadableImageError, match="not_an_image.png"):  # through a loader's batched fetch
        next(iter(DataLoader(ds.select([0, 2]), batch_size=2)))


def test_drop_unreadable_skips_and_reports_them(tmp_path):
    from pih2t_hub.data.transforms import drop_unreadable

    kept, bad = drop_unreadable(_files_dataset(tmp_path, _write_images(tmp_path)))
    assert len(kept) == 1 and kept[0]["image"].size == (32, 32)
    assert [row for row, _ in bad] == [1, 2]
    assert "truncated.jpg" in bad[0][1] and "not_an_image.png" in bad[1][1]


@pytest.mark.parametrize("imbalance_ratio", [None, 2.0], ids=["whole-split", "long-tailed"])
def test_load_splits_names_each_skipped_image_by_its_row_in_the_dataset(tmp_path, imbalance_ratio):
    """Skipped images are recorded by (dataset split, row) as the user loads the dataset, through the balanced test
    hold-out and the long-tailed subset, which both renumber rows."""
    from types import SimpleNamespace

    from datasets import Image as ImageFeature

    from pih2t_hub.data.sources import load_dataset_any
    from pih2t_hub.data.splits import load_splits

    folder, bad = tmp_path / "folder", set()
    rng = np.random.default_rng(0)
    for c, name in enumerate(["a", "b", "c"]):
        (folder / name).mkdir(parents=True)
        for i in range(12):
            path = folder / name / f"{i}.png"
            if i % 3 == 1:  # a third of every class cannot be decoded
                path.write_bytes(b"\x89PNG broken")
                bad.add(str(path))
            else:
                PILImage.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(path)
    cfg = SimpleNamespace(dataset=str(folder), label_column=None, image_column=None, test_per_class=4, seed=0,
                          imbalance_ratio=imbalance_ratio, profile="exp", max_per_class=None, val_fraction=0.2,
                          skip_unreadable_images=True)
    data = load_splits(cfg)
    listed = data["unreadable_images"]
    assert {r["split"] for r in listed} == {"train", "test"}  # both renumbered paths are exercised
    assert data["skipped_images"] == {s: sum(r["split"] == s for r in listed) for s in ("train", "test")}
    source = load_dataset_any(str(folder), split="train").cast_column("image", ImageFeature(decode=False))
    for r in listed:
        assert r["path"] in bad and r["dataset_split"] == "train" and r["error"], r
        assert source[r["row"]]["image"]["path"] == r["path"], r
    assert len({r["row"] for r in listed}) == len(listed)
    if imbalance_ratio is None:  # every row is used: every bad file is found, every good one kept
        assert {r["path"] for r in listed} == bad
        assert len(data["train"]) + len(data["val"]) + len(data["test"]) == 36 - len(bad)
