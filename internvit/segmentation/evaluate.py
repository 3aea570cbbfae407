"""ADE20K evaluation: slide inference on every validation image once across ranks, mmseg's mIoU accumulation."""

from __future__ import annotations

import logging

import torch
from tqdm import tqdm

from internvit.data.ade20k import ADE20K, ADE20K_CLASS_NAMES
from internvit.data.seg_transforms import TestPipeline
from internvit.engine.data import ShardSampler
from internvit.engine.distributed import DistInfo, all_gather_objects
from internvit.segmentation.config import SegDataConfig, SegEvalConfig
from internvit.segmentation.metrics import MIoUAccumulator
from internvit.segmentation.segmentor import Segmentor, predict

log = logging.getLogger(__name__)


def build_val_set(data: SegDataConfig) -> ADE20K:
    pipeline = TestPipeline(data.test_resize, short=data.test_short, scale=tuple(data.img_scale))
    return ADE20K(data.root, "validation", pipeline=pipeline)


@torch.no_grad()
def evaluate_segmentor(
    segmentor: Segmentor, dataset: ADE20K, *, settings: SegEvalConfig, num_classes: int, dist: DistInfo
) -> MIoUAccumulator:
    """Dataset-level histograms summed over every image exactly once (rank r scores images r, r + world, ...)."""
    was_training = segmentor.training
    segmentor.eval()
    acc = MIoUAccumulator(num_classes)
    indices = list(ShardSampler(len(dataset), dist.rank, dist.world_size))
    for index in tqdm(indices, desc="eval ADE20K", unit="img", disable=not dist.is_main, leave=False):
        item = dataset[index]
        img = item["img"].unsqueeze(0).to(dist.device)
        pred = predict(
            segmentor, img, item["ori_size"], num_classes=num_classes, crop=settings.crop, stride=settings.stride
        )
        acc.update(pred.cpu(), item["label"])
    segmentor.train(was_training)
    states = all_gather_objects(acc.state_dict())
    parts = []
    for state in states:
        part = MIoUAccumulator(num_classes)
        part.load_state_dict(state)
        parts.append(part)
    return MIoUAccumulator.merge(parts)


def result_rows(acc: MIoUAccumulator, *, setting: str, paper: float | None, extra: dict) -> tuple[list, list]:
    """The summary row (beside the paper's mIoU) and the per-class table."""
    summary = {"setting": setting, **acc.summary(), "num_images": acc.num_images, "paper_mIoU": paper, **extra}
    names = (
        ADE20K_CLASS_NAMES if acc.num_classes == len(ADE20K_CLASS_NAMES) else [str(i) for i in range(acc.num_classes)]
    )
    return [summary], acc.per_class(names)
