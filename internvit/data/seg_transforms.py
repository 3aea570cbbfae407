"""The segmentation training and test pipelines of mmseg 0.30 (docs/protocol.md §5.2, §5.3), on OpenCV as the original.

Images are uint8 BGR HWC arrays as `cv2.imdecode` gives them (mmcv's loader), and every step calls the OpenCV
function mmcv calls (`cv2.resize` INTER_LINEAR / INTER_NEAREST, `cv2.cvtColor` BGR<->HSV, flips);
PhotoMetricDistortion's brightness/contrast arithmetic is mmseg's own numpy float32 code (evaluated once per uint8
level and applied with `cv2.LUT`: the same values, a table lookup per pixel). Each random step takes an
explicit numpy Generator and draws in the same order and from the same distributions as mmseg (its global legacy
`np.random` maps to `rng.random/integers/uniform`); the random streams themselves differ.

The pipelines stop at uint8: they return an RGB CHW uint8 image (padded with 0 in training, with its valid size) and
a uint8 label (uint16 for datasets of more than 255 classes), and `normalize_images` finishes on the device with
mmcv.imnormalize's exact arithmetic (float32 subtract, float64 multiply), so workers move a quarter of the bytes and
do none of the float work. `normalize` is the same arithmetic on a numpy HWC array.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

IGNORE_INDEX = 255
SEG_MEAN = (123.675, 116.28, 103.53)  # RGB, as mmseg's img_norm_cfg (to_rgb=True on BGR input)
SEG_STD = (58.395, 57.12, 57.375)


# ----------------------------------------------------------------------------------------------- resizing


def keep_ratio_size(height: int, width: int, scale: Sequence[float]) -> tuple[int, int]:
    """mmcv.rescale_size: factor min(long/long_side, short/short_side), sides int(x*s + 0.5); returns (h, w)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * float(factor) + 0.5), int(width * float(factor) + 0.5)


def resize_bilinear(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """cv2.resize(INTER_LINEAR) of a uint8 HW or HWC image to size (h, w), as mmcv.imresize."""
    height, width = int(size[0]), int(size[1])
    if (height, width) == img.shape[:2]:
        return img.copy()
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)


def resize_nearest(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """cv2.resize(INTER_NEAREST) of a label map to size (h, w), as mmcv.imresize for segmentation maps."""
    height, width = int(size[0]), int(size[1])
    if (height, width) == label.shape[:2]:
        return label.copy()
    return cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST)


def resize_to_multiple(img: np.ndarray, multiple: int = 14) -> np.ndarray:
    """mmseg ResizeToMultiple: bilinear stretch of each side up to the next multiple (unchanged if already one)."""
    height, width = img.shape[:2]
    return resize_bilinear(img, (-(-height // multiple) * multiple, -(-width // multiple) * multiple))


# ----------------------------------------------------------------------------------------------- training steps


def resize_ratio_range(
    img: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    img_scale: tuple[int, int] = (2016, 504),
    ratio_range: tuple[float, float] = (0.5, 2.0),
) -> tuple[np.ndarray, np.ndarray]:
    """§5.2 step 2: r ~ U[lo, hi), target (int(L r), int(S r)), keep-ratio size; image bilinear, label nearest."""
    ratio = rng.random() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
    target = (int(img_scale[0] * ratio), int(img_scale[1] * ratio))
    size = keep_ratio_size(img.shape[0], img.shape[1], target)
    return resize_bilinear(img, size), resize_nearest(label, size)


def _crop_box(shape: tuple[int, ...], crop: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
    """mmseg RandomCrop.get_crop_bbox offsets (y, x), uniform over the valid range (0 where the side is short)."""
    offset_y = int(rng.integers(0, max(shape[0] - crop[0], 0) + 1))
    offset_x = int(rng.integers(0, max(shape[1] - crop[1], 0) + 1))
    return offset_y, offset_x


def _accepted(label_crop: np.ndarray, ignore_index: int, cat_max_ratio: float) -> bool:
    """mmseg's rule: more than one non-ignored class, the largest one under cat_max_ratio of the non-ignored pixels.

    np.unique in mmseg; a histogram gives the same counts without sorting the crop (cv2.calcHist on uint8 labels:
    float32 counts, exact below 2**24 pixels).
    """
    if label_crop.dtype == np.uint8 and label_crop.size < (1 << 24):
        counts = cv2.calcHist([np.ascontiguousarray(label_crop)], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    else:
        counts = np.bincount(label_crop.ravel())
    if ignore_index < len(counts):
        counts[ignore_index] = 0
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def random_crop_cat_max(
    img: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    crop: tuple[int, int] = (504, 504),
    cat_max_ratio: float = 0.75,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[np.ndarray, np.ndarray]:
    """§5.2 step 3: accept the first crop with >1 non-ignored class, the largest < cat_max_ratio; else the 11th draw."""
    y, x = _crop_box(img.shape, crop, rng)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            if _accepted(label[y : y + crop[0], x : x + crop[1]], ignore_index, cat_max_ratio):
                break
            y, x = _crop_box(img.shape, crop, rng)
    return img[y : y + crop[0], x : x + crop[1]], label[y : y + crop[0], x : x + crop[1]]


def random_flip(
    img: np.ndarray, label: np.ndarray, rng: np.random.Generator, prob: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """§5.2 step 4: flip image and label left-right together when rng.random() < prob (cv2.flip, as mmcv)."""
    if rng.random() < prob:
        return cv2.flip(img, 1), cv2.flip(label, 1)
    return img, label


def bgr_to_hsv(img: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(COLOR_BGR2HSV) on uint8: H in [0, 180), S and V in [0, 255]."""
    return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGR2HSV)


def hsv_to_bgr(hsv: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(COLOR_HSV2BGR) on a uint8 HWC image (H in [0, 180))."""
    return cv2.cvtColor(np.ascontiguousarray(hsv), cv2.COLOR_HSV2BGR)


_LEVELS = np.arange(256, dtype=np.uint8)


def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg PhotoMetricDistortion.convert: float32 img * alpha + beta, clipped to [0, 255], truncated to uint8.

    The arithmetic is elementwise on uint8, so it is computed once per level (exactly as mmseg computes it) and
    applied as a lookup table.
    """
    lut = _LEVELS.astype(np.float32)
    lut *= np.float32(alpha)
    lut += np.float32(beta)
    np.clip(lut, 0, 255, out=lut)
    return cv2.LUT(img, lut.astype(np.uint8))


def _contrast(img: np.ndarray, rng: np.random.Generator, contrast_range: tuple[float, float]) -> np.ndarray:
    if rng.integers(2):
        return _convert(img, alpha=rng.uniform(contrast_range[0], contrast_range[1]))
    return img


def photometric_distortion(
    img: np.ndarray,
    rng: np.random.Generator,
    brightness_delta: int = 32,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> np.ndarray:
    """§5.2 step 5 on a uint8 BGR image: brightness, contrast if mode 1, saturation, hue, contrast if mode 0."""
    if rng.integers(2):
        img = _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    mode = rng.integers(2)
    if mode == 1:
        img = _contrast(img, rng, contrast_range)
    if rng.integers(2):  # saturation
        hsv = bgr_to_hsv(img)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(saturation_range[0], saturation_range[1]))
        img = hsv_to_bgr(hsv)
    if rng.integers(2):  # hue: numpy randint(-d, d) excludes d
        hsv = bgr_to_hsv(img)
        shift = ((_LEVELS.astype(np.int64) + int(rng.integers(-hue_delta, hue_delta))) % 180).astype(np.uint8)
        hsv[..., 0] = cv2.LUT(hsv[..., 0], shift)  # (h + delta) % 180, per level
        img = hsv_to_bgr(hsv)
    if mode == 0:
        img = _contrast(img, rng, contrast_range)
    return np.ascontiguousarray(img)


# ----------------------------------------------------------------------------------------------- normalize, pad


def normalize(img: np.ndarray, mean: Sequence[float] = SEG_MEAN, std: Sequence[float] = SEG_STD) -> np.ndarray:
    """(img - mean) * (1/std) per channel of an HWC array, as mmcv.imnormalize: float32 subtract, float64 multiply."""
    mean32 = np.asarray(mean, dtype=np.float32)
    stdinv = 1.0 / np.asarray(std, dtype=np.float32).astype(np.float64)
    return ((img.astype(np.float32) - mean32).astype(np.float64) * stdinv).astype(np.float32)


def normalize_images(
    img_BCHW: torch.Tensor,
    valid_sizes: torch.Tensor | None = None,
    mean: Sequence[float] = SEG_MEAN,
    std: Sequence[float] = SEG_STD,
) -> torch.Tensor:
    """`normalize` of uint8 RGB batches on their device (bit-identical: IEEE float32 and float64 are exact everywhere).

    With `valid_sizes` (B, 2) of (h, w), the padding beyond each image is set to 0 afterwards, as mmseg pads the
    normalised image with 0 (§5.2 step 7).
    """
    device = img_BCHW.device
    mean32 = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    stdinv = (1.0 / torch.tensor(std, dtype=torch.float32).double()).to(device).view(1, -1, 1, 1)
    out = ((img_BCHW.float() - mean32).double() * stdinv).float()
    if valid_sizes is not None:
        rows = torch.arange(out.shape[-2], device=device)
        cols = torch.arange(out.shape[-1], device=device)
        sizes = valid_sizes.to(device)
        inside = (rows[None, :, None] < sizes[:, 0, None, None]) & (cols[None, None, :] < sizes[:, 1, None, None])
        out = out * inside[:, None]
    return out


def pad_to(
    img: np.ndarray, label: np.ndarray, size: tuple[int, int], img_value: float = 0, label_value: int = IGNORE_INDEX
) -> tuple[np.ndarray, np.ndarray]:
    """§5.2 step 7: pad image and label at the bottom/right to size (h, w) with the given values."""
    height, width = img.shape[:2]
    if height > size[0] or width > size[1] or label.shape[:2] != (height, width):
        raise ValueError(f"cannot pad image {img.shape[:2]} / label {label.shape[:2]} to {tuple(size)}")
    if (height, width) == tuple(size):
        return img, label
    out_img = np.full((size[0], size[1], *img.shape[2:]), img_value, dtype=img.dtype)
    out_img[:height, :width] = img
    out_label = np.full((size[0], size[1]), label_value, dtype=label.dtype)
    out_label[:height, :width] = label
    return out_img, out_label


def to_chw_rgb(img_bgr: np.ndarray) -> torch.Tensor:
    """uint8 BGR HWC -> uint8 RGB CHW tensor (mmseg's to_rgb, a channel flip; no float work)."""
    return torch.from_numpy(np.ascontiguousarray(img_bgr[..., ::-1].transpose(2, 0, 1)))


def label_tensor(label: np.ndarray) -> torch.Tensor:
    """A label map as a tensor of its own (uint8 / uint16 / int64) dtype; widened to int64 on the device."""
    label = np.ascontiguousarray(label)
    return torch.from_numpy(label.astype(np.int32) if label.dtype == np.uint16 else label)


# ----------------------------------------------------------------------------------------------- pipelines


class TrainPipeline:
    """§5.2 steps 2-7: ratio resize, cat-max crop, flip, photometric distortion, pad; normalize on the device.

    Returns (image uint8 RGB CHW, label, (h, w) of the image before padding). With `index`, the random draws come
    from a generator seeded by (seed, epoch, index), so augmentations do not depend on DataLoader workers; call
    `set_epoch` each epoch (it reaches workers re-created per epoch, not persistent ones). Without `index`, one
    sequential generator seeded by `seed` is used.
    """

    def __init__(
        self,
        crop: int = 504,
        seed: int = 0,
        *,
        img_scale: tuple[int, int] = (2016, 504),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.crop = (crop, crop)
        self.seed = seed
        self.epoch = 0
        self.img_scale = img_scale
        self.ratio_range = ratio_range
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index
        self._rng = np.random.default_rng(seed)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose per-sample augmentations `__call__(..., index=i)` draws."""
        self.epoch = epoch

    def rng_for(self, index: int | None) -> np.random.Generator:
        """The generator for one sample: per (seed, epoch, index), or the sequential one when index is None."""
        return self._rng if index is None else np.random.default_rng((self.seed, self.epoch, index))

    def augment(
        self, img: np.ndarray, label: np.ndarray, index: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """Steps 2-5 and the padding on a uint8 BGR image: (padded BGR HWC, padded label, valid (h, w))."""
        rng = self.rng_for(index)
        img, label = resize_ratio_range(img, label, rng, self.img_scale, self.ratio_range)
        img, label = random_crop_cat_max(img, label, rng, self.crop, self.cat_max_ratio, self.ignore_index)
        img, label = random_flip(img, label, rng)
        img = photometric_distortion(img, rng)
        size = (int(img.shape[0]), int(img.shape[1]))
        img, label = pad_to(img, label, self.crop, label_value=self.ignore_index)
        return img, label, size

    def __call__(
        self, img: np.ndarray, label: np.ndarray, index: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        img, label, size = self.augment(img, label, index)
        return to_chw_rgb(img), label_tensor(label), size


def setr_resize_to_multiple(
    img: np.ndarray, short: int = 504, multiple: int = 14
) -> tuple[np.ndarray, tuple[int, int]]:
    """§5.3 full-data test resize: SETR_Resize (short side exactly `short`, long uncapped), then ResizeToMultiple."""
    height, width = img.shape[:2]
    # SETR_Resize builds the target (short*h/w, short) or (short, short*w/h), then mmcv.imrescale to it
    target = (short * height / width, short) if height > width else (short, short * width / height)
    resized = resize_bilinear(img, keep_ratio_size(height, width, target))
    return resize_to_multiple(resized, multiple), (height, width)


def resize_keep_ratio_to_multiple(
    img: np.ndarray, scale: tuple[int, int] = (2016, 504), multiple: int = 14
) -> tuple[np.ndarray, tuple[int, int]]:
    """§5.3 few-shot test resize: mmseg Resize(keep_ratio) to `scale` (long side capped), then ResizeToMultiple."""
    height, width = img.shape[:2]
    resized = resize_bilinear(img, keep_ratio_size(height, width, scale))
    return resize_to_multiple(resized, multiple), (height, width)


class TestPipeline:
    """§5.3: resize ('setr' for full-data configs, 'keep_ratio' for few-shot ones) at each scale; label kept as is.

    `scales` are mmseg MultiScaleFlipAug's img_ratios: 'keep_ratio' resizes to (int(L r), int(S r)); 'setr'
    (SETR_Resize with setr_multi_scale) makes the short side max(int(short r), crop), i.e. ratios below 1 do not
    shrink the image below the training crop. One scale gives a tensor, several a tuple of tensors (uint8 RGB CHW).
    """

    __test__ = False  # not a pytest class

    def __init__(
        self,
        mode: str = "setr",
        *,
        short: int = 504,
        scale: tuple[int, int] = (2016, 504),
        multiple: int = 14,
        scales: Sequence[float] = (1.0,),
        crop: int | None = None,
    ) -> None:
        if mode not in ("setr", "keep_ratio"):
            raise ValueError(f"unknown test resize mode {mode!r}; use 'setr' or 'keep_ratio'")
        if not scales or min(scales) <= 0:
            raise ValueError(f"test scales must be positive, got {list(scales)}")
        self.mode, self.short, self.scale, self.multiple = mode, short, scale, multiple
        self.scales, self.crop = tuple(float(s) for s in scales), crop

    def resize(self, img: np.ndarray, ratio: float = 1.0) -> np.ndarray:
        """The test resize of a uint8 image at one ratio (see the class docstring)."""
        if self.mode == "setr":
            short = int(self.short * ratio) if ratio != 1.0 else self.short
            if ratio != 1.0 and self.crop is not None:
                short = max(short, self.crop)
            return setr_resize_to_multiple(img, short, self.multiple)[0]
        scale = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        return resize_keep_ratio_to_multiple(img, scale, self.multiple)[0]

    def __call__(
        self, img: np.ndarray, label: np.ndarray, index: int | None = None
    ) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor]:
        """Resized uint8 RGB CHW image(s) from a BGR image; the label stays at the original size for scoring."""
        images = tuple(to_chw_rgb(self.resize(img, ratio)) for ratio in self.scales)
        return (images[0] if len(images) == 1 else images), label_tensor(label)
