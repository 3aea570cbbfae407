"""A custom classification dataset: any `train/<class>/*` + `val/<class>/*` image tree with its own class list.

Layout (root = `data.custom`)::

    root/
      classes.txt          optional: the class list (below)
      train/<class>/*      images: any of IMG_EXTENSIONS, in any letter case (.jpg, .JPEG, .png, ...)
      val/<class>/*

The class list, whose order gives the class indices (the head's logits):

* a classes file (`classes.txt` in the root, or any path as `classes_file=`): UTF-8 text, one class per line,
  either `<folder>` or `<folder><TAB><display name>`; the folder is the class folder's name under train/ and val/
  (it may hold spaces), the display name is what `internvit classify` prints (default: the folder name). Blank
  lines and lines starting with `#` are skipped; surrounding whitespace is ignored. Example::

      # folder<TAB>display name
      cat	Domestic cat
      dog
      red_fox	Red fox

* without one: the sorted folder names of train/.

Every train/ class folder must be in the list, and every listed class needs train images; val/ folders outside the
list are an error, and a val split that lacks some classes is scored with a warning naming them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from internvit.data.imagenet import ImageClassificationDataset
from internvit.data.imagenet_meta import few, list_dir, require_dir, scan_class_folders
from internvit.errors import InternViTError

log = logging.getLogger(__name__)

CLASSES_FILE = "classes.txt"
SPLITS = ("train", "val")


def load_classes_file(path: str | Path) -> tuple[list[str], list[str]]:
    """Read a classes file (`<folder>` or `<folder><TAB><display name>` per line) into (folders, display names)."""
    path = Path(path)
    if not path.is_file():
        raise InternViTError(
            f"classes file not found: {path}", fix="check data.custom_classes, or leave it empty to use the folders"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InternViTError(f"cannot read the classes file {path} ({e})", fix="write it as UTF-8 text") from e
    folders: list[str] = []
    names: list[str] = []
    seen: dict[str, int] = {}
    for num, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        folder, _, name = (part.strip() for part in line.partition("\t"))
        if not folder:
            raise InternViTError(
                f"{path} line {num} is {line!r}: no folder name before the tab",
                fix="write one class per line: <folder> or <folder><TAB><display name>",
            )
        if folder in seen:
            raise InternViTError(
                f"{path} lists class {folder!r} twice (lines {seen[folder]} and {num})",
                fix="list every class folder once",
            )
        seen[folder] = num
        folders.append(folder)
        names.append(name or folder)
    if not folders:
        raise InternViTError(f"classes file {path} lists no classes", fix="write one class folder name per line")
    return folders, names


def custom_classes(root: str | Path, classes_file: str | Path | None = None) -> tuple[list[str], list[str]]:
    """The class list of a custom tree: the classes file (given, else root/classes.txt), else sorted train/ folders."""
    root = Path(root)
    require_dir(root, "custom dataset", fix="set data.custom to the folder holding train/ and val/")
    path = Path(classes_file) if classes_file else root / CLASSES_FILE
    if classes_file or path.is_file():
        return load_classes_file(path)
    train = root / "train"
    if not train.is_dir():
        raise InternViTError(
            f"{root} has neither a {CLASSES_FILE} nor a train/ folder to take the class list from",
            fix=f"add {root / CLASSES_FILE} (one class folder name per line), or set data.custom_classes=PATH",
        )
    folders = [d.name for d in list_dir(train)[0]]
    if not folders:
        raise InternViTError(
            f"{train} has no class folders: expected {train}/<class>/<image>",
            fix="put the training images in one sub-folder per class",
        )
    return folders, list(folders)


class CustomSplit(ImageClassificationDataset):
    """The train or val split of a custom `train/<class>/*` + `val/<class>/*` tree (see the module docstring)."""

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        *,
        classes_file: str | Path | None = None,
        transform: Callable | None = None,
        skip_corrupt: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise InternViTError(f"unknown custom dataset split {split!r}", fix="use split='train' or split='val'")
        root = Path(root)
        classes, names = custom_classes(root, classes_file)
        folder = root / split
        if not folder.is_dir():
            found = few(sorted(p.name for p in root.iterdir())) or "nothing"
            raise InternViTError(
                f"custom dataset {root} has no {split}/ folder (found: {found})",
                fix=f"put the {split} images in {folder}/<class>/ (the layout is train/<class>/* and val/<class>/*)",
            )
        samples = _split_samples(folder, split, classes)
        self.root = root
        super().__init__(
            samples,
            classes,
            name=f"{root.resolve().name}-{split}",
            class_names=names,
            transform=transform,
            skip_corrupt=skip_corrupt,
        )


def _split_samples(folder: Path, split: str, classes: list[str]) -> list[tuple[Path, int]]:
    """The (image, class index) samples of train/ or val/, checking its class folders against the class list."""
    loose = list_dir(folder)[1]
    if loose:
        raise InternViTError(
            f"{len(loose)} image(s) lie directly in {folder}, outside any class folder: {few([p.name for p in loose])}",
            fix=f"move them into {folder}/<class>/",
        )
    folders = scan_class_folders(folder, f"custom {split} split")
    index = {c: i for i, c in enumerate(classes)}
    unknown = [name for name, _ in folders if name not in index]
    if unknown:
        raise InternViTError(
            f"{len(unknown)} class folder(s) of {folder} are not in the {len(classes)}-class list "
            f"({few(classes, 3)}): {few(unknown)}",
            fix="add them to the classes file (classes.txt), rename them to listed classes, or remove them",
        )
    present = {name for name, _ in folders}
    missing = [c for c in classes if c not in present]
    if missing and split == "train":
        raise InternViTError(
            f"{len(missing)} listed class(es) have no folder in {folder}: {few(missing)}",
            fix="add their training images, or remove them from the classes file",
        )
    if missing:
        log.warning("%s has no images of %d of the %d classes: %s", folder, len(missing), len(classes), few(missing))
    return [(p, index[name]) for name, files in folders for p in files]
