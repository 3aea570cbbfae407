"""The segmentation dataset a run's settings name: ADE20K, or any dataset in the generic folder layout."""

from __future__ import annotations

import dataclasses

from internvit.data.ade20k import ADE20K, ADE20K_CLASS_NAMES, ADE20K_PALETTE
from internvit.data.seg_transforms import TestPipeline
from internvit.data.segmentation import SegmentationFolder, SegPipeline, default_palette, read_classes_file
from internvit.engine.data import resolve_num_workers
from internvit.errors import InternViTError
from internvit.segmentation.config import SegDataConfig, SegEvalConfig, SegmentationConfig


def build_seg_dataset(data: SegDataConfig, split: str, pipeline: SegPipeline | None = None) -> SegmentationFolder:
    """ADE20K at data.root when data.classes is empty, else the generic layout with that classes file."""
    if not data.classes:
        return ADE20K(data.root, split, pipeline=pipeline)
    names, palette = read_classes_file(data.classes)
    return SegmentationFolder(
        data.root,
        split,
        class_names=names,
        palette=palette,
        reduce_zero_label=bool(data.reduce_zero_label),
        ignore_index=data.ignore_index,
        pipeline=pipeline,
    )


def test_pipeline(data: SegDataConfig, settings: SegEvalConfig) -> TestPipeline:
    """The test resize of the settings at each of eval.scales (uint8 out; normalised on the device)."""
    return TestPipeline(
        data.test_resize,
        short=data.test_short,
        scale=tuple(data.img_scale),
        scales=tuple(settings.scales),
        crop=data.crop,
    )


test_pipeline.__test__ = False  # not a pytest test


def build_val_set(data: SegDataConfig, settings: SegEvalConfig) -> SegmentationFolder:
    return build_seg_dataset(data, data.val_split, test_pipeline(data, settings))


def dataset_classes(data: SegDataConfig) -> tuple[list[str], list[tuple[int, int, int]]]:
    """The class names and RGB palette of the dataset the settings name (from its classes file; no images read)."""
    if not data.classes:
        return list(ADE20K_CLASS_NAMES), list(ADE20K_PALETTE)
    names, palette = read_classes_file(data.classes)
    return names, palette or default_palette(len(names))


def with_dataset_classes(cfg: SegmentationConfig) -> SegmentationConfig:
    """The settings with head.num_classes from the dataset (checked when set) and the loader workers resolved."""
    names, _ = dataset_classes(cfg.data)
    if cfg.head.num_classes is not None and cfg.head.num_classes != len(names):
        source = cfg.data.classes or "ADE20K"
        raise InternViTError(
            f"head.num_classes={cfg.head.num_classes} but the dataset ({source}) has {len(names)} classes",
            fix=f"leave head.num_classes unset (it follows the dataset) or set it to {len(names)}",
        )
    data = dataclasses.replace(cfg.data, num_workers=resolve_num_workers(cfg.data.num_workers))
    return dataclasses.replace(cfg, head=dataclasses.replace(cfg.head, num_classes=len(names)), data=data)
