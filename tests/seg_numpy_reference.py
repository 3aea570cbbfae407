"""The ADE20K training and test pipelines of mmseg 0.30 (docs/protocol.md §5.2, §5.3) on numpy uint8 RGB images.

Each random step takes an explicit numpy Generator and draws in the same order and from the same distributions
as mmseg (its global legacy `np.random` maps to `rng.random/integers/uniform`); the random streams themselves
differ. Images are RGB (we decode with PIL) while the original works in BGR: every op here is channel-symmetric
except HSV, which goes through BGR so that results equal theirs on the same pixels.

OpenCV is not required; where the original calls it, we re-implement its exact integer/float32 arithmetic:
`resize_bilinear` = cv2.INTER_LINEAR on uint8 (11-bit fixed-point weights, its vertical rounding, no antialias),
`resize_nearest` = cv2.INTER_NEAREST's index rule, `bgr_to_hsv` = COLOR_BGR2HSV (integer tables, H in [0, 180)),
`hsv_to_bgr` = COLOR_HSV2BGR (float32 with a fused multiply-add; rows converted in 32-pixel SIMD blocks that
truncate, the row's tail rounded), `normalize` = mmcv.imnormalize. Checked bit-exact against opencv-python-headless
4.10 on x86-64/AVX2: random sizes, every BGR colour, every HSV triple, and the whole training pipeline against a
cv2 re-typing of mmseg's, given the same random draws. An OpenCV build with another SIMD width (SSE4.1-only x86,
ARM NEON: 16-pixel blocks) or without FMA differs by one level at some pixels after an HSV step. JPEG decoding
(PIL vs cv2's libjpeg) may also differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

IGNORE_INDEX = 255
SEG_MEAN = (123.675, 116.28, 103.53)  # RGB, as mmseg's img_norm_cfg (to_rgb=True on BGR input)
SEG_STD = (58.395, 57.12, 57.375)

_COEF_BITS = 11  # cv2 INTER_RESIZE_COEF_BITS
_HSV_SHIFT = 12
# cv2's RGB2HSV_b tables: saturate_cast<int> rounds to nearest (no ties occur for these quotients)
_SDIV = np.array([0] + [round((255 << _HSV_SHIFT) / i) for i in range(1, 256)], dtype=np.int64)
_HDIV180 = np.array([0] + [round((180 << _HSV_SHIFT) / (6.0 * i)) for i in range(1, 256)], dtype=np.int64)
# cv2's HSV2BGR on uint8 converts each row in SIMD blocks of 4 vectors of float32 lanes: 32 pixels with the AVX2
# dispatch of x86-64 opencv-python wheels (16 on SSE4.1-only or ARM NEON machines), which truncate to uint8
CV_HSV_SIMD_BLOCK = 32
# HSV2RGB sector -> indices into (v, v(1-s), v(1-sh), v(1-s(1-h))) for b, g, r
_SECTORS = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])


# ----------------------------------------------------------------------------------------------- resizing


def keep_ratio_size(height: int, width: int, scale: Sequence[float]) -> tuple[int, int]:
    """mmcv.rescale_size: factor min(long/long_side, short/short_side), sides int(x*s + 0.5); returns (h, w)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * float(factor) + 0.5), int(width * float(factor) + 0.5)


def _linear_taps(src: int, dst: int, clamp_weights: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """cv2 INTER_LINEAR source taps and 11-bit weights along one axis (half-pixel centres, float32 positions)."""
    pos = ((np.arange(dst) + 0.5) * (src / dst) - 0.5).astype(np.float32)
    lo = np.floor(pos).astype(np.int64)
    frac = (pos - lo).astype(np.float32)
    if clamp_weights:  # cv2 clamps x taps (weight 1 on the edge pixel); y taps keep their weights on clamped rows
        edge = (lo < 0) | (lo >= src - 1)
        frac[edge] = 0
        lo = np.where(lo < 0, 0, np.where(lo >= src - 1, src - 1, lo))
    w1 = np.rint(frac * (1 << _COEF_BITS)).astype(np.int32)
    w0 = np.rint((np.float32(1) - frac) * (1 << _COEF_BITS)).astype(np.int32)
    return np.clip(lo, 0, src - 1), np.clip(lo + 1, 0, src - 1), w0, w1


def resize_bilinear(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a uint8 HW or HWC image to size (h, w) exactly as cv2.resize(INTER_LINEAR) (fixed-point, no antialias)."""
    if img.dtype != np.uint8:
        raise TypeError(f"resize_bilinear expects uint8, got {img.dtype}")
    height, width = int(size[0]), int(size[1])
    if (height, width) == img.shape[:2]:
        return img.copy()
    src = img.astype(np.int32) if img.ndim == 3 else img.astype(np.int32)[..., None]
    x0, x1, a0, a1 = _linear_taps(src.shape[1], width, clamp_weights=True)
    y0, y1, b0, b1 = _linear_taps(src.shape[0], height, clamp_weights=False)
    rows = src[:, x0] * a0[None, :, None]
    rows += src[:, x1] * a1[None, :, None]
    rows >>= 4  # cv2's VResizeLinear<uchar>: ((b0*(S0>>4))>>16 + (b1*(S1>>4))>>16 + 2) >> 2
    out = rows[y0]
    out *= b0[:, None, None]
    out >>= 16
    lower = rows[y1]
    lower *= b1[:, None, None]
    lower >>= 16
    out += lower
    out += 2
    out >>= 2
    out = np.clip(out, 0, 255).astype(np.uint8)
    return out if img.ndim == 3 else out[..., 0]


def _nearest_taps(src: int, dst: int) -> np.ndarray:
    """cv2 INTER_NEAREST source indices: min(floor(d * (1 / (dst / src))), src - 1), in float64 as cv2."""
    return np.minimum(np.floor(np.arange(dst) * (1.0 / (dst / src))).astype(np.int64), src - 1)


def resize_nearest(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a label map to size (h, w) exactly as cv2.resize(INTER_NEAREST) (no half-pixel offset)."""
    rows = _nearest_taps(label.shape[0], int(size[0]))
    cols = _nearest_taps(label.shape[1], int(size[1]))
    return label[rows[:, None], cols[None, :]]


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
            values, counts = np.unique(label[y : y + crop[0], x : x + crop[1]], return_counts=True)
            counts = counts[values != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            y, x = _crop_box(img.shape, crop, rng)
    return img[y : y + crop[0], x : x + crop[1]], label[y : y + crop[0], x : x + crop[1]]


def random_flip(
    img: np.ndarray, label: np.ndarray, rng: np.random.Generator, prob: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """§5.2 step 4: flip image and label left-right together when rng.random() < prob."""
    if rng.random() < prob:
        return img[:, ::-1].copy(), label[:, ::-1].copy()
    return img, label


def bgr_to_hsv(img: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(COLOR_BGR2HSV) on uint8: H in [0, 180), S and V in [0, 255], with cv2's integer rounding."""
    b, g, r = (img[..., k].astype(np.int64) for k in range(3))
    v = np.maximum(np.maximum(b, g), r)
    diff = v - np.minimum(np.minimum(b, g), r)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SDIV[v] + half) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV180[diff] + half) >> _HSV_SHIFT
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], axis=-1).astype(np.uint8)


def hsv_to_bgr(hsv: np.ndarray, simd_block: int = CV_HSV_SIMD_BLOCK) -> np.ndarray:
    """cv2.cvtColor(COLOR_HSV2BGR) on a uint8 HWC image (H in [0, 180)), float32 arithmetic as cv2 computes it.

    cv2 converts each row in SIMD blocks of `simd_block` pixels that truncate to uint8, and the row's remaining
    pixels with scalar code that rounds half-to-even; simd_block=0 gives the scalar rule everywhere.
    """
    h = hsv[..., 0].astype(np.float32) * (np.float32(6.0) / np.float32(180.0))
    s = hsv[..., 1].astype(np.float32) * np.float32(1.0 / 255.0)
    v = hsv[..., 2].astype(np.float32) * np.float32(1.0 / 255.0)
    h = np.fmod(h, np.float32(6.0))
    sector = np.floor(h).astype(np.int64)
    h = h - sector.astype(np.float32)
    bad = (sector < 0) | (sector >= 6)
    sector, h = np.where(bad, 0, sector), np.where(bad, np.float32(0), h)
    one = np.float32(1.0)
    # cv2's SIMD path fuses `1 - s*h` into one FMA (single rounding): emulate it with an exact float64 product
    fused_h = (1.0 - s.astype(np.float64) * h).astype(np.float32)
    fused_1h = (1.0 - s.astype(np.float64) * (one - h)).astype(np.float32)
    tab = np.stack([v, v * (one - s), v * fused_h, v * fused_1h], axis=-1)
    bgr = np.take_along_axis(tab, _SECTORS[sector], axis=-1) * np.float32(255.0)
    simd = np.arange(hsv.shape[-2]) < (hsv.shape[-2] // simd_block * simd_block if simd_block else 0)
    bgr = np.where(simd[:, None], np.trunc(bgr), np.rint(bgr))
    return np.clip(bgr, 0, 255).astype(np.uint8)


def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg PhotoMetricDistortion.convert: float32 img * alpha + beta, clipped to [0, 255], truncated to uint8."""
    return np.clip(img.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(np.uint8)


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
    """§5.2 step 5 on a uint8 RGB image: brightness, contrast if mode 1, saturation, hue, contrast if mode 0."""
    if rng.integers(2):
        img = _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    mode = rng.integers(2)
    if mode == 1:
        img = _contrast(img, rng, contrast_range)
    if rng.integers(2):  # saturation, in OpenCV's HSV of the BGR pixels
        hsv = bgr_to_hsv(img[..., ::-1])
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(saturation_range[0], saturation_range[1]))
        img = hsv_to_bgr(hsv)[..., ::-1]
    if rng.integers(2):  # hue: numpy randint(-d, d) excludes d
        hsv = bgr_to_hsv(img[..., ::-1])
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + int(rng.integers(-hue_delta, hue_delta))) % 180
        img = hsv_to_bgr(hsv)[..., ::-1]
    if mode == 0:
        img = _contrast(img, rng, contrast_range)
    return np.ascontiguousarray(img)


def normalize(img: np.ndarray, mean: Sequence[float] = SEG_MEAN, std: Sequence[float] = SEG_STD) -> np.ndarray:
    """(img - mean) * (1/std) per RGB channel, as mmcv.imnormalize: float32 subtract, multiply in float64."""
    mean32 = np.asarray(mean, dtype=np.float32)
    stdinv = 1.0 / np.asarray(std, dtype=np.float32).astype(np.float64)
    return ((img.astype(np.float32) - mean32).astype(np.float64) * stdinv).astype(np.float32)


def pad_to(
    img: np.ndarray, label: np.ndarray, size: tuple[int, int], img_value: float = 0, label_value: int = IGNORE_INDEX
) -> tuple[np.ndarray, np.ndarray]:
    """§5.2 step 7: pad image and label at the bottom/right to size (h, w) with the given values."""
    height, width = img.shape[:2]
    if height > size[0] or width > size[1] or label.shape[:2] != (height, width):
        raise ValueError(f"cannot pad image {img.shape[:2]} / label {label.shape[:2]} to {tuple(size)}")
    out_img = np.full((size[0], size[1], *img.shape[2:]), img_value, dtype=img.dtype)
    out_img[:height, :width] = img
    out_label = np.full((size[0], size[1]), label_value, dtype=label.dtype)
    out_label[:height, :width] = label
    return out_img, out_label


def to_tensors(img: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """HWC image -> float32 CHW tensor, HW label -> int64 tensor."""
    image = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()
    return image, torch.from_numpy(np.ascontiguousarray(label)).long()


# ----------------------------------------------------------------------------------------------- pipelines


class TrainPipeline:
    """§5.2 steps 2-8: ratio resize, cat-max crop, flip, photometric distortion, normalize, pad, to tensors.

    With `index`, the random draws come from a generator seeded by (seed, epoch, index), so augmentations do not
    depend on DataLoader workers; call `set_epoch` each epoch (it reaches workers re-created per epoch, not
    persistent ones). Without `index`, one sequential generator seeded by `seed` is used.
    """

    def __init__(
        self,
        crop: int = 504,
        seed: int = 0,
        *,
        img_scale: tuple[int, int] = (2016, 504),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
    ) -> None:
        self.crop = (crop, crop)
        self.seed = seed
        self.epoch = 0
        self.img_scale = img_scale
        self.ratio_range = ratio_range
        self.cat_max_ratio = cat_max_ratio
        self._rng = np.random.default_rng(seed)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose per-sample augmentations `__call__(..., index=i)` draws."""
        self.epoch = epoch

    def rng_for(self, index: int | None) -> np.random.Generator:
        """The generator for one sample: per (seed, epoch, index), or the sequential one when index is None."""
        return self._rng if index is None else np.random.default_rng((self.seed, self.epoch, index))

    def __call__(
        self, img: np.ndarray, label: np.ndarray, index: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a uint8 HWC RGB image and its reduced label into (float32 CHW, int64 HW) tensors."""
        rng = self.rng_for(index)
        img, label = resize_ratio_range(img, label, rng, self.img_scale, self.ratio_range)
        img, label = random_crop_cat_max(img, label, rng, self.crop, self.cat_max_ratio)
        img, label = random_flip(img, label, rng)
        img = photometric_distortion(img, rng)
        img, label = pad_to(normalize(img), label, self.crop)
        return to_tensors(img, label)


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
    """§5.3: resize ('setr' for full-data configs, 'keep_ratio' for few-shot ones), normalize; label kept as is."""

    __test__ = False  # not a pytest class

    def __init__(
        self, mode: str = "setr", *, short: int = 504, scale: tuple[int, int] = (2016, 504), multiple: int = 14
    ) -> None:
        if mode not in ("setr", "keep_ratio"):
            raise ValueError(f"unknown test resize mode {mode!r}; use 'setr' or 'keep_ratio'")
        self.mode, self.short, self.scale, self.multiple = mode, short, scale, multiple

    def __call__(
        self, img: np.ndarray, label: np.ndarray, index: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Resize and normalize the image (float32 CHW); the label stays at the original size for scoring."""
        if self.mode == "setr":
            img, _ = setr_resize_to_multiple(img, self.short, self.multiple)
        else:
            img, _ = resize_keep_ratio_to_multiple(img, self.scale, self.multiple)
        return to_tensors(normalize(img), label)
