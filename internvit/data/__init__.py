"""Image decoding, transforms, and the ImageNet-family datasets in the layouts users really have."""

from internvit.data.imagenet import (
    DATASET_NAMES,
    ImageNetAR,
    ImageNetSketch,
    ImageNetSplit,
    ImageNetV2,
    build_dataset,
    collate_skip_none,
)
from internvit.data.imagenet_meta import load_real_labels, load_wnids
from internvit.data.images import load_image
from internvit.data.transforms import build_eval_transform, build_train_transform, normalize_images

__all__ = [
    "DATASET_NAMES",
    "ImageNetAR",
    "ImageNetSketch",
    "ImageNetSplit",
    "ImageNetV2",
    "build_dataset",
    "build_eval_transform",
    "build_train_transform",
    "normalize_images",
    "collate_skip_none",
    "load_image",
    "load_real_labels",
    "load_wnids",
]
