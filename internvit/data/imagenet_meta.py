"""ImageNet metadata and layouts: A/R index lists, label files (val.txt, devkit, real.json, names), folder scans."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import scipy.io
from torchvision.models._meta import _IMAGENET_CATEGORIES  # the names torchvision ships (no public accessor)

from internvit.errors import InternViTError

WNID_RE = re.compile(r"n\d{8}")
VAL_NAME_RE = re.compile(r"ILSVRC2012_val_(\d{8})")
SYNSET_MAPPING = "LOC_synset_mapping.txt"
DEVKIT = "ILSVRC2012_devkit_t12"
DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # as ImageFolder

log = logging.getLogger(__name__)

# 1k indices (sorted-wnid order) of the 200 ImageNet-A / ImageNet-R classes, copied from docs/protocol.md §3.2
# (EVA-02's imagenet_a_r_indices.py, originally Hendrycks et al.); 86 indices are common to both.
IMAGENET_A_INDICES: tuple[int, ...] = (
    6, 11, 13, 15, 17, 22, 23, 27, 30, 37, 39, 42, 47, 50, 57, 70, 71, 76, 79, 89, 90, 94, 96, 97, 99, 105, 107,
    108, 110, 113, 124, 125, 130, 132, 143, 144, 150, 151, 207, 234, 235, 254, 277, 283, 287, 291, 295, 298,
    301, 306, 307, 308, 309, 310, 311, 313, 314, 315, 317, 319, 323, 324, 326, 327, 330, 334, 335, 336, 347,
    361, 363, 372, 378, 386, 397, 400, 401, 402, 404, 407, 411, 416, 417, 420, 425, 428, 430, 437, 438, 445,
    456, 457, 461, 462, 470, 472, 483, 486, 488, 492, 496, 514, 516, 528, 530, 539, 542, 543, 549, 552, 557,
    561, 562, 569, 572, 573, 575, 579, 589, 606, 607, 609, 614, 626, 627, 640, 641, 642, 643, 658, 668, 677,
    682, 684, 687, 701, 704, 719, 736, 746, 749, 752, 758, 763, 765, 768, 773, 774, 776, 779, 780, 786, 792,
    797, 802, 803, 804, 813, 815, 820, 823, 831, 833, 835, 839, 845, 847, 850, 859, 862, 870, 879, 880, 888,
    890, 897, 900, 907, 913, 924, 932, 933, 934, 937, 943, 945, 947, 951, 954, 956, 957, 959, 971, 972, 980,
    981, 984, 986, 987, 988,
)  # fmt: skip
IMAGENET_R_INDICES: tuple[int, ...] = (
    1, 2, 4, 6, 8, 9, 11, 13, 22, 23, 26, 29, 31, 39, 47, 63, 71, 76, 79, 84, 90, 94, 96, 97, 99, 100, 105, 107,
    113, 122, 125, 130, 132, 144, 145, 147, 148, 150, 151, 155, 160, 161, 162, 163, 171, 172, 178, 187, 195,
    199, 203, 207, 208, 219, 231, 232, 234, 235, 242, 245, 247, 250, 251, 254, 259, 260, 263, 265, 267, 269,
    276, 277, 281, 288, 289, 291, 292, 293, 296, 299, 301, 308, 309, 310, 311, 314, 315, 319, 323, 327, 330,
    334, 335, 337, 338, 340, 341, 344, 347, 353, 355, 361, 362, 365, 366, 367, 368, 372, 388, 390, 393, 397,
    401, 407, 413, 414, 425, 428, 430, 435, 437, 441, 447, 448, 457, 462, 463, 469, 470, 471, 472, 476, 483,
    487, 515, 546, 555, 558, 570, 579, 583, 587, 593, 594, 596, 609, 613, 617, 621, 629, 637, 657, 658, 701,
    717, 724, 763, 768, 774, 776, 779, 780, 787, 805, 812, 815, 820, 824, 833, 847, 852, 866, 875, 883, 889,
    895, 907, 928, 931, 932, 933, 934, 936, 937, 943, 945, 947, 948, 949, 951, 953, 954, 957, 963, 965, 967,
    980, 981, 983, 988,
)  # fmt: skip


def imagenet_1k_categories() -> list[str]:
    """torchvision's 1000 human-readable IN-1K class names, in 1k (sorted-wnid) order."""
    return list(_IMAGENET_CATEGORIES)


def image_number(path: str | Path) -> int:
    """The val image number n of an `ILSVRC2012_val_{n:08d}.*` file (how ReaL and devkit labels are keyed)."""
    match = VAL_NAME_RE.fullmatch(Path(path).stem)
    if match is None:
        raise InternViTError(
            f"{path} is not named ILSVRC2012_val_XXXXXXXX.*, so its val image number is unknown",
            fix="keep the official ImageNet val file names",
        )
    return int(match.group(1))


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise InternViTError(f"{what} not found: {path}", fix="check the path")
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InternViTError(f"cannot read {what} {path} ({e})", fix=f"supply a text {what}") from e


def find_synset_mapping(root: str | Path) -> Path | None:
    """The LOC_synset_mapping.txt in a dataset root or its parent (Kaggle layout), if any."""
    root = Path(root)
    for folder in (root, root.parent):
        if (folder / SYNSET_MAPPING).is_file():
            return folder / SYNSET_MAPPING
    return None


def load_synset_mapping(path: str | Path) -> dict[str, str]:
    """Read `<wnid> <name>, <alt>, ...` lines into wnid -> first name, in file order."""
    path = Path(path)
    mapping: dict[str, str] = {}
    for num, line in enumerate(_read_text(path, "synset mapping").splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, names = line.strip().partition(" ")
        if not WNID_RE.fullmatch(wnid) or not names.strip():
            raise InternViTError(
                f"{path} line {num} is {line!r}: expected '<wnid> <name>, <alternative names>'",
                fix="use the Kaggle LOC_synset_mapping.txt format",
            )
        mapping[wnid] = names.split(",")[0].strip()
    return mapping


def load_wnids(source: str | Path) -> list[str]:
    """The sorted 1k wnid list from a folder of wnid folders (e.g. train/) or a file whose lines start with wnids."""
    source = Path(source)
    if source.is_dir():
        wnids = [p.name for p in source.iterdir() if p.is_dir() and WNID_RE.fullmatch(p.name)]
    else:
        wnids = [line.split()[0] for line in _read_text(source, "wnid list").splitlines() if line.strip()]
    bad = [w for w in wnids if not WNID_RE.fullmatch(w)]
    if bad or not wnids:
        raise InternViTError(
            f"{source} holds no wnid list (found {len(wnids)} entries, {len(bad)} not like n01440764, e.g. {bad[:3]})",
            fix="pass the IN-1K train/ folder or LOC_synset_mapping.txt",
        )
    return sorted(set(wnids))


def load_val_list(path: str | Path) -> list[tuple[str, int]]:
    """Read a val.txt-style list: one `<relative file name> <label>` per line (docs/protocol.md §8)."""
    path = Path(path)
    entries = []
    for num, line in enumerate(_read_text(path, "labels file").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise InternViTError(
                f"{path} line {num} is {line!r}: expected '<file name> <integer label>'",
                fix="use the val.txt format, e.g. 'ILSVRC2012_val_00000001.JPEG 65'",
            )
        entries.append((parts[0], int(parts[1])))
    if not entries:
        raise InternViTError(f"labels file {path} is empty", fix="supply a val.txt with one line per image")
    return entries


def load_devkit(devkit_root: str | Path) -> tuple[dict[int, str], list[int]]:
    """Read the ILSVRC2012 devkit: leaf ILSVRC2012_ID -> wnid (data/meta.mat) and the val ground-truth IDs."""
    data = Path(devkit_root) / "data"
    meta_path = data / "meta.mat"
    if not meta_path.is_file():
        raise InternViTError(f"devkit has no {meta_path}", fix=f"extract the full {DEVKIT} archive")
    try:  # same reading as torchvision's parse_meta_mat: leaves (num_children == 0) are the 1000 classes
        synsets = scipy.io.loadmat(meta_path, squeeze_me=True)["synsets"]
        leaves = synsets["num_children"] == 0
        ids, wnids = synsets["ILSVRC2012_ID"][leaves], synsets["WNID"][leaves]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InternViTError(f"cannot read the synsets of {meta_path} ({e})", fix="use the official devkit") from e
    id_to_wnid = {int(i): str(w) for i, w in zip(ids, wnids, strict=True)}
    gt_path = data / DEVKIT_GROUND_TRUTH
    lines = [line.strip() for line in _read_text(gt_path, "devkit ground truth").splitlines() if line.strip()]
    bad = [(n, line) for n, line in enumerate(lines, 1) if not line.isdigit() or int(line) not in id_to_wnid]
    if bad:
        raise InternViTError(
            f"{gt_path} line {bad[0][0]} is {bad[0][1]!r}: not an ILSVRC2012_ID of a class in {meta_path}",
            fix="use the ground truth and meta.mat of the same devkit",
        )
    return id_to_wnid, [int(line) for line in lines]


def load_real_labels(path: str | Path) -> dict[int, list[int]]:
    """Read ReaL's real.json (a list of label lists; entry i is val image i+1) into image number -> labels."""
    path = Path(path)
    try:
        data = json.loads(_read_text(path, "ReaL labels file"))
    except json.JSONDecodeError as e:
        raise InternViTError(f"{path} is not valid JSON ({e})", fix="use real.json from reassessed-imagenet") from e
    if not isinstance(data, list):
        raise InternViTError(
            f"{path} holds a JSON {type(data).__name__}: expected a list of label lists (one per val image)",
            fix="use real.json from google-research/reassessed-imagenet",
        )
    for i, entry in enumerate(data):
        if not isinstance(entry, list) or not all(type(x) is int and x >= 0 for x in entry):
            raise InternViTError(
                f"{path} entry {i} (ILSVRC2012_val_{i + 1:08d}) is {str(entry)[:60]}: expected a list of class indices",
                fix="use real.json from google-research/reassessed-imagenet",
            )
    return {i + 1: list(entry) for i, entry in enumerate(data)}


def load_class_names(
    classes: Sequence[str], root: str | Path, *, indices_1k: Sequence[int] | None = None, num_classes_1k: int = 0
) -> list[str]:
    """Human-readable names: LOC_synset_mapping.txt near root, else torchvision's 1k names by 1k index, else classes."""
    mapping_path = find_synset_mapping(root)
    if mapping_path is not None:
        mapping = load_synset_mapping(mapping_path)
        if all(c in mapping for c in classes):
            return [mapping[c] for c in classes]
    if indices_1k is not None and num_classes_1k == 1000:
        categories = imagenet_1k_categories()
        return [categories[i] for i in indices_1k]
    return list(classes)


def few(items: Sequence[Any], n: int = 5) -> str:
    """The first n items, comma-separated, with the total when there are more (for error messages)."""
    shown = ", ".join(str(x) for x in items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def list_dir(folder: Path) -> tuple[list[Path], list[Path]]:
    """Sorted sub-folders and image files of a folder (hidden entries such as macOS `._*` files ignored)."""
    dirs, images = [], []
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                dirs.append(Path(entry.path))
            elif entry.name.lower().endswith(IMG_EXTENSIONS):
                images.append(Path(entry.path))
    return sorted(dirs), sorted(images)


def require_dir(path: Path, what: str, fix: str) -> None:
    """Raise an InternViTError naming `what` and what is there instead, unless path is a folder."""
    if not path.is_dir():
        found = "a file" if path.exists() else "nothing"
        raise InternViTError(f"{what} folder not found: {path} ({found} there)", fix=fix)


def scan_class_folders(root: Path, what: str) -> list[tuple[str, list[Path]]]:
    """The class folders under root with their sorted images; errors on no folders or folders without images."""
    dirs, images = list_dir(root)
    if not dirs:
        raise InternViTError(
            f"{what} at {root} has no class folders (found {len(images)} loose images): expected {root}/<class>/*.JPEG",
            fix="pass the folder that holds one sub-folder per class",
        )
    folders = [(d.name, list_dir(d)[1]) for d in dirs]
    empty = [name for name, files in folders if not files]
    if empty:
        raise InternViTError(
            f"{len(empty)} class folder(s) of {what} under {root} hold no images: {few(empty)}",
            fix="restore their images or remove the empty folders",
        )
    return folders


def check_wnids(wnids: Sequence[str] | None) -> list[str] | None:
    """Validate a wnid list as a label space: labels are indices in sorted order, so it must be sorted and unique."""
    if wnids is None:
        return None
    wnids = list(wnids)
    if not wnids or wnids != sorted(set(wnids)):
        raise InternViTError(
            f"wnids must be a non-empty, sorted list without repeats (got {len(wnids)}, starting {few(wnids, 3)})",
            fix="pass the sorted IN-1K wnid list, e.g. load_wnids(<imagenet-1k>/train)",
        )
    return wnids


def folder_samples(folder: Path, what: str, classes: list[str] | None) -> tuple[list[tuple[Path, int]], list[str]]:
    """Samples of a class-folder layout; labels index `classes` (default: the sorted folder names)."""
    folders = scan_class_folders(folder, what)
    classes = classes if classes is not None else [name for name, _ in folders]
    index = {c: i for i, c in enumerate(classes)}
    unknown = [name for name, _ in folders if name not in index]
    if unknown:
        raise InternViTError(
            f"{len(unknown)} class folder(s) of {what} under {folder} are not in the {len(classes)}-class "
            f"wnid list: {few(unknown)}",
            fix="pass the IN-1K wnid list as wnids= (e.g. the train/ folder names), or remove the stray folders",
        )
    present = {name for name, _ in folders}
    absent = [c for c in classes if c not in present]
    if absent:  # scored over fewer classes than the head knows: say which
        log.warning(
            "%s under %s has no folder for %d of its %d classes: %s",
            what,
            folder,
            len(absent),
            len(classes),
            few(absent),
        )
    return [(p, index[name]) for name, files in folders for p in files], classes


def _label_space(root: Path, wnids: list[str] | None) -> list[str] | None:
    """The IN-1K wnid list: given, else the train/ folder names, else LOC_synset_mapping.txt, else unknown."""
    if wnids is not None:
        return wnids
    if (root / "train").is_dir():
        return [d.name for d in list_dir(root / "train")[0]]
    mapping = find_synset_mapping(root)
    return sorted(load_synset_mapping(mapping)) if mapping is not None else None


def _find_val_labels(root: Path, val_dir: Path) -> Path | None:
    """The first val.txt or devkit found in the usual places (root, root/meta_data, val/, beside root)."""
    candidates = [root / "val.txt", root / "meta_data" / "val.txt", val_dir / "val.txt"]
    candidates += [root / DEVKIT, root.parent / DEVKIT]
    return next((c for c in candidates if c.exists()), None)


def val_samples(
    root: Path, val_dir: Path, labels: str | Path | None, wnids: list[str] | None
) -> tuple[list[tuple[Path, int]], list[str]]:
    """Detect the val layout (class folders, or flat images plus val.txt / devkit) and read its samples."""
    dirs, images = list_dir(val_dir)
    classes = _label_space(root, wnids)
    if labels is None and dirs and not images:
        return folder_samples(val_dir, "ImageNet val", classes)
    if labels is None and dirs:
        raise InternViTError(
            f"{val_dir} mixes {len(dirs)} folders and {len(images)} loose images",
            fix="use one layout: val/<wnid>/ folders, or flat images plus a labels file",
        )
    if not images:
        raise InternViTError(
            f"{val_dir} is empty: expected val/<wnid>/ folders, or ILSVRC2012_val_*.JPEG files plus labels",
            fix="extract the ImageNet val images there",
        )
    labels = Path(labels) if labels is not None else _find_val_labels(root, val_dir)
    if labels is None:
        raise InternViTError(
            f"{val_dir} has {len(images)} files but no labels file: expected val/<wnid>/ folders, or a val.txt "
            f"({root}/val.txt) / devkit ground truth ({root}/{DEVKIT}/data/{DEVKIT_GROUND_TRUTH})",
            fix="pass labels=PATH (val.txt, the devkit folder, or its ground-truth file)",
        )
    if labels.name == DEVKIT_GROUND_TRUTH:
        labels = labels.parent.parent
    if labels.is_dir():
        devkit = labels / DEVKIT if (labels / DEVKIT).is_dir() else labels
        return _devkit_samples(devkit, images, classes)
    return _val_list_samples(labels, val_dir, images, classes)


def _val_list_samples(
    path: Path, val_dir: Path, images: list[Path], classes: list[str] | None
) -> tuple[list[tuple[Path, int]], list[str]]:
    entries = load_val_list(path)
    present = {p.name for p in images}
    missing = [name for name, _ in entries if name not in present and not (val_dir / name).is_file()]
    if missing:
        raise InternViTError(
            f"{len(missing)} image(s) named in {path} are missing from {val_dir}: {few(missing)}",
            fix="restore the images, or use the labels file that matches this val folder",
        )
    if len(entries) < len(images):
        log.warning("%s lists %d of the %d images in %s; using those listed", path, len(entries), len(images), val_dir)
    top = max(label for _, label in entries)
    if classes is None:  # no wnid list anywhere: assume the 1k label space the val list is written in
        log.warning("no train/ folder, wnids= or LOC_synset_mapping.txt near %s: classes are named by index", path)
        classes = [str(i) for i in range(max(top + 1, 1000))]
    if top >= len(classes):
        raise InternViTError(
            f"{path} has label {top}, beyond the {len(classes)} classes of this dataset",
            fix="use the labels file that matches the train/ folders (or wnids=)",
        )
    return [(val_dir / name, label) for name, label in entries], classes


def _devkit_samples(
    devkit: Path, images: list[Path], classes: list[str] | None
) -> tuple[list[tuple[Path, int]], list[str]]:
    id_to_wnid, ground_truth = load_devkit(devkit)
    classes = classes if classes is not None else sorted(id_to_wnid.values())
    index = {w: i for i, w in enumerate(classes)}
    samples = []
    for path in images:
        n = image_number(path)
        if n > len(ground_truth):
            raise InternViTError(
                f"{path.name} is val image {n}, but the devkit ground truth has {len(ground_truth)} lines",
                fix=f"use the full {DEVKIT} ground truth",
            )
        wnid = id_to_wnid[ground_truth[n - 1]]
        if wnid not in index:
            raise InternViTError(
                f"devkit class {wnid} (of {path.name}) is not in the {len(classes)}-class wnid list",
                fix="pass wnids= the IN-1K wnid list that matches the devkit",
            )
        samples.append((path, index[wnid]))
    return samples, classes
