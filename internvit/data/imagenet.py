"""ImageNet-1K (train/val, ReaL) and its test variants (V2, Sketch, A, R) in the layouts users have on disk.

Every dataset yields `(image, target, index)`, where index is the sample's position in the dataset, so that
predictions gathered from several ranks can be put back in order and scored exactly (docs/protocol.md §3.1, §3.5).

Undecodable images raise an InternViTError naming the file. With `skip_corrupt=True` such an image is logged,
counted in `dataset.skipped` (per process: DataLoader workers keep their own) and returned as None; use
`collate_skip_none` as the DataLoader's collate_fn, which drops the Nones and logs how many it dropped (the
`indices` of the batches say exactly which samples were seen).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from internvit.data.imagenet_meta import (
    IMAGENET_A_INDICES,
    IMAGENET_R_INDICES,
    WNID_RE,
    check_wnids,
    few,
    find_synset_mapping,
    folder_samples,
    image_number,
    list_dir,
    load_class_names,
    load_real_labels,
    load_synset_mapping,
    load_wnids,
    require_dir,
    scan_class_folders,
    val_samples,
)
from internvit.data.images import load_image
from internvit.errors import InternViTError

log = logging.getLogger(__name__)

DATASET_NAMES = ("in1k", "real", "v2", "a", "r", "sketch")
Sample = tuple[Any, int, int]  # (image: a tensor after the transform, target, index)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's random transform in one epoch."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (1 << 63)


class ImageClassificationDataset(Dataset):
    """A list of (image path, target) with class metadata; items are (image, target, index), or None if skipped."""

    def __init__(
        self,
        samples: list[tuple[Path, int]],
        classes: list[str],
        *,
        name: str,
        class_names: list[str] | None = None,
        transform: Callable | None = None,
        skip_corrupt: bool = False,
    ) -> None:
        self.samples = samples
        self.classes = classes
        self.class_names = class_names if class_names is not None else list(classes)
        self.num_classes = len(classes)
        self.name = name
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.skipped: list[Path] = []  # undecodable images skipped in this process
        # set (the run's seed): each sample's random transform is seeded by (seed, epoch, index), see set_epoch
        self.sample_seed: int | None = None
        self.epoch = 0

    @property
    def targets(self) -> list[int]:
        """The target of every sample, in dataset order."""
        return [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample | None:
        path, target = self.samples[index]
        try:
            image = load_image(path)
        except InternViTError as e:
            if not self.skip_corrupt:
                raise
            log.warning("skipping sample %d of %s: %s", index, self.name, e.message)
            self.skipped.append(path)
            return None
        if self.transform is not None and self.sample_seed is not None:
            # the random transform of this (seed, epoch, sample) alone: the same in any worker, after any resume
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.sample_seed, self.epoch, index))
                image = self.transform(image)
        elif self.transform is not None:
            image = self.transform(image)
        return image, target, index

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose per-sample random transforms `sample_seed` selects (reaches workers made per epoch)."""
        self.epoch = epoch

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, samples={len(self)}, classes={self.num_classes})"


def collate_skip_none(batch: list[Sample | None]) -> list[Any] | None:
    """Collate (image, target, index) samples, dropping the Nones of skipped images; None if all were skipped."""
    kept = [sample for sample in batch if sample is not None]
    if len(kept) < len(batch):
        log.warning("dropped %d undecodable image(s) from a batch of %d", len(batch) - len(kept), len(batch))
    return default_collate(kept) if kept else None


class ImageNetSplit(ImageClassificationDataset):
    """IN-1K train (`train/<wnid>/*`) or val (`val/<wnid>/*`, or flat `val/*` plus val.txt or the devkit)."""

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        *,
        transform: Callable | None = None,
        labels: str | Path | None = None,
        wnids: Sequence[str] | None = None,
        skip_corrupt: bool = False,
    ) -> None:
        root = Path(root)
        if split not in ("train", "val"):
            raise InternViTError(f"unknown ImageNet split {split!r}", fix="use split='train' or split='val'")
        require_dir(root, "ImageNet-1k root", fix="pass the folder holding train/ and val/")
        folder = root / split
        if not folder.is_dir():
            found = few(sorted(p.name for p in root.iterdir())) or "nothing"
            raise InternViTError(f"no {split}/ folder in {root} (found: {found})", fix=f"pass the root of {split}/")
        wnids = check_wnids(wnids)
        if split == "train":
            samples, classes = folder_samples(folder, "ImageNet train", wnids)
        else:
            samples, classes = val_samples(root, folder, labels, wnids)
        # with exactly 1000 classes, the sorted wnids are the 1k label order (torchvision's names apply)
        names = load_class_names(classes, root, indices_1k=range(len(classes)), num_classes_1k=len(classes))
        super().__init__(
            samples, classes, name=f"in1k-{split}", class_names=names, transform=transform, skip_corrupt=skip_corrupt
        )
        self.real_labels: dict[int, list[int]] | None = None

    def attach_real_labels(self, real: str | Path | dict[int, list[int]]) -> None:
        """Attach ReaL label sets (real.json or its loaded dict), checking every val image has an entry."""
        real = load_real_labels(real) if isinstance(real, (str, Path)) else real
        missing = [p.name for p, _ in self.samples if image_number(p) not in real]
        if missing:
            raise InternViTError(
                f"ReaL labels cover {len(real)} val images; {len(missing)} of this val split have none: {few(missing)}",
                fix="use the real.json of the full 50,000-image val set",
            )
        bad = sorted({x for labels in real.values() for x in labels if x >= self.num_classes})
        if bad:
            raise InternViTError(
                f"ReaL labels name class indices {few(bad)} beyond this dataset's {self.num_classes} classes",
                fix="use the real.json that matches this label space",
            )
        self.real_labels = real

    def real_labels_of(self, index: int) -> list[int]:
        """The ReaL label set of sample `index` (matched by file name number, not by position)."""
        if self.real_labels is None:
            raise InternViTError("no ReaL labels attached", fix="build_dataset('real', ...) or attach_real_labels()")
        return self.real_labels[image_number(self.samples[index][0])]


class ImageNetV2(ImageClassificationDataset):
    """ImageNetV2 (`<root>/ImageNetV2-matched-frequency/<label>/*.jpeg`, or `<root>/<label>/`); label = int(folder)."""

    def __init__(
        self,
        root: str | Path,
        *,
        transform: Callable | None = None,
        wnids: Sequence[str] | None = None,
        skip_corrupt: bool = False,
    ) -> None:
        root = Path(root)
        wnids = check_wnids(wnids)
        folder = _find_v2_folder(root)
        folders = scan_class_folders(folder, "ImageNetV2")
        not_int = [name for name, _ in folders if not name.isdigit()]
        num_classes = len(wnids) if wnids is not None else 1000
        too_big = [name for name, _ in folders if name.isdigit() and int(name) >= num_classes]
        if not_int or too_big:
            raise InternViTError(
                f"ImageNetV2 folders under {folder} must be class indices 0..{num_classes - 1}; "
                f"found {few(not_int + too_big)}",
                fix="use the matched-frequency release, whose folders are named 0..999",
            )
        samples = [(p, int(name)) for name, files in folders for p in files]
        classes = wnids if wnids is not None else [str(i) for i in range(num_classes)]
        names = load_class_names(classes, root, indices_1k=range(num_classes), num_classes_1k=num_classes)
        super().__init__(samples, classes, name="v2", class_names=names, transform=transform, skip_corrupt=skip_corrupt)


def _find_v2_folder(root: Path) -> Path:
    """The folder holding ImageNetV2's 0..999 folders: root itself, or the (matched-frequency) folder inside it."""
    require_dir(root, "ImageNetV2", fix="pass the folder holding ImageNetV2-matched-frequency/")
    dirs = list_dir(root)[0]
    if dirs and all(d.name.isdigit() for d in dirs):
        return root
    candidates = [d for d in dirs if any(sub.name.isdigit() for sub in list_dir(d)[0])]
    if len(candidates) > 1:
        candidates = [d for d in candidates if "matched-frequency" in d.name.lower()] or candidates
    if len(candidates) == 1:
        return candidates[0]
    raise InternViTError(
        f"cannot find ImageNetV2 class folders in {root} (found {few([d.name for d in dirs]) or 'no folders'}): "
        f"expected {root}/ImageNetV2-matched-frequency/0..999/*.jpeg or {root}/0..999/",
        fix="pass the folder that holds the 0..999 class folders",
    )


def _wnid_root(root: Path, what: str) -> Path:
    """root, or its single sub-folder when that holds the wnid folders (e.g. ImageNet-Sketch's `sketch/`)."""
    require_dir(root, what, fix=f"pass the {what} folder that holds one folder per wnid")
    dirs, images = list_dir(root)
    if len(dirs) == 1 and not images and not WNID_RE.fullmatch(dirs[0].name) and list_dir(dirs[0])[0]:
        return dirs[0]
    return root


class ImageNetSketch(ImageClassificationDataset):
    """ImageNet-Sketch (`<root>/<wnid>/*`): targets are the wnid's index in `wnids` (default: sorted folders)."""

    def __init__(
        self,
        root: str | Path,
        *,
        transform: Callable | None = None,
        wnids: Sequence[str] | None = None,
        skip_corrupt: bool = False,
    ) -> None:
        root = Path(root)
        samples, classes = folder_samples(_wnid_root(root, "ImageNet-Sketch"), "ImageNet-Sketch", check_wnids(wnids))
        names = load_class_names(classes, root, indices_1k=range(len(classes)), num_classes_1k=len(classes))
        super().__init__(
            samples, classes, name="sketch", class_names=names, transform=transform, skip_corrupt=skip_corrupt
        )


class ImageNetAR(ImageClassificationDataset):
    """ImageNet-A or -R (`<root>/<wnid>/*`): 200-way targets plus `class_mask` selecting their 1k logits (§3.2)."""

    def __init__(
        self,
        root: str | Path,
        variant: str,
        *,
        transform: Callable | None = None,
        wnids: Sequence[str] | None = None,
        skip_corrupt: bool = False,
    ) -> None:
        if variant not in ("a", "r"):
            raise InternViTError(f"unknown ImageNet-A/R variant {variant!r}", fix="use variant='a' or variant='r'")
        root = Path(root)
        what = f"ImageNet-{variant.upper()}"
        samples, classes = folder_samples(_wnid_root(root, what), what, None)
        self.indices_1k, self.num_classes_1k = _ar_indices(classes, variant, check_wnids(wnids), root, what)
        # targets follow the sorted folder names; with a sorted 1k list, target j is the j-th selected logit
        self.class_mask = torch.zeros(self.num_classes_1k, dtype=torch.bool)
        self.class_mask[self.indices_1k] = True
        names = load_class_names(classes, root, indices_1k=self.indices_1k, num_classes_1k=self.num_classes_1k)
        super().__init__(
            samples, classes, name=variant, class_names=names, transform=transform, skip_corrupt=skip_corrupt
        )


def _ar_indices(
    classes: list[str], variant: str, wnids: list[str] | None, root: Path, what: str
) -> tuple[list[int], int]:
    """The 1k index of each class folder: from the wnid list (given or LOC_synset_mapping), else the §3.2 lists."""
    mapping = find_synset_mapping(root)
    if wnids is None and mapping is not None:
        wnids = sorted(load_synset_mapping(mapping))
    if wnids is not None:
        index = {w: i for i, w in enumerate(wnids)}
        unknown = [c for c in classes if c not in index]
        if unknown:
            raise InternViTError(
                f"{len(unknown)} class folder(s) of {what} under {root} are not in the {len(wnids)}-class "
                f"IN-1K wnid list: {few(unknown)}",
                fix="pass wnids= the full IN-1K wnid list (e.g. load_wnids(<imagenet-1k>/train))",
            )
        return [index[c] for c in classes], len(wnids)
    reference = IMAGENET_A_INDICES if variant == "a" else IMAGENET_R_INDICES
    if len(classes) != len(reference) or not all(WNID_RE.fullmatch(c) for c in classes):
        raise InternViTError(
            f"{what} at {root} has {len(classes)} class folders ({few(classes, 3)}); without an IN-1K wnid list "
            f"only the real dataset's {len(reference)} wnid folders can be mapped to 1k logits",
            fix="pass wnids= the IN-1K wnid list (e.g. load_wnids(<imagenet-1k>/train))",
        )
    log.info("%s: no IN-1K wnid list given; using the 1k indices of docs/protocol.md §3.2", what)
    return list(reference), 1000


def _find_real_json(root: Path) -> Path:
    """real.json in the dataset root, its meta_data/ (the original's place) or beside the root."""
    candidates = [root / "real.json", root / "meta_data" / "real.json", root.parent / "real.json"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise InternViTError(
            f"no ReaL labels found (looked for {few([str(c) for c in candidates])})",
            fix="pass real_json=PATH (real.json from google-research/reassessed-imagenet)",
        )
    return found


def build_dataset(
    name: str,
    root: str | Path,
    *,
    split: str = "val",
    transform: Callable | None = None,
    wnids: Sequence[str] | str | Path | None = None,
    labels: str | Path | None = None,
    real_json: str | Path | None = None,
    skip_corrupt: bool = False,
) -> ImageClassificationDataset:
    """Build a dataset by name: in1k, real (IN-1K val + `real_labels`), v2, a, r or sketch."""
    if name not in DATASET_NAMES:
        raise InternViTError(f"unknown dataset {name!r}", fix=f"use one of {', '.join(DATASET_NAMES)}")
    if name != "in1k" and split != "val":
        raise InternViTError(f"dataset {name!r} has no {split!r} split", fix="only in1k has a train split")
    if isinstance(wnids, (str, Path)):
        wnids = load_wnids(wnids)
    common: dict[str, Any] = dict(transform=transform, wnids=wnids, skip_corrupt=skip_corrupt)
    if name in ("in1k", "real"):
        dataset = ImageNetSplit(root, split, labels=labels, **common)
        if name == "real":
            dataset.attach_real_labels(Path(real_json) if real_json is not None else _find_real_json(Path(root)))
            dataset.name = "real"
        return dataset
    if name == "v2":
        return ImageNetV2(root, **common)
    if name == "sketch":
        return ImageNetSketch(root, **common)
    return ImageNetAR(root, name, **common)
