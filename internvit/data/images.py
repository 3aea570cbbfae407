"""Decoding one image file, with an error that names the file."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from internvit.errors import InternViTError


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image as RGB (decoding now, so a truncated file fails here, naming the file)."""
    path = Path(path)
    if not path.is_file():
        raise InternViTError(f"no such image file: {path}", fix="check the path")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InternViTError(f"cannot decode image {path} ({e})", fix="the file is corrupt or not an image") from e
