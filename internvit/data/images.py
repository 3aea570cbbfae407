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


def check_image_paths(paths: list[str]) -> None:
    """Every input image exists (checked before any model loads); the error lists the missing ones."""
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InternViTError(f"no such image file: {', '.join(missing[:5])}{more}", fix="check the paths")
