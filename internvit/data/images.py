"""Decoding one image file, with an error that names the file."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from internvit.errors import InternViTError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _missing(path: Path) -> InternViTError:
    if path.is_symlink():
        return InternViTError(
            f"image {path} is a symbolic link that leads nowhere (broken, or a loop)", fix="repair or remove the link"
        )
    return InternViTError(f"no such image file: {path}", fix="check the path")


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with images of more than 8 bits per sample scaled to 8 (value / 256, as OpenCV converts 16-bit images)
    rather than clipped, which is what Pillow's convert does to them."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        deep = np.asarray(img, dtype=np.int64)
        return Image.fromarray((np.clip(deep, 0, 65535) >> 8).astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "F":  # floating-point samples: taken as [0, 1]
        flat = np.clip(np.asarray(img, dtype=np.float64) * 255.0 + 0.5, 0, 255)
        return Image.fromarray(flat.astype(np.uint8), mode="L").convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Path, *, exif: bool = False) -> Image.Image:
    """Open and fully decode an image as RGB (decoding now, so a truncated file fails here, naming the file).

    `exif=True` applies the EXIF orientation (single-image inference: the picture as its viewer shows it); the
    datasets of the protocols leave it off, as torchvision's and timm's loaders do. 16-bit images are scaled to 8
    bits; an image past Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`) is refused by name.
    """
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    try:
        with Image.open(path) as img:
            return _to_rgb(ImageOps.exif_transpose(img) if exif else img)
    except Image.DecompressionBombError as e:
        raise InternViTError(
            f"image {path} is larger than Pillow's decompression-bomb limit ({e})",
            fix="if the image is genuine, raise PIL.Image.MAX_IMAGE_PIXELS; otherwise remove it",
        ) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InternViTError(f"cannot decode image {path} ({e})", fix="the file is corrupt or not an image") from e


def read_image_bgr(path: str | Path) -> np.ndarray:
    """Decode an image as uint8 BGR HWC with OpenCV, as mmcv's loader (`imfrombytes`, flag 'color'): grey and
    16-bit images become 8-bit BGR, alpha is dropped, the EXIF orientation is applied."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise InternViTError(f"cannot read image {path} ({e.strerror or e})", fix="check the path") from e
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise InternViTError(f"cannot decode image {path}", fix="the file is corrupt or not an image")
    return image


def expand_image_inputs(inputs: list[str]) -> list[Path]:
    """Image files from files and folders (a folder: its images, recursively, sorted), each file once, checked
    before any model loads: the error lists every missing path."""
    paths: list[Path] = []
    missing: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise InternViTError(f"no images in folder {path}", fix=f"use a folder of {', '.join(IMAGE_SUFFIXES)}")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            missing.append(str(path))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InternViTError(f"no such image file or folder: {', '.join(missing[:5])}{more}", fix="check the paths")
    seen: set[Path] = set()
    unique = []
    for path in paths:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    return unique
