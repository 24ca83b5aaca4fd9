"""Image transforms that match the backbone, applied lazily with ``Dataset.with_transform``.

A pretrained backbone expects the resolution, interpolation and normalisation it was trained with. These come
from the backbone itself rather than from hard-coded ImageNet constants:

* a timm model (or its ``pretrained_cfg`` / a data-config dict): ``timm.data.resolve_data_config`` then
  ``timm.data.create_transform`` (train: RandomResizedCrop + flip + colour jitter; eval: resize + centre crop);
* a Hugging Face image processor (``AutoImageProcessor.from_pretrained(...)``): eval calls the processor
  itself (its exact preprocessing); train builds RandomResizedCrop + flip + normalisation with the processor's
  size, mean and std, as the transformers image-classification example does.

Every transform first converts the image to RGB (grayscale MNIST-like data would otherwise produce 1-channel
tensors that break a 3-channel normalisation). :func:`batch_transform` / :func:`apply_transform` turn it into the
batched function ``with_transform`` wants, emitting ``{"pixel_values": tensor, "labels": int}`` per example, the
names transformers models and the default collate expect.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

__all__ = ["ImageTransform", "UnreadableImage", "UnreadableImageError", "apply_transform", "batch_transform",
           "build_transform", "decode_image", "drop_unreadable", "find_unreadable", "resolve_image_column"]


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded (truncated, not an image); the message names the file.

    ``path`` is the file's path (``None`` for bytes embedded in the dataset) and ``reason`` the decoder's own
    message on one line, so a caller can record both without parsing the message."""

    def __init__(self, message: str, path: str | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.path, self.reason = path, reason


class UnreadableImage(NamedTuple):
    """A row whose image cannot be decoded: its row in the dataset searched, its file (``None`` when the bytes are
    embedded) and the decoder's one-line message."""

    row: int
    path: str | None
    error: str


class ImageTransform:
    """A PIL/array -> tensor callable with a stable, descriptive ``repr``.

    The repr names every step and parameter; the feature cache stores it in its manifest, so changing e.g.
    the input size invalidates cached features.
    """

    def __init__(self, fn: Callable[[Any], torch.Tensor], description: str) -> None:
        self.fn = fn
        self.description = description

    def __call__(self, image) -> torch.Tensor:
        return self.fn(_to_rgb(image))

    def __repr__(self) -> str:
        return f"ImageTransform(rgb, {self.description})"


# PIL modes whose values exceed 8 bits: ``convert("RGB")`` clips them at 255 (a 16-bit grey PNG became nearly white)
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _to_uint8(array, source: str):
    """Values of an image array as uint8 RGB-ready grey levels, scaled by the range of their type (never clipped
    silently): 8-bit as is, 16-bit (``uint16``, PIL ``I;16*`` / ``I``) divided by 257 so 65535 -> 255, booleans
    0/255, floats in [0, 1] times 255. Values outside their type's range raise ``ValueError``."""
    import numpy as np

    array = np.asarray(array)
    kind = array.dtype.kind
    if array.dtype == np.uint8:
        return array
    if kind == "b":
        return array.astype(np.uint8) * 255
    if kind == "f":
        finite = np.isfinite(array).all()
        if not finite or array.min(initial=0) < 0 or array.max(initial=0) > 1:
            raise ValueError(f"{source}: a float image must hold values in [0, 1] (got "
                             f"{'non-finite values' if not finite else f'{array.min():g}..{array.max():g}'})")
        return np.rint(array * 255.0).astype(np.uint8)
    if kind in "iu":
        if array.min(initial=0) < 0 or array.max(initial=0) > 65535:
            raise ValueError(f"{source}: integer image values must lie in 0..65535 (16-bit), got "
                             f"{array.min()}..{array.max()}")
        return np.rint(array.astype(np.float64) / 257.0).astype(np.uint8)  # 16-bit range, even if stored wider
    raise TypeError(f"{source}: cannot read image values of dtype {array.dtype}")


def _to_rgb(image):
    from PIL import Image

    import numpy as np

    if isinstance(image, Image.Image):
        if image.mode == "RGB":
            return image
        if image.mode in _HIGH_BIT_MODES:  # scale to 8 bits by the mode's range, then grey -> RGB
            return Image.fromarray(_to_uint8(np.asarray(image), f"a mode {image.mode} image"), mode="L").convert("RGB")
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = image.permute(1, 2, 0)  # torchvision's C x H x W layout
        image = image.numpy()
    array = np.asarray(image)
    if array.ndim == 2:  # H x W grayscale
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise TypeError(f"expected a PIL image, an HxW / HxWxC array or a CxHxW tensor, got shape {array.shape}")
    array = _to_uint8(array, f"a {array.dtype} image array")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return Image.fromarray(array).convert("RGB")


def decode_image(value: Any):
    """A dataset image cell as a PIL image: an undecoded ``{"path", "bytes"}`` cell is opened and fully loaded here,
    so a truncated or corrupt file raises :class:`UnreadableImageError` naming it (datasets' own decoding reports
    only PIL's message). Anything else (a PIL image, an array) is returned as is."""
    if not isinstance(value, Mapping):
        return value
    import io

    from PIL import Image

    path, data = value.get("path"), value.get("bytes")
    try:
        image = Image.open(io.BytesIO(data) if data is not None else path)
        image.load()
    except (OSError, SyntaxError, ValueError, TypeError) as err:  # PIL: UnidentifiedImageError, "truncated", ...
        reason = " ".join(str(err).split()) or type(err).__name__
        raise UnreadableImageError(f"cannot read image {path or '(embedded bytes without a file name)'}: {reason}",
                                   path=path or None, reason=reason) from None
    return image


def _undecoded(ds, image_column: str):
    """``ds`` with its image column left undecoded (decoding then goes through :func:`decode_image`)."""
    from datasets import Image

    return ds.cast_column(image_column, Image(decode=False)) if ds.features[image_column].decode else ds


def find_unreadable(ds, image_column: str | None = None, batch_size: int = 256) -> list[UnreadableImage]:
    """The rows of ``ds`` whose image cannot be decoded, in row order: every image is decoded once (the cost of
    ``--skip-unreadable-images``)."""
    column = resolve_image_column(ds, image_column)
    raw = _undecoded(ds, column)
    bad: list[UnreadableImage] = []
    for start in range(0, len(raw), batch_size):
        for offset, cell in enumerate(raw[start:start + batch_size][column]):
            try:
                decode_image(cell)
            except UnreadableImageError as err:
                bad.append(UnreadableImage(start + offset, err.path, err.reason))
    return bad


def drop_unreadable(ds, image_column: str | None = None, batch_size: int = 256):
    """``(ds without its unreadable images, [(row, message), ...])``, the message naming the file; the kept rows
    keep their order. :func:`find_unreadable` gives path and decoder message apart."""
    column = resolve_image_column(ds, image_column)
    found = find_unreadable(ds, column, batch_size)
    bad = [(b.row, f"cannot read image {b.path or '(embedded bytes without a file name)'}: {b.error}") for b in found]
    return _without_rows(ds, [b.row for b in found]), bad


def _without_rows(ds, rows):
    """``ds`` without the given row indices (order kept); ``ds`` itself when there are none."""
    if not len(rows):
        return ds
    skip = {int(r) for r in rows}
    return ds.select([i for i in range(len(ds)) if i not in skip])


def _size_hw(input_size) -> tuple[int, int] | None:
    if input_size is None:
        return None
    if isinstance(input_size, int) and not isinstance(input_size, bool):
        size = (input_size, input_size)
    elif isinstance(input_size, (tuple, list)) and len(input_size) in (2, 3):
        size = tuple(int(s) for s in input_size[-2:])  # accepts timm's (C, H, W)
    else:
        raise ValueError(f"input_size must be an int, (H, W) or (C, H, W), got {input_size!r}")
    if min(size) < 1:
        raise ValueError(f"input_size must be positive, got {input_size!r}")
    return size


def _is_hf_processor(source) -> bool:
    try:
        from transformers.image_processing_utils import BaseImageProcessor
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(source, BaseImageProcessor)


def _timm_transform(source, train: bool, size: tuple[int, int] | None) -> ImageTransform:
    from timm.data import create_transform, resolve_data_config

    if isinstance(source, torch.nn.Module):
        config = resolve_data_config(model=source)
    else:
        config = resolve_data_config(pretrained_cfg=dict(source))
    if size is not None:
        config["input_size"] = (3, *size)
    transform = create_transform(**config, is_training=train)
    return ImageTransform(transform, f"timm train={train} {sorted(config.items())} {transform!r}")


def _processor_size(processor, size: tuple[int, int] | None) -> tuple[int, int]:
    """Output (H, W) of the processor: its crop size when it centre-crops, else its resize target."""
    if size is not None:
        return size
    for attr in ("crop_size", "size"):
        spec = getattr(processor, attr, None)
        if spec is None or (attr == "crop_size" and not getattr(processor, "do_center_crop", False)):
            continue
        get = spec.get if isinstance(spec, Mapping) else lambda k, s=spec: getattr(s, k, None)
        if get("height") and get("width"):
            return int(get("height")), int(get("width"))
        if get("shortest_edge"):
            return int(get("shortest_edge")), int(get("shortest_edge"))
    raise ValueError(f"cannot read an output size from {type(processor).__name__}; pass input_size=...")


def _hf_transform(processor, train: bool, size: tuple[int, int] | None) -> ImageTransform:
    from torchvision import transforms as T

    mean = list(getattr(processor, "image_mean", None) or (0.5, 0.5, 0.5))
    std = list(getattr(processor, "image_std", None) or (0.5, 0.5, 0.5))
    out_h, out_w = _processor_size(processor, size)
    name = type(processor).__name__
    if train:
        steps = [T.RandomResizedCrop((out_h, out_w)), T.RandomHorizontalFlip(), T.ToTensor()]
        if getattr(processor, "do_normalize", True):
            steps.append(T.Normalize(mean=mean, std=std))
        pipeline = T.Compose(steps)
        return ImageTransform(pipeline, f"hf {name} train {pipeline!r}")

    kwargs: dict[str, Any] = {}
    if size is not None:  # same size convention as the processor's own config
        spec = getattr(processor, "size", None)
        shortest = spec.get("shortest_edge") if isinstance(spec, Mapping) else getattr(spec, "shortest_edge", None)
        kwargs["size"] = {"shortest_edge": size[0]} if shortest else {"height": size[0], "width": size[1]}
        if getattr(processor, "do_center_crop", False):
            kwargs["crop_size"] = {"height": size[0], "width": size[1]}

    def run(image) -> torch.Tensor:
        return processor(images=[image], return_tensors="pt", **kwargs)["pixel_values"][0]

    config = processor.to_json_string() if hasattr(processor, "to_json_string") else repr(processor)
    return ImageTransform(run, f"hf {name} eval {sorted(kwargs.items())} {config}")


def build_transform(source, train: bool = False, input_size: int | tuple[int, ...] | None = None) -> ImageTransform:
    """Per-image transform for ``source``: a timm model, a timm ``pretrained_cfg`` / data-config dict, or a
    Hugging Face image processor. ``input_size`` (int, (H, W) or (C, H, W)) overrides the resolution."""
    size = _size_hw(input_size)
    if _is_hf_processor(source):
        return _hf_transform(source, train, size)
    if isinstance(source, torch.nn.Module):
        if not hasattr(source, "pretrained_cfg"):
            raise TypeError("a model source must be a timm model (with .pretrained_cfg); pass its data config instead")
        return _timm_transform(source, train, size)
    if isinstance(source, Mapping):
        return _timm_transform(source, train, size)
    raise TypeError(
        f"cannot build a transform from {type(source).__name__}; pass a timm model, a pretrained_cfg / data-config "
        "dict, or a transformers image processor"
    )


def resolve_image_column(ds, image_column: str | None = None) -> str:
    """The ``datasets.Image`` column: the named one (checked), or the only one."""
    from datasets import Image

    features = ds.features
    if image_column is None:
        found = [name for name, feat in features.items() if isinstance(feat, Image)]
        if len(found) == 1:
            return found[0]
        if not found:
            raise ValueError(f"no Image column in the dataset (columns: {list(features)}); pass image_column=...")
        raise ValueError(f"several Image columns {found}; pass image_column=...")
    if image_column not in features:
        raise ValueError(f"image column {image_column!r} not in the dataset (columns: {list(features)})")
    if not isinstance(features[image_column], Image):
        raise TypeError(f"column {image_column!r} is not an image column (feature {features[image_column]!r})")
    return image_column


def batch_transform(
    transform: Callable[[Any], torch.Tensor],
    image_column: str = "image",
    label_column: str | None = "label",
    rgb: bool = True,
) -> Callable[[dict], dict]:
    """The function for ``Dataset.with_transform``: a batch ``{image_column: [...], label_column: [...]}``
    becomes ``{"pixel_values": [tensor, ...], "labels": [int, ...]}`` (no ``labels`` when ``label_column`` is
    None). Other columns are dropped, so the default collate stacks the result directly. ``rgb`` converts
    every image to RGB before ``transform`` (set False for a model that really takes one channel)."""

    def apply(batch: dict) -> dict:
        images = [decode_image(im) for im in batch[image_column]]
        out = {"pixel_values": [transform(_to_rgb(im) if rgb else im) for im in images]}
        if label_column is not None:
            out["labels"] = [int(label) for label in batch[label_column]]
        return out

    return apply


def apply_transform(
    ds,
    transform_or_source,
    train: bool = False,
    image_column: str | None = None,
    label_column: str | None = None,
    input_size: int | tuple[int, ...] | None = None,
    rgb: bool = True,
):
    """Return ``ds.with_transform(...)`` producing ``pixel_values`` / ``labels``.

    ``transform_or_source`` is a ready callable (an :class:`ImageTransform` or any PIL -> tensor callable) or a
    source for :func:`build_transform`. The label column defaults to the only ``ClassLabel`` column, and is
    omitted when there is none (unlabelled data).
    """
    from datasets import ClassLabel, Value

    from .longtail import resolve_label_column

    image_column = resolve_image_column(ds, image_column)
    if label_column is None:
        has_classlabel = any(isinstance(f, ClassLabel) for f in ds.features.values())
        label_column = resolve_label_column(ds) if has_classlabel else None
    else:
        label_column = resolve_label_column(ds, label_column)
        feat = ds.features[label_column]
        if isinstance(feat, Value) and feat.dtype in ("string", "large_string"):
            raise TypeError(f"label column {label_column!r} holds strings; encode it with class_encode_column first")

    is_source = (
        isinstance(transform_or_source, Mapping)
        or _is_hf_processor(transform_or_source)
        or (isinstance(transform_or_source, torch.nn.Module) and hasattr(transform_or_source, "pretrained_cfg"))
    )  # torchvision v2 transforms are nn.Modules too: those are ready callables
    if is_source:
        transform = build_transform(transform_or_source, train=train, input_size=input_size)
    elif callable(transform_or_source):
        if input_size is not None:
            raise ValueError("input_size applies only when building the transform from a model / config / processor")
        transform = transform_or_source
    else:
        raise TypeError(f"expected a transform callable or a model/config/processor, got {type(transform_or_source)}")
    # images are decoded in batch_transform (decode_image), so an unreadable file is reported by name
    return _undecoded(ds, image_column).with_transform(batch_transform(transform, image_column, label_column, rgb=rgb))
