"""A tiny, learnable ImageNet family in the real on-disk layouts (and a custom train/val tree), for tests and demos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from internvit.errors import InternViTError

# the first ten IN-1K classes (sorted-wnid indices 0..9), as in LOC_synset_mapping.txt
SYNSETS: tuple[tuple[str, str], ...] = (
    ("n01440764", "tench, Tinca tinca"),
    ("n01443537", "goldfish, Carassius auratus"),
    ("n01484850", "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias"),
    ("n01491361", "tiger shark, Galeocerdo cuvieri"),
    ("n01494475", "hammerhead, hammerhead shark"),
    ("n01496331", "electric ray, crampfish, numbfish, torpedo"),
    ("n01498041", "stingray"),
    ("n01514668", "cock"),
    ("n01514859", "hen"),
    ("n01518878", "ostrich, Struthio camelus"),
)
# one well-separated background colour per class: the signal a linear probe can learn
PALETTE: tuple[tuple[int, int, int], ...] = (
    (220, 40, 40),
    (40, 180, 60),
    (40, 70, 220),
    (230, 210, 40),
    (200, 50, 200),
    (40, 200, 210),
    (240, 130, 30),
    (110, 40, 160),
    (235, 235, 235),
    (25, 25, 25),
)


def _draw(rng: np.random.Generator, label: int, size: tuple[int, int], grey: float = 0.0) -> Image.Image:
    """Class colour plus noise, with a random distractor shape; `grey` blends towards the luminance (sketch-like)."""
    width, height = size
    colour = np.array(PALETTE[label], dtype=np.float32)
    pixels = colour + rng.normal(0.0, 12.0, size=(height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    w, h = rng.integers(width // 6, width // 2), rng.integers(height // 6, height // 2)
    x, y = rng.integers(0, width - w), rng.integers(0, height - h)
    fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
    draw = ImageDraw.Draw(image)
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + w, y + h], fill=fill)
    if grey:
        image = Image.blend(image, image.convert("L").convert("RGB"), grey)
    return image


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=90)


def _real_sets(rng: np.random.Generator, labels: list[int], num_classes: int) -> list[list[int]]:
    """ReaL-like label sets: mostly [label], some with a second plausible label, a few empty."""
    sets = []
    for label in labels:
        r = rng.random()
        sets.append([] if r < 0.08 else sorted({label, (label + 1) % num_classes}) if r < 0.3 else [label])
    return sets


def _write_in1k(
    root: Path, rng: np.random.Generator, num_classes: int, train_per_class: int, val_per_class: int, size
) -> None:
    wnids = [wnid for wnid, _ in SYNSETS[:num_classes]]
    for label, wnid in enumerate(wnids):
        for k in range(train_per_class):
            _save(_draw(rng, label, size), root / "train" / wnid / f"{wnid}_{k + 1}.JPEG")
    # val images are numbered 1..N across classes in a shuffled order, as in the real val set
    labels = [int(x) for x in rng.permutation(np.repeat(np.arange(num_classes), val_per_class))]
    lines = []
    for n, label in enumerate(labels, 1):
        name = f"ILSVRC2012_val_{n:08d}.JPEG"
        _save(_draw(rng, label, size), root / "val" / wnids[label] / name)
        lines.append(f"{name} {label}\n")
    (root / "val.txt").write_text("".join(lines))
    (root / "real.json").write_text(json.dumps(_real_sets(rng, labels, num_classes)))
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {n}\n" for w, n in SYNSETS[:num_classes]))


def make_mini_imagenet(
    root: str | Path,
    *,
    num_classes: int = 10,
    train_per_class: int = 24,
    val_per_class: int = 6,
    size: tuple[int, int] = (64, 48),
    seed: int = 0,
) -> dict[str, Path]:
    """Write a small learnable IN-1K (train/val/val.txt/real.json) plus V2, A, R and Sketch; return their paths."""
    if not 2 <= num_classes <= len(SYNSETS):
        raise InternViTError(f"num_classes={num_classes} is out of range", fix=f"use 2..{len(SYNSETS)} classes")
    root = Path(root)
    rng = np.random.default_rng(seed)
    paths = {
        "root": root,
        "in1k": root / "imagenet-1k",
        "val_txt": root / "imagenet-1k" / "val.txt",
        "real_json": root / "imagenet-1k" / "real.json",
        "synset_mapping": root / "imagenet-1k" / "LOC_synset_mapping.txt",
        "v2": root / "imagenetv2",
        "a": root / "imagenet-a",
        "r": root / "imagenet-r",
        "sketch": root / "imagenet-sketch",
    }
    _write_in1k(paths["in1k"], rng, num_classes, train_per_class, val_per_class, size)
    per_class = max(1, val_per_class // 2)
    wnids = [wnid for wnid, _ in SYNSETS[:num_classes]]
    subset_a = [i for i in range(num_classes) if i % 2 == 1]  # A and R hold different, overlapping subsets
    subset_r = [i for i in range(num_classes) if i % 3 != 2]
    for label in range(num_classes):
        for k in range(per_class):
            tag = f"{int(rng.integers(0, 2**32)):08x}"
            folder = paths["v2"] / "ImageNetV2-matched-frequency" / str(label)
            _save(_draw(rng, label, size), folder / f"{tag}.jpeg")
            _save(_draw(rng, label, size, grey=0.5), paths["sketch"] / wnids[label] / f"sketch_{k + 1}.JPEG")
            if label in subset_a:
                _save(_draw(rng, label, size), paths["a"] / wnids[label] / f"{tag}_a.jpg")
            if label in subset_r:
                _save(_draw(rng, label, size, grey=0.2), paths["r"] / wnids[label] / f"art_{k + 1}.jpg")
    return paths


def make_mini_custom(
    root: str | Path,
    classes: dict[str, str] | None = None,
    *,
    train_per_class: int = 8,
    val_per_class: int = 4,
    size: tuple[int, int] = (64, 48),
    classes_file: bool = True,
    seed: int = 0,
) -> Path:
    """Write a small learnable custom tree (train/<folder>/*, val/<folder>/*, classes.txt); return its root.

    `classes` maps folder name -> display name ("": none, the line is just the folder); the default has three classes,
    not in sorted order, one folder name with a space. Images end in .jpg, .JPEG or .jpeg. Class k gets the k-th
    PALETTE colour, and classes.txt lists the classes in the given order; `classes_file=False` leaves it out (the
    classes are then the sorted train/ folders).
    """
    classes = classes if classes is not None else {"red_thing": "Red thing", "green thing": "Green thing", "blue": ""}
    if not 2 <= len(classes) <= len(PALETTE):
        raise InternViTError(f"{len(classes)} classes is out of range", fix=f"use 2..{len(PALETTE)} classes")
    root = Path(root)
    rng = np.random.default_rng(seed)
    suffixes = (".jpg", ".JPEG", ".jpeg")
    for label, folder in enumerate(classes):
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            for k in range(count):
                _save(_draw(rng, label, size), root / split / folder / f"{split}_{k + 1}{suffixes[k % 3]}")
    if classes_file:
        lines = [f"{folder}\t{name}" if name else folder for folder, name in classes.items()]
        (root / "classes.txt").write_text("# folder<TAB>display name\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return root
