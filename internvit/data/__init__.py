"""Image decoding, transforms, the ImageNet-family datasets in the layouts users really have, and custom trees."""

from internvit.data.custom import CustomSplit, custom_classes, load_classes_file
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
    "CustomSplit",
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
    "custom_classes",
    "load_classes_file",
    "load_image",
    "load_real_labels",
    "load_wnids",
]
