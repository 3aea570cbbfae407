"""Image transforms of the classification protocol (REFERENCE §3.3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

from internvit.weights.tags import IMAGENET_MEAN, IMAGENET_STD


def build_eval_transform(
    img_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> v2.Compose:
    """Bicubic (antialiased) resize of the shorter side to img_size, center crop (crop ratio 1.0), normalize."""
    return v2.Compose(
        [
            # on PIL images, so that resizing is PIL's own bicubic filter, as in the original
            v2.Resize(img_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(img_size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def build_train_transform(
    img_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> v2.Compose:
    """RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, bicubic) + horizontal flip + normalize, on PIL images."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(
                img_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation=v2.InterpolationMode.BICUBIC
            ),
            v2.RandomHorizontalFlip(0.5),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )
