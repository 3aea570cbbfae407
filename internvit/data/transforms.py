"""Image transforms of the classification protocol (docs/protocol.md §3.3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

from internvit.weights.tags import IMAGENET_MEAN, IMAGENET_STD


def build_eval_transform(
    img_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    normalize: bool = True,
) -> v2.Compose:
    """Bicubic (antialiased) resize of the shorter side to img_size, center crop (crop ratio 1.0), normalize.

    normalize=False stops at uint8 (3, H, W) tensors: a quarter of the bytes from the loader workers to the GPU and
    less work per worker; finish on the device with `normalize_images`, which gives bit-identical tensors.
    """
    steps = [
        # on PIL images, so that resizing is PIL's own bicubic filter, as in the original
        v2.Resize(img_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(img_size),
        v2.ToImage(),
    ]
    if normalize:
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    return v2.Compose(steps)


def normalize_images(
    images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> normalized fp32 on the images' device, with the same operations (in the same order)
    as ToDtype(scale=True) + Normalize, so the result is bit-identical to normalizing in the workers."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return images.to(torch.float32).mul_(1.0 / 255).sub_(mean_t).div_(std_t)


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
