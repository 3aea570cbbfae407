"""ADE20K (ADEChallengeData2016, REFERENCE §5.1) with mmseg's reduce_zero_label, and few-shot subsets (§5.8).

Items are dicts {"img": float32 CHW, "label": int64 HW, "index", "ori_size": (H, W), "path"}. The label is reduced:
raw 0 ("other") -> 255 (ignored), raw 1..150 -> 0..149. A `pipeline(img, label, index)` gets the decoded uint8 HWC
RGB image and the reduced int64 label (e.g. `TrainPipeline`, `TestPipeline` of seg_transforms) and returns the pair
as arrays or tensors; without one, the image is returned as float32 0..255 values.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from internvit.atomic import atomic_path
from internvit.data.imagenet_meta import few
from internvit.data.images import load_image
from internvit.errors import InternViTError

NUM_CLASSES = 150
IGNORE_INDEX = 255
SPLITS = ("training", "validation")
_SPLIT_ALIASES = {"train": "training", "val": "validation"}
LAYOUT_DIR = "ADEChallengeData2016"

# mmseg ADE20KDataset.CLASSES, index 0..149 ('bed ' keeps the trailing space mmseg stores)
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed ", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip
ADE20K_CLASS_NAMES: tuple[str, ...] = tuple(name.strip() for name in ADE20K_CLASSES)  # for display

# mmseg ADE20KDataset.PALETTE (RGB, visualisation only): all 150 entries, checked entry by entry against
# mmsegmentation's mmseg/datasets/ade.py
ADE20K_PALETTE: tuple[tuple[int, int, int], ...] = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80), (140, 140, 140),
    (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70),
    (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3), (0, 102, 200),
    (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220),
    (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140),
    (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0), (0, 0, 255),
    (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255), (11, 200, 200), (255, 82, 0), (0, 255, 245),
    (0, 61, 255), (0, 255, 112), (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0),
    (0, 255, 153), (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194), (0, 255, 82),
    (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255), (0, 255, 163), (255, 153, 0),
    (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112),
    (92, 255, 0), (0, 224, 255), (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0),
    (255, 0, 163), (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255), (255, 255, 0),
    (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0), (0, 133, 255), (255, 214, 0),
    (25, 194, 194), (102, 255, 0), (92, 0, 255),
)  # fmt: skip

SegPipeline = Callable[[np.ndarray, np.ndarray, int], tuple[Any, Any]]


def find_ade_root(root: str | Path) -> Path:
    """The ADEChallengeData2016 folder: `root` itself (holding images/, annotations/) or root/ADEChallengeData2016."""
    root = Path(root)
    for candidate in (root, root / LAYOUT_DIR):
        if (candidate / "images").is_dir() or (candidate / "annotations").is_dir():
            return candidate
    found = few(sorted(p.name for p in root.iterdir())) if root.is_dir() else "it does not exist"
    raise InternViTError(
        f"no ADE20K layout at {root}: expected {root}/images and {root}/annotations or {root}/{LAYOUT_DIR}/ "
        f"(found: {found or 'nothing'})",
        fix=f"pass the {LAYOUT_DIR} folder of the official release (or its parent)",
    )


def reduce_zero_label(raw: np.ndarray) -> np.ndarray:
    """mmseg reduce_zero_label on raw ADE20K values: 0 -> 255 (ignored), 1..150 -> 0..149, as int64."""
    label = raw.astype(np.int64) - 1
    label[raw == 0] = IGNORE_INDEX
    return label


def load_ade_label(path: Path, image_size: tuple[int, int], image_path: Path) -> np.ndarray:
    """Read a raw ADE20K label PNG (values 0..150), checking its mode, its size against the image's and its range."""
    try:
        with Image.open(path) as png:
            mode, raw = png.mode, np.array(png)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InternViTError(f"cannot decode label {path} ({e})", fix="the file is corrupt or not a PNG") from e
    if mode not in ("L", "P", "I", "I;16") or raw.ndim != 2:
        raise InternViTError(
            f"label {path} is a {mode} image; ADE20K labels are single-channel PNGs of class indices",
            fix="use the annotations/ of the official ADEChallengeData2016 release, not colour renderings",
        )
    if raw.shape != image_size:
        raise InternViTError(
            f"label {path} is {raw.shape[1]}x{raw.shape[0]} (WxH) but its image {image_path} is "
            f"{image_size[1]}x{image_size[0]}",
            fix="pair every image with the annotation of the same release (same name, same size)",
        )
    if raw.max(initial=0) > NUM_CLASSES:
        bad = sorted(int(v) for v in np.unique(raw[raw > NUM_CLASSES]))
        raise InternViTError(
            f"label {path} holds values {few(bad)} above {NUM_CLASSES}; raw ADE20K labels are 0 (other) to 150",
            fix="use raw ADEChallengeData2016 annotations (not already reduced or re-coloured ones)",
        )
    return raw


class ADE20K(Dataset):
    """ADEChallengeData2016 images/<split>/*.jpg with annotations/<split>/*.png, sorted by file name."""

    classes = ADE20K_CLASSES
    class_names = ADE20K_CLASS_NAMES
    palette = ADE20K_PALETTE
    num_classes = NUM_CLASSES
    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        root: str | Path,
        split: str = "training",
        *,
        pipeline: SegPipeline | None = None,
        subset_file: str | Path | None = None,
    ) -> None:
        split = _SPLIT_ALIASES.get(split, split)
        if split not in SPLITS:
            raise InternViTError(f"unknown ADE20K split {split!r}", fix="use split='training' or split='validation'")
        self.root = find_ade_root(root)
        self.split = split
        self.pipeline = pipeline
        image_dir, label_dir = self.root / "images" / split, self.root / "annotations" / split
        for folder, what in ((image_dir, "images"), (label_dir, "annotations")):
            if not folder.is_dir():
                present = few(sorted(p.name for p in folder.parent.iterdir())) if folder.parent.is_dir() else ""
                raise InternViTError(
                    f"no {what}/{split}/ folder in {self.root} (found in {folder.parent}: {present or 'nothing'})",
                    fix=f"pass the {LAYOUT_DIR} folder holding images/{split} and annotations/{split}",
                )
        images = sorted(image_dir.rglob("*.jpg"), key=lambda p: p.relative_to(image_dir).as_posix())
        if not images:
            raise InternViTError(f"no *.jpg images under {image_dir}", fix="check that the release was fully extracted")
        self.names = [p.relative_to(image_dir).with_suffix("").as_posix() for p in images]
        self.images = images
        self.labels = [label_dir / f"{name}.png" for name in self.names]
        missing = [(i, a) for i, a in zip(self.images, self.labels, strict=True) if not a.is_file()]
        if missing:
            pairs = "; ".join(f"{i} has no {a}" for i, a in missing[:3])
            raise InternViTError(
                f"{len(missing)} image(s) without annotation: {pairs}" + (" ..." if len(missing) > 3 else ""),
                fix=f"restore the missing PNGs in {label_dir} (same name as the image, .png)",
            )
        if subset_file is not None:
            self.restrict(read_split_file(subset_file), Path(subset_file))

    def restrict(self, subset: list[str], source: Path) -> None:
        """Restrict the dataset to the names of a split file (`source`, for messages), keeping filename order."""
        known = set(self.names)
        unknown = [name for name in subset if name not in known]
        if unknown:
            raise InternViTError(
                f"split file {source} names {len(unknown)} image(s) not in {self.split}: {few(unknown)}",
                fix=f"use a split file made from this dataset's {self.split} names (image names without .jpg)",
            )
        wanted = set(subset)
        keep = [i for i, name in enumerate(self.names) if name in wanted]
        self.names = [self.names[i] for i in keep]
        self.images = [self.images[i] for i in keep]
        self.labels = [self.labels[i] for i in keep]

    def __len__(self) -> int:
        return len(self.images)

    def load_raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The decoded uint8 HWC RGB image and its raw (unreduced) uint8/int label, checked against each other."""
        image = np.array(load_image(self.images[index]))
        return image, load_ade_label(self.labels[index], image.shape[:2], self.images[index])

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, raw = self.load_raw(index)
        label = reduce_zero_label(raw)
        ori_size = (int(image.shape[0]), int(image.shape[1]))
        if self.pipeline is not None:
            image, label = self.pipeline(image, label, index)
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if isinstance(label, np.ndarray):
            label = torch.from_numpy(np.ascontiguousarray(label))
        return {
            "img": image.float(),
            "label": label.long(),
            "index": index,
            "ori_size": ori_size,
            "path": str(self.images[index]),
        }

    def __repr__(self) -> str:
        return f"ADE20K(root={str(self.root)!r}, split={self.split!r}, samples={len(self)})"


# ----------------------------------------------------------------------------------------------- few-shot subsets


def make_fewshot_subset(names: Sequence[str], fraction_denominator: int, seed: int) -> list[str]:
    """The 1/k subset of §5.8: shuffle the filename-sorted list with random.Random(seed), keep len//k; sorted out.

    This equals mmseg's `random.seed(seed); random.shuffle(img_infos)[:max_image_num]` (sorted by `name.jpg`, as
    mmseg sorts file names). k == 1 keeps every name, as the full-data config does.
    """
    k = fraction_denominator
    if not isinstance(k, int) or k < 1:
        raise InternViTError(f"fraction denominator must be a positive int, got {k!r}", fix="use e.g. 16, 8, 4, 2")
    if len(set(names)) != len(names):
        raise InternViTError("the name list holds duplicates", fix="pass each image name once")
    ordered = sorted(names, key=lambda name: name + ".jpg")
    if k == 1:
        return sorted(ordered)
    if len(ordered) // k == 0:
        raise InternViTError(f"1/{k} of {len(ordered)} images is empty", fix="use a smaller denominator")
    random.Random(seed).shuffle(ordered)
    return sorted(ordered[: len(ordered) // k])


def _split_text(names: Sequence[str]) -> str:
    """Canonical split file text: sorted names, one per line."""
    return "".join(f"{name}\n" for name in sorted(names))


def write_split_file(path: str | Path, names: Sequence[str]) -> Path:
    """Write names (image names without extension) one per line, sorted, atomically; returns the path."""
    bad = [name for name in names if not name or name != name.strip() or "\n" in name]
    if bad or len(set(names)) != len(names):
        raise InternViTError(
            f"cannot write split file {path}: names must be unique, non-empty, without surrounding whitespace "
            f"(offending: {few([repr(n) for n in bad]) or 'duplicates'})",
            fix="pass image names such as 'ADE_train_00000001'",
        )
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(_split_text(names))
    return path


def read_split_file(path: str | Path) -> list[str]:
    """Read a split file (one image name per line; blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise InternViTError(f"no such split file: {path}", fix="write one with write_split_file(path, names)")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise InternViTError(f"split file {path} lists {few(duplicates)} more than once", fix="list each name once")
    return names


def split_hash(names: Sequence[str]) -> str:
    """sha256 hex of the canonical split file text (sorted names, one per line): order-independent."""
    return hashlib.sha256(_split_text(names).encode()).hexdigest()
