"""A tiny, learnable ADE20K in the exact ADEChallengeData2016 layout, for tests, demos and smoke runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from internvit.data.ade20k import LAYOUT_DIR
from internvit.errors import InternViTError

# one well-separated colour per used class (the signal a segmentation head can learn); raw 0 ("other") is grey
CLASS_COLOURS: tuple[tuple[int, int, int], ...] = ((220, 40, 40), (40, 180, 60), (40, 70, 220), (230, 210, 40))
OTHER_COLOUR = (128, 128, 128)


def used_classes(num_classes: int = 150) -> list[int]:
    """The raw label values (1..num_classes) the mini dataset paints, spread over the label range."""
    count = min(len(CLASS_COLOURS), num_classes)
    return [1 + (i * num_classes) // count for i in range(count)]


def _draw_label(rng: np.random.Generator, size: tuple[int, int], classes: list[int]) -> np.ndarray:
    """A raw label map: a background class, 2-3 shapes of other classes, and a strip of raw 0 ('other')."""
    width, height = size
    order = [int(c) for c in rng.permutation(classes)]
    label = Image.new("L", size, order[0])
    draw = ImageDraw.Draw(label)
    for cls in order[1 : 2 + int(rng.integers(1, 3))]:
        w, h = int(rng.integers(width // 4, width // 2)), int(rng.integers(height // 4, height // 2))
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + w, y + h], fill=cls)
    band = int(rng.integers(2, max(3, height // 8)))
    top = int(rng.integers(0, height - band))
    draw.rectangle([0, top, int(rng.integers(width // 4, width)), top + band], fill=0)
    return np.array(label)


def _paint(rng: np.random.Generator, label: np.ndarray, classes: list[int]) -> Image.Image:
    """The image: each pixel the colour of its class (grey for raw 0), plus noise."""
    lut = np.tile(np.array(OTHER_COLOUR, dtype=np.float32), (256, 1))
    for cls, colour in zip(classes, CLASS_COLOURS, strict=False):
        lut[cls] = colour
    pixels = lut[label] + rng.normal(0.0, 10.0, size=(*label.shape, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_mini_ade20k(
    root: str | Path,
    *,
    num_train: int = 24,
    num_val: int = 6,
    size: tuple[int, int] = (84, 70),
    num_classes: int = 150,
    seed: int = 0,
) -> Path:
    """Write a small learnable ADE20K (JPEG images, raw 0..num_classes PNG labels) under root; return its folder.

    `size` is (width, height) as in PIL. Files follow the release: images/{training,validation}/ADE_{train,val}_
    %08d.jpg and annotations/.../*.png; ~4 classes with distinct colours, and some raw-0 pixels in every image.
    """
    if not 1 <= num_classes <= 150 or num_train < 1 or num_val < 1 or min(size) < 8:
        raise InternViTError(
            f"bad mini ADE20K settings (num_classes={num_classes}, num_train={num_train}, num_val={num_val}, "
            f"size={size})",
            fix="use 1..150 classes, at least one image per split and sides of at least 8 pixels",
        )
    folder = Path(root) / LAYOUT_DIR
    rng = np.random.default_rng(seed)
    classes = used_classes(num_classes)
    for split, prefix, count in (("training", "train", num_train), ("validation", "val", num_val)):
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        (folder / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for n in range(1, count + 1):
            name = f"ADE_{prefix}_{n:08d}"
            label = _draw_label(rng, size, classes)
            _paint(rng, label, classes).save(
                folder / "images" / split / f"{name}.jpg", format="JPEG", quality=95, subsampling=0
            )
            Image.fromarray(label).save(folder / "annotations" / split / f"{name}.png")
    return folder


MINI_FOLDER_CLASSES = ("background", "red thing", "green thing", "blue thing", "yellow thing")


def make_mini_segfolder(
    root: str | Path,
    *,
    num_train: int = 16,
    num_val: int = 4,
    size: tuple[int, int] = (84, 70),
    seed: int = 0,
) -> Path:
    """A small learnable dataset in the generic segmentation layout: 5 classes, labels 0..4 as they are (no
    reduce_zero_label), a corner of ignored (255) pixels, PNG images, and a classes.txt with a palette.

    images/{train,val}/img_%03d.png, annotations/{train,val}/img_%03d.png; returns `root`.
    """
    folder = Path(root)
    rng = np.random.default_rng(seed)
    colours = [OTHER_COLOUR, *CLASS_COLOURS]
    lines = [f"{name} #{r:02x}{g:02x}{b:02x}" for name, (r, g, b) in zip(MINI_FOLDER_CLASSES, colours, strict=True)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classes.txt").write_text("# name #rrggbb, in class-index order\n" + "\n".join(lines) + "\n")
    for split, count in (("train", num_train), ("val", num_val)):
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        (folder / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for n in range(count):
            label = _draw_label(rng, size, [1, 2, 3, 4])  # raw 0 (the grey strip) is class 0, "background"
            image = _paint(rng, label, [1, 2, 3, 4])
            label[:3, :3] = 255  # ignored
            image.save(folder / "images" / split / f"img_{n:03d}.png")
            Image.fromarray(label).save(folder / "annotations" / split / f"img_{n:03d}.png")
    return folder
