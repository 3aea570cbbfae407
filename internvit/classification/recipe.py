"""The paper's probe training (docs/protocol.md §4.1) as a recipe for the engine's loop, resumable epoch by epoch.

Micro-batches -> Mixup/CutMix with smoothed targets -> frozen features (no grad) -> head loss; the loop accumulates
them to the global batch. Every source of randomness is reseeded per epoch and rank, so an epoch replays exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import nn

from internvit.classification.config import HeadConfig, TrainConfig
from internvit.engine.checkpoint import Stateful
from internvit.engine.data import TrainBatches
from internvit.engine.distributed import DistInfo, seed_everything
from internvit.engine.ema import ModelEma
from internvit.engine.mixup import Mixup, smoothed_one_hot, soft_target_cross_entropy
from internvit.engine.precision import autocast
from internvit.engine.schedule import StepScheduler
from internvit.errors import InternViTError

log = logging.getLogger(__name__)
Mix = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# Settings that may change between a run and its resumption without changing what is being trained.
RESUME_FREE_FIELDS = ("eval_every",)
LOG_EVERY = 10  # a metrics line every 10th optimizer step of each epoch, as the original's print_freq


def is_log_step(step: int, steps_per_epoch: int) -> bool:
    """The original logs at `idx % print_freq == 0` with idx the step's index within its epoch."""
    return (step % steps_per_epoch) % LOG_EVERY == 0


def accumulation_steps(global_batch: int, batch_size: int, world_size: int) -> int:
    """How many micro-batches make one step of `global_batch` images; a clear error when it does not divide."""
    per_step = batch_size * world_size
    accum, rest = divmod(global_batch, per_step)
    if rest or accum < 1:
        raise InternViTError(
            f"train.global_batch={global_batch} is not a multiple of batch_size x processes = {per_step}",
            fix="choose train.batch_size so that batch_size x processes divides train.global_batch",
        )
    return accum


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of every random stream of (epoch, rank)."""
    return seed + rank + 1000 * epoch


def new_mixup(train: TrainConfig, num_classes: int, seed: int) -> Mix:
    """Mixup/CutMix with smoothed targets, or (both switched off) smoothed one-hot targets alone."""
    if (train.mixup <= 0 and train.cutmix <= 0) or train.mixup_prob <= 0:
        return lambda x, y: (x, smoothed_one_hot(y, num_classes, train.label_smoothing).to(x.device))
    return Mixup(
        mixup_alpha=train.mixup,
        cutmix_alpha=train.cutmix,
        prob=train.mixup_prob,
        switch_prob=train.mixup_switch_prob,
        label_smoothing=train.label_smoothing,
        num_classes=num_classes,
        seed=seed,
    )


def run_signature(
    train: TrainConfig,
    head: HeadConfig,
    precision: str,
    *,
    backbone: dict,
    world_size: int,
    steps_per_epoch: int,
    accum: int,
) -> dict:
    """What must not change between a run and its resumption (the schedule depends on all of it; `backbone` is the
    backbone file's identity, so a head is never continued on other features)."""
    return {
        "backbone": backbone,
        "train": {k: v for k, v in asdict(train).items() if k not in RESUME_FREE_FIELDS},
        "head": asdict(head) | {"checkpoint": ""},
        "precision": precision,
        "world_size": world_size,
        "steps_per_epoch": steps_per_epoch,
        "accum": accum,
    }


def _micro_batch(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and targets on the device; an odd batch (skip_corrupt dropped an image) loses one more for mixup."""
    if batch is None:  # skip_corrupt dropped every image: all DDP ranks must take part in the step, so stop here
        raise InternViTError("every image of a training batch was undecodable", fix="remove the corrupt files")
    images, targets = batch[0], batch[1]
    if len(images) % 2 and len(images) > 1:
        images, targets = images[:-1], targets[:-1]
    return images.to(device, non_blocking=True), targets.to(device, non_blocking=True)


class ProbeRecipe:
    """The probe's `TrainTask`: frozen backbone features into a trainable head, with EMA and per-epoch records."""

    def __init__(
        self,
        *,
        backbone: nn.Module,
        head: nn.Module,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: StepScheduler,
        ema: ModelEma | None,
        batches: TrainBatches,
        train: TrainConfig,
        num_classes: int,
        precision: str,
        steps_per_epoch: int,
        accum: int,
        evaluate: Callable[..., list[dict]],  # evaluate(heads=...) -> result rows
        dist: DistInfo,
    ) -> None:
        self.backbone, self.head, self.model, self.ema = backbone, head, model, ema
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_settings, self.num_classes, self.precision = train, num_classes, precision
        self.steps_per_epoch, self.accum, self.dist = steps_per_epoch, accum, dist
        self._evaluate, self.mix = evaluate, None
        self.train_batches = batches

    def _on_epoch(self, epoch: int) -> None:
        seed = epoch_seed(self.train_settings.seed, self.dist.rank, epoch)
        seed_everything(seed)
        set_epoch = getattr(self.train_batches.dataset, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)
        self.mix = new_mixup(self.train_settings, self.num_classes, seed)

    def batches(self, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        per_epoch = self.steps_per_epoch * self.accum  # leftover micro-batches of an epoch are not used
        start = start_step * self.accum
        batches = self.train_batches.epochs(start, use_per_epoch=per_epoch, on_epoch=self._on_epoch)
        for micro, batch in enumerate(batches, start):
            if isinstance(self.mix, Mixup):  # its draws per (seed, rank, epoch, micro-batch): a resume replays them
                epoch, index = divmod(micro, per_epoch)
                seed = epoch_seed(self.train_settings.seed, self.dist.rank, epoch)
                self.mix.rng = np.random.RandomState((seed * 100_003 + index) % (1 << 32))
            yield self.mix(*_micro_batch(batch, self.dist.device))

    def begin_step(self, step: int) -> None:
        self.model.train()

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        images, soft = batch
        with torch.no_grad(), autocast(self.dist.device, self.precision):
            tokens = self.backbone.forward_features(images)
        with autocast(self.dist.device, self.precision):
            logits = self.model(tokens)
        return soft_target_cross_entropy(logits.float(), soft), {}, len(images)

    def after_step(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(self.head)

    def log_record(self, step: int, info: dict[str, float]) -> dict[str, Any] | None:
        if not is_log_step(step, self.steps_per_epoch):
            return None
        # the lr as the original prints it: after the schedule's update for this step (the rate of the next step)
        lr = self.optimizer.param_groups[-1]["lr"]
        keys = ("loss", "grad_norm", "img_s")
        return {"epoch": step // self.steps_per_epoch + 1, "step": step, "lr": lr, **{k: info[k] for k in keys}}

    def evaluate(self, done: int) -> dict[str, Any]:
        heads = {"head": self.head} | ({"ema": self.ema.module} if self.ema else {})
        out: dict[str, Any] = {}
        for row in self._evaluate(heads=heads):
            out[f"val_acc1_{row['head']}"] = row["acc1"]
            out[f"val_acc5_{row['head']}"] = row["acc5"]
        return out

    def summarize(self, done: int, train: dict[str, Any], evaluation: dict[str, Any] | None) -> dict[str, Any]:
        stats = {k: train[k] for k in ("train_loss", "train_images")}
        return {"epoch": done // self.steps_per_epoch, **stats, **(evaluation or {}), "seconds": train["seconds"]}

    def state_objects(self) -> Mapping[str, Stateful]:
        return {"head": self.head} | ({"ema": self.ema} if self.ema is not None else {})
