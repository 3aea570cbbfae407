"""ADE20K (ADEChallengeData2016, docs/protocol.md §5.1): the 150 classes, their palette, the release's layout.

`ADE20K` is the generic `SegmentationFolder` with mmseg's ADE20K settings: *.jpg images, raw labels 0 ("other",
ignored) to 150 reduced to 0..149 (reduce_zero_label), splits "training" and "validation".
"""

from __future__ import annotations

from pathlib import Path

from internvit.data.imagenet_meta import few
from internvit.data.segmentation import SegmentationFolder, SegPipeline
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


class ADE20K(SegmentationFolder):
    """ADEChallengeData2016 images/<split>/*.jpg with annotations/<split>/*.png, sorted by file name."""

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
        super().__init__(
            find_ade_root(root),
            split,
            class_names=ADE20K_CLASS_NAMES,
            palette=ADE20K_PALETTE,
            reduce_zero_label=True,
            ignore_index=IGNORE_INDEX,
            pipeline=pipeline,
            subset_file=subset_file,
            image_suffixes=(".jpg",),
            what=LAYOUT_DIR,
        )
