"""Semantic segmentation datasets in the mmseg folder layout, any number of classes (ADE20K is one case of it).

Layout: `<root>/images/<split>/**/<name>.<jpg|png|...>` and `<root>/annotations/<split>/**/<name>.png` (single-channel
PNGs of class indices), sorted by name, and a classes file naming the classes (`read_classes_file`). Items are dicts
{"img", "label", "index", "ori_size": (H, W), "path"} (+ "valid_size" from a training pipeline). Images are decoded
with OpenCV as mmcv does (BGR, EXIF orientation applied) and labels with Pillow (mmseg's 'pillow' backend,
'unchanged'). With `reduce_zero_label` (mmseg's), raw 0 becomes the ignore index and every other value v becomes
v - 1 (raw 255 stays ignored). Labels stay uint8 (uint16 beyond 255 classes) until the device. A `pipeline(img,
label, index)` gets the uint8 BGR HWC image and the reduced label (e.g. `TrainPipeline`, `TestPipeline` of
seg_transforms); without one, the item is the uint8 RGB CHW image and the label at the original size.

Split files (§5.8) list image names (relative paths without suffix) that restrict a split, e.g. a few-shot subset.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from internvit.atomic import atomic_path
from internvit.data.imagenet_meta import few
from internvit.data.images import IMAGE_SUFFIXES, read_image_bgr
from internvit.data.seg_transforms import IGNORE_INDEX, label_tensor, to_chw_rgb
from internvit.errors import InternViTError

CLASSES_FILE = "classes.txt"
SegPipeline = Callable[[np.ndarray, np.ndarray, int], tuple[Any, ...]]
_COLOUR = re.compile(r"^(?P<name>.*?)\s+#(?P<hex>[0-9a-fA-F]{6})$")


# ----------------------------------------------------------------------------------------------- classes


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct RGB display colours for a dataset without a palette: golden-ratio hues at two brightness levels."""
    hues = (np.arange(num_classes) * 0.618033988749895 % 1.0 * 180).astype(np.uint8)
    values = np.where(np.arange(num_classes) % 2 == 0, 255, 170).astype(np.uint8)
    hsv = np.stack([hues, np.full_like(hues, 200), values], axis=-1)[None]
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]
    return [tuple(int(c) for c in colour) for colour in rgb]


def read_classes_file(path: str | Path) -> tuple[list[str], list[tuple[int, int, int]] | None]:
    """Class names in index order and their palette (None when no line gives a colour).

    One class per line, in class-index order: its display name, optionally followed by a space and an RGB colour
    `#rrggbb` (e.g. `road #804080`). Blank lines and lines starting with `#` are skipped. Either every class has a
    colour or none has.
    """
    path = Path(path)
    if not path.is_file():
        raise InternViTError(
            f"no classes file {path}",
            fix=f"write {CLASSES_FILE}: one class name per line in class-index order (optionally `name #rrggbb`)",
        )
    names, colours = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _COLOUR.match(line)
        name = match["name"].strip() if match else line
        names.append(name)
        colours.append(tuple(int(match["hex"][i : i + 2], 16) for i in (0, 2, 4)) if match else None)
    if not names:
        raise InternViTError(f"classes file {path} names no class", fix="list one class name per line")
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise InternViTError(f"classes file {path} lists {few(duplicates)} more than once", fix="name each class once")
    given = [c is not None for c in colours]
    if any(given) and not all(given):
        missing = [name for name, c in zip(names, colours, strict=True) if c is None]
        raise InternViTError(
            f"classes file {path} gives colours for some classes but not for {few(missing)}",
            fix="give every class a colour (`name #rrggbb`) or none",
        )
    return names, (colours if all(given) else None)  # type: ignore[return-value]


_REDUCE_LUT = np.concatenate([[255], np.arange(254), [255]]).astype(np.uint8)  # 0 -> 255, v -> v - 1, 255 -> 255


def reduce_labels(raw: np.ndarray, reduce_zero_label: bool, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """mmseg's label reduction: 0 -> ignore, v -> v - 1, and a raw 255 stays ignored; identity without it."""
    if not reduce_zero_label:
        return raw
    if raw.dtype == np.uint8 and ignore_index == 255:
        return cv2.LUT(raw, _REDUCE_LUT)
    label = raw.astype(np.int64) - 1
    label[(raw == 0) | (raw == 255)] = ignore_index
    return label


def label_dtype(num_classes: int, ignore_index: int) -> type:
    """uint8 when every class index and the ignore index fit, else uint16."""
    return np.uint8 if max(num_classes - 1, ignore_index) <= 255 else np.uint16


# ----------------------------------------------------------------------------------------------- dataset


def _suffixes_text(suffixes: Sequence[str]) -> str:
    return "/".join(s.lstrip(".") for s in suffixes)


class SegmentationFolder(Dataset):
    """images/<split>/ + annotations/<split>/ with a class list; see the module docstring for the layout."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        class_names: Sequence[str],
        palette: Sequence[tuple[int, int, int]] | None = None,
        reduce_zero_label: bool = False,
        ignore_index: int = IGNORE_INDEX,
        pipeline: SegPipeline | None = None,
        subset_file: str | Path | None = None,
        image_suffixes: Sequence[str] = IMAGE_SUFFIXES,
        label_suffix: str = ".png",
        what: str = "segmentation dataset",
    ) -> None:
        self.root, self.split, self.pipeline = Path(root), split, pipeline
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.palette = tuple(palette) if palette is not None else tuple(default_palette(self.num_classes))
        if len(self.palette) != self.num_classes:
            raise InternViTError(
                f"{len(self.palette)} palette colours for {self.num_classes} classes", fix="give one colour per class"
            )
        if not 0 <= ignore_index <= 65535 or ignore_index < self.num_classes:
            raise InternViTError(
                f"ignore index {ignore_index} collides with the class indices 0..{self.num_classes - 1}",
                fix="use an ignore index of at least the class count (255 by default)",
            )
        self.reduce_zero_label, self.ignore_index = reduce_zero_label, ignore_index
        self.label_dtype = label_dtype(self.num_classes, ignore_index)
        image_dir, label_dir = self.root / "images" / split, self.root / "annotations" / split
        for folder, kind in ((image_dir, "images"), (label_dir, "annotations")):
            if not folder.is_dir():
                present = few(sorted(p.name for p in folder.parent.iterdir())) if folder.parent.is_dir() else ""
                raise InternViTError(
                    f"no {kind}/{split}/ folder in {self.root} (found in {folder.parent}: {present or 'nothing'})",
                    fix=f"pass the {what} folder holding images/{split} and annotations/{split}",
                )
        suffixes = {s.lower() for s in image_suffixes}
        images = sorted(
            (p for p in image_dir.rglob("*") if p.suffix.lower() in suffixes and p.is_file()),
            key=lambda p: p.relative_to(image_dir).as_posix(),
        )
        if not images:
            raise InternViTError(
                f"no *.{_suffixes_text(image_suffixes)} images under {image_dir}",
                fix="check that the dataset was fully extracted",
            )
        self.names = [p.relative_to(image_dir).with_suffix("").as_posix() for p in images]
        repeated = sorted(name for name, count in Counter(self.names).items() if count > 1)
        if repeated:
            raise InternViTError(
                f"{image_dir} holds several images named {few(repeated)} (different suffixes)",
                fix="keep one image per name: the name pairs it with its annotation",
            )
        self.images = images
        self.labels = [label_dir / f"{name}{label_suffix}" for name in self.names]
        missing = [(i, a) for i, a in zip(self.images, self.labels, strict=True) if not a.is_file()]
        if missing:
            pairs = "; ".join(f"{i} has no {a}" for i, a in missing[:3])
            raise InternViTError(
                f"{len(missing)} image(s) without annotation: {pairs}" + (" ..." if len(missing) > 3 else ""),
                fix=f"restore the missing annotations in {label_dir} (same name as the image, {label_suffix})",
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
                fix=f"use a split file made from this dataset's {self.split} names (image names without suffix)",
            )
        wanted = set(subset)
        keep = [i for i, name in enumerate(self.names) if name in wanted]
        self.names = [self.names[i] for i in keep]
        self.images = [self.images[i] for i in keep]
        self.labels = [self.labels[i] for i in keep]

    def __len__(self) -> int:
        return len(self.images)

    def raw_limit(self) -> int:
        """The largest valid raw label value other than the ignore index."""
        return self.num_classes if self.reduce_zero_label else self.num_classes - 1

    def load_label(self, index: int, image_size: tuple[int, int]) -> np.ndarray:
        """The raw label PNG, checked: single channel, the image's size, values that are classes or ignored."""
        path, image_path = self.labels[index], self.images[index]
        try:
            with Image.open(path) as png:
                mode, raw = png.mode, np.array(png)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise InternViTError(f"cannot decode label {path} ({e})", fix="the file is corrupt or not a PNG") from e
        if mode not in ("L", "P", "I", "I;16") or raw.ndim != 2:
            raise InternViTError(
                f"label {path} is a {mode} image; labels are single-channel PNGs of class indices",
                fix="use the dataset's index annotations, not colour renderings",
            )
        if raw.shape != image_size:
            raise InternViTError(
                f"label {path} is {raw.shape[1]}x{raw.shape[0]} (WxH) but its image {image_path} is "
                f"{image_size[1]}x{image_size[0]}",
                fix="pair every image with the annotation of the same release (same name, same size)",
            )
        limit = self.raw_limit()
        if raw.max(initial=0) > limit:
            ignored = {self.ignore_index, 255} if self.reduce_zero_label else {self.ignore_index}
            values = np.unique(raw[raw > limit])
            bad = sorted(int(v) for v in values if int(v) not in ignored)
            if bad:
                raise InternViTError(
                    f"label {path} holds values {few(bad)} above {limit}; raw labels are "
                    + (
                        f"0 (ignored) to {limit}"
                        if self.reduce_zero_label
                        else f"0 to {limit} (or {self.ignore_index})"
                    ),
                    fix="check the dataset's reduce_zero_label and classes file against its annotations",
                )
        return raw

    def load_raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The decoded uint8 HWC BGR image and its raw (unreduced) label, checked against each other."""
        image = read_image_bgr(self.images[index])
        return image, self.load_label(index, image.shape[:2])

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, raw = self.load_raw(index)
        label = reduce_labels(raw, self.reduce_zero_label, self.ignore_index).astype(self.label_dtype, copy=False)
        item: dict[str, Any] = {
            "index": index,
            "ori_size": (int(image.shape[0]), int(image.shape[1])),
            "path": str(self.images[index]),
        }
        if self.pipeline is None:
            item["img"], item["label"] = to_chw_rgb(image), label_tensor(label)
            return item
        out = self.pipeline(image, label, index)
        item["img"], item["label"] = out[0], out[1]
        if len(out) > 2:
            item["valid_size"] = torch.tensor(out[2], dtype=torch.int64)  # batched to (B, 2)
        return item

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, samples={len(self)}, "
            f"classes={self.num_classes})"
        )


# ----------------------------------------------------------------------------------------------- few-shot subsets


def make_fewshot_subset(names: Sequence[str], fraction_denominator: int, seed: int, suffix: str = ".jpg") -> list[str]:
    """The 1/k subset of §5.8: shuffle the filename-sorted list with random.Random(seed), keep len//k; sorted out.

    This equals mmseg's `random.seed(seed); random.shuffle(img_infos)[:max_image_num]` (sorted by file name,
    `name + suffix`, as mmseg sorts them). k == 1 keeps every name, as the full-data config does.
    """
    k = fraction_denominator
    if not isinstance(k, int) or k < 1:
        raise InternViTError(f"fraction denominator must be a positive int, got {k!r}", fix="use e.g. 16, 8, 4, 2")
    if len(set(names)) != len(names):
        raise InternViTError("the name list holds duplicates", fix="pass each image name once")
    ordered = sorted(names, key=lambda name: name + suffix)
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
