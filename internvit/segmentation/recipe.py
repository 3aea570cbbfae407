"""Iteration-based segmentation training (docs/protocol.md §5.7) as a recipe for the engine's loop: exact mid-epoch
resume.

AdamW with layer decay and the poly schedule are built in run.py; this module supplies the few-shot subset, the
settings signature, and the step function (seeded per iteration and rank, so dropout and drop path replay on resume).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from internvit.data.seg_transforms import normalize_images
from internvit.data.segmentation import make_fewshot_subset, read_split_file, write_split_file
from internvit.engine.checkpoint import ShardedModelState, Stateful
from internvit.engine.data import TrainBatches
from internvit.engine.distributed import DistInfo, seed_everything
from internvit.engine.parallelize import is_sharded
from internvit.engine.schedule import StepScheduler
from internvit.segmentation.checkpoints import trainable_state
from internvit.segmentation.config import SegBackboneConfig, SegDataConfig, SegHeadConfig, SegTrainConfig
from internvit.segmentation.data import build_seg_dataset
from internvit.segmentation.segmentor import Segmentor

log = logging.getLogger(__name__)


def training_subset(data: SegDataConfig, *, run_dir: Path) -> tuple[Path | None, list[str] | None]:
    """The few-shot split file and its image names: `data.split_file` reused, or the seeded 1/k subset and the
    run-folder file it is to be written to (by `write_subset`, once the run is accepted); (None, None) for all."""
    fewshot, fewshot_seed = data.fewshot, data.fewshot_seed
    if data.split_file:
        return Path(data.split_file), read_split_file(data.split_file)
    if fewshot <= 1:
        return None, None
    dataset = build_seg_dataset(data, data.train_split)
    names = dataset.names
    subset = make_fewshot_subset(names, fewshot, fewshot_seed, suffix=dataset.images[0].suffix)
    log.info("few-shot 1/%d: %d of %d training images (seed %d)", fewshot, len(subset), len(names), fewshot_seed)
    return run_dir / f"fewshot_1of{fewshot}_seed{fewshot_seed}.txt", subset


def write_subset(path: Path | None, names: list[str] | None, *, reused: bool) -> None:
    """Write a new few-shot subset into the run folder (a reused split file stays where it is)."""
    if path is not None and names is not None and not reused:
        write_split_file(path, names)
        log.info("few-shot subset -> %s", path)


def run_signature(
    *,
    train: SegTrainConfig,
    head: SegHeadConfig,
    backbone: SegBackboneConfig,
    data: SegDataConfig,
    world_size: int | None,
    split_hash: str | None,
    backbone_identity: dict,
) -> dict:
    """What must not change between a run and its resumption (`backbone_identity`: the backbone file's)."""
    return {
        "backbone_file": backbone_identity,
        "train": {k: v for k, v in asdict(train).items() if k not in ("eval_every", "log_every")},
        "head": asdict(head) | {"checkpoint": ""},
        "backbone": asdict(backbone),
        "data": {k: v for k, v in asdict(data).items() if k != "num_workers"},
        "world_size": world_size,
        "split_hash": split_hash,
    }


class LossForward(nn.Module):
    """Routes forward() to Segmentor.loss, so DDP sees the training computation as the module's forward."""

    def __init__(self, segmentor: Segmentor) -> None:
        super().__init__()
        self.segmentor = segmentor

    def forward(self, img: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.segmentor.loss(img, label)


class TrainableState:
    """The segmentor's state a run saves and resumes: heads and FPN, plus the backbone when it is fine-tuned."""

    def __init__(self, segmentor: Segmentor, backbone_frozen: bool) -> None:
        self.segmentor, self.backbone_frozen = segmentor, backbone_frozen

    def state_dict(self) -> dict[str, torch.Tensor]:
        return trainable_state(self.segmentor, self.backbone_frozen)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.segmentor.load_state_dict(state, strict=False)


class SegmentationRecipe:
    """The segmentation `TrainTask`: segmentor losses per micro-batch, evaluation that keeps the best weights."""

    def __init__(
        self,
        *,
        segmentor: Segmentor,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: StepScheduler,
        batches: TrainBatches,
        pipeline_epoch: Callable[[int], None],
        accum: int,
        seed: int,
        backbone_frozen: bool,
        total_steps: int,
        log_every: int,
        evaluate: Callable[[], dict[str, Any]],
        save: Callable[[list[str], int], None],  # save(file stems, done): the weights gathered once
        split_hash: str | None,
        dist: DistInfo,
    ) -> None:
        self.segmentor, self.model, self.optimizer, self.scheduler = segmentor, model, optimizer, scheduler
        self.train_batches, self.pipeline_epoch = batches, pipeline_epoch
        self.accum, self.seed, self.backbone_frozen = accum, seed, backbone_frozen
        self.total_steps, self.log_every, self.dist = total_steps, log_every, dist
        self._evaluate, self._save, self.split_hash = evaluate, save, split_hash
        self.best: dict | None = None

    def batches(self, start_step: int) -> Iterator[dict[str, torch.Tensor]]:
        return self.train_batches.epochs(start_step * self.accum, on_epoch=self.pipeline_epoch)

    def begin_step(self, step: int) -> None:
        # dropout / drop path replay on resume; distinct streams for every (iteration, rank)
        seed_everything(self.seed * 1_000_003 + step * self.dist.world_size + self.dist.rank)
        self.segmentor.train()
        if self.backbone_frozen:
            self.segmentor.backbone.eval()

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        device = self.dist.device
        img = normalize_images(batch["img"].to(device, non_blocking=True), batch["valid_size"])
        label = batch["label"].to(device, non_blocking=True).long()
        losses = self.model(img, label)
        loss = losses.pop("loss")
        return loss, losses, len(img)

    def after_step(self, step: int) -> None:
        pass

    def log_record(self, step: int, info: dict[str, float]) -> dict[str, Any] | None:
        done = step + 1
        if done % self.log_every and done != self.total_steps:
            return None
        logged = {k: v for k, v in info.items() if k not in ("grad_norm", "img_s", "s_per_step")}
        return {"iter": done, **logged, "s_per_iter": info["s_per_step"]}

    def evaluate(self, done: int) -> dict[str, Any]:
        return self._evaluate()

    def summarize(self, done: int, train: dict[str, Any], evaluation: dict[str, Any] | None) -> dict[str, Any] | None:
        """An evaluation's record; the weights are saved as last.safetensors, and as best.safetensors on a new best."""
        if evaluation is None:
            return None
        record = {"iter": done, **evaluation, "split_hash": self.split_hash}
        names = ["last"]
        if self.best is None or evaluation["mIoU"] > self.best["mIoU"]:
            self.best = record
            names.insert(0, "best")
        self._save(names, done)
        return record

    def state_objects(self) -> Mapping[str, Stateful]:
        model = ShardedModelState(self.segmentor) if is_sharded(self.segmentor) else None
        return {"model": model or TrainableState(self.segmentor, self.backbone_frozen), "recipe": self}

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]
