"""Segmentation evaluation: slide inference on every validation image once across ranks, mmseg's mIoU accumulation.

Images arrive as uint8 from DataLoader workers (one image per batch: test images differ in size) and are
normalised on the device; `eval.scales` / `eval.flip` add mmseg's multi-scale + flip test-time augmentation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from internvit.data.seg_transforms import normalize_images
from internvit.data.segmentation import SegmentationFolder
from internvit.engine.data import build_eval_loader
from internvit.engine.distributed import DistInfo, all_gather_objects
from internvit.engine.progress import progress
from internvit.segmentation.config import SegEvalConfig
from internvit.segmentation.metrics import MIoUAccumulator
from internvit.segmentation.segmentor import Segmentor, predict

log = logging.getLogger(__name__)


def first_item(batch: list[dict]) -> dict:
    """Collate for batches of one item: the item itself."""
    return batch[0]


def device_views(img: torch.Tensor | Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The uint8 CHW test view(s) of one image as normalised (1, C, H, W) float32 batches on `device`."""
    views = [img] if isinstance(img, torch.Tensor) else list(img)
    return [normalize_images(view.unsqueeze(0).to(device, non_blocking=True)) for view in views]


@torch.no_grad()
def evaluate_segmentor(
    segmentor: Segmentor,
    dataset: SegmentationFolder,
    *,
    settings: SegEvalConfig,
    num_classes: int,
    dist: DistInfo,
    num_workers: int = 0,
) -> MIoUAccumulator:
    """Dataset-level histograms summed over every image exactly once (rank r scores images r, r + world, ...)."""
    was_training = segmentor.training
    segmentor.eval()
    acc = MIoUAccumulator(num_classes, dataset.ignore_index)
    loader = build_eval_loader(dataset, batch_size=1, dist=dist, num_workers=num_workers, collate_fn=first_item)
    for item in progress(loader, desc=f"eval {dataset.split}", unit="img", disable=not dist.is_main, leave=False):
        pred = predict(
            segmentor,
            device_views(item["img"], dist.device),
            item["ori_size"],
            num_classes=num_classes,
            crop=settings.crop,
            stride=settings.stride,
            flip=settings.flip,
        )
        acc.update(pred.cpu(), item["label"])
    segmentor.train(was_training)
    states = all_gather_objects(acc.state_dict())
    parts = []
    for state in states:
        part = MIoUAccumulator(num_classes, dataset.ignore_index)
        part.load_state_dict(state)
        parts.append(part)
    return MIoUAccumulator.merge(parts)


def result_rows(
    acc: MIoUAccumulator, *, class_names: Sequence[str], setting: str, paper: float | None, extra: dict
) -> tuple[list, list]:
    """The summary row (beside the paper's mIoU) and the per-class table, with the dataset's class names."""
    summary = {"setting": setting, **acc.summary(), "num_images": acc.num_images, "paper_mIoU": paper, **extra}
    return [summary], acc.per_class(list(class_names))
