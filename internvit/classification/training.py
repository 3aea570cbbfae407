"""The paper's probe training (REFERENCE §4.1) assembled from engine pieces, resumable epoch by epoch."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from internvit.classification.config import ClassificationConfig
from internvit.classification.evaluate import evaluate_sets
from internvit.data import build_eval_transform, build_train_transform
from internvit.data.imagenet import build_dataset, collate_skip_none
from internvit.engine.checkpoint import find_resume_checkpoint, load_checkpoint, save_checkpoint
from internvit.engine.distributed import DistInfo, barrier, broadcast_object, seed_everything
from internvit.engine.ema import ModelEma
from internvit.engine.loop import TrainStep, append_jsonl, build_loader, train_one_epoch
from internvit.engine.mixup import Mixup, smoothed_one_hot, soft_target_cross_entropy
from internvit.engine.schedule import StepScheduler, cosine_lr
from internvit.errors import InternViTError

log = logging.getLogger(__name__)
Mix = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# Settings that may change between a run and its resumption without changing what is being trained.
RESUME_FREE_FIELDS = ("eval_every",)


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


class Trainer:
    """Owns the trainable state (head, optimizer, schedule, EMA, scaler) and runs the epochs."""

    def __init__(
        self, cfg: ClassificationConfig, *, backbone: nn.Module, head: nn.Module, dist: DistInfo, run_dir: Path
    ) -> None:
        t = cfg.train
        self.cfg, self.backbone, self.head, self.dist, self.run_dir = cfg, backbone, head, dist, run_dir
        self.accum = accumulation_steps(t.global_batch, t.batch_size, dist.world_size)
        # lr, warmup lr and min lr all scale with the global batch (REFERENCE §4.1)
        self.lr_scale = t.global_batch / t.lr_ref_batch
        self.lr = t.base_lr * self.lr_scale
        log.info(
            "global batch %d = %d per process x %d process(es) x %d accumulation step(s); lr = %g x %d / %d = %g",
            *(t.global_batch, t.batch_size, dist.world_size, self.accum, t.base_lr, t.global_batch, t.lr_ref_batch),
            self.lr,
        )
        self._build_data()
        self.ddp_head = self._wrap(head)
        self._build_optimisation()
        self.start_epoch, self.history = 0, []

    def _build_data(self) -> None:
        cfg = self.cfg
        self.train_set = build_dataset(
            "in1k",
            cfg.data.imagenet,
            split="train",
            transform=build_train_transform(self.backbone.config.img_size),
            skip_corrupt=cfg.data.skip_corrupt,
        )
        if self.train_set.num_classes != cfg.head.num_classes:
            raise InternViTError(
                f"the training set has {self.train_set.num_classes} classes but head.num_classes="
                f"{cfg.head.num_classes}",
                fix="set head.num_classes to match",
            )
        self.class_names, self.wnids = list(self.train_set.class_names), list(self.train_set.classes)
        collate = collate_skip_none if cfg.data.skip_corrupt else None
        self.loader = build_loader(
            self.train_set,
            batch_size=cfg.train.batch_size,
            dist=self.dist,
            train=True,
            seed=cfg.train.seed,
            num_workers=cfg.data.num_workers,
            collate_fn=collate,
        )
        self.steps_per_epoch = len(self.loader) // self.accum
        if self.steps_per_epoch < 1:
            raise InternViTError(
                f"{len(self.train_set)} training images give no full step of {cfg.train.global_batch}",
                fix="lower train.global_batch",
            )

    def _build_optimisation(self) -> None:
        t = self.cfg.train
        params = [p for p in self.head.parameters() if p.requires_grad]  # a frozen clip_projector stays out
        self.optimizer = torch.optim.SGD(
            params, lr=self.lr, momentum=t.momentum, nesterov=t.nesterov, weight_decay=t.weight_decay
        )
        schedule = functools.partial(
            cosine_lr,
            base_lr=self.lr,
            total_steps=t.epochs * self.steps_per_epoch,
            warmup_steps=t.warmup_epochs * self.steps_per_epoch,
            warmup_lr=t.warmup_lr * self.lr_scale,
            min_lr=t.min_lr * self.lr_scale,
        )
        self.scheduler = StepScheduler(self.optimizer, schedule, lag_one_step=t.lr_lag_one_step)
        self.scaler = torch.amp.GradScaler(self.dist.device.type, enabled=t.amp == "fp16")
        self.ema = ModelEma(self.head, decay=t.ema_decay) if t.ema else None

    def _epoch_seed(self, epoch: int) -> int:
        """Every source of randomness is reseeded per epoch and rank, so an epoch replays exactly after a resume."""
        return self.cfg.train.seed + self.dist.rank + 1000 * epoch

    def _new_mixup(self, epoch: int) -> Mix:
        """Mixup/CutMix with smoothed targets, or (both switched off) smoothed one-hot targets alone."""
        t, num_classes = self.cfg.train, self.cfg.head.num_classes
        if (t.mixup <= 0 and t.cutmix <= 0) or t.mixup_prob <= 0:
            return lambda x, y: (x, smoothed_one_hot(y, num_classes, t.label_smoothing).to(x.device))
        return Mixup(
            mixup_alpha=t.mixup,
            cutmix_alpha=t.cutmix,
            prob=t.mixup_prob,
            switch_prob=t.mixup_switch_prob,
            label_smoothing=t.label_smoothing,
            num_classes=num_classes,
            seed=self._epoch_seed(epoch),
        )

    def _wrap(self, head: nn.Module) -> nn.Module:
        if not self.dist.distributed:
            return head
        if self.cfg.train.sync_bn and self.dist.device.type == "cuda":
            self.head = head = nn.SyncBatchNorm.convert_sync_batchnorm(head)
        elif self.cfg.train.sync_bn:
            log.warning("SyncBatchNorm needs GPUs: on CPU each process normalises with its own batch statistics")
        ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        return DistributedDataParallel(head, device_ids=ids, broadcast_buffers=False)

    def _run_signature(self) -> dict:
        """What must not change between a run and its resumption (the schedule depends on all of it)."""
        train = {k: v for k, v in asdict(self.cfg.train).items() if k not in RESUME_FREE_FIELDS}
        return {
            "train": train,
            "head": asdict(self.cfg.head) | {"checkpoint": ""},
            "world_size": self.dist.world_size,
            "steps_per_epoch": self.steps_per_epoch,
            "accum": self.accum,
        }

    def state_dict(self, epoch: int) -> dict:
        return {
            "epoch": epoch,
            "head": self.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "history": self.history,
            "signature": self._run_signature(),
        }

    def resume(self) -> None:
        """Rank 0 reads the run folder's checkpoint and hands it to every rank, so all ranks resume alike."""
        state = None
        if self.dist.is_main:
            path = find_resume_checkpoint(self.run_dir)
            state = load_checkpoint(path) if path else None
        state = broadcast_object(state)
        if state is None:
            return
        if state.get("signature") != self._run_signature():
            raise InternViTError(
                f"{self.run_dir} holds a run with other settings (train/head settings, processes or data size differ)",
                fix="rerun with the settings in its config.yaml, or choose a new output_dir",
            )
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.start_epoch, self.history = state["epoch"] + 1, list(state["history"])
        log.info("resumed from %s: epoch %d of %d done", self.run_dir, self.start_epoch, self.cfg.train.epochs)

    def _on_step(self, epoch: int, step: int, info: dict) -> None:
        global_step = epoch * self.steps_per_epoch + step
        self.scheduler.step_update(global_step)
        if self.ema is not None:
            self.ema.update(self.head)
        if global_step % 10 == 0 and self.dist.is_main:
            append_jsonl(self.run_dir / "metrics.jsonl", {"epoch": epoch + 1, "step": global_step, **info})

    def _train_epoch(self, epoch: int) -> dict:
        t = self.cfg.train
        seed_everything(self._epoch_seed(epoch))
        self.loader.sampler.set_epoch(epoch)
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{t.epochs}", disable=not self.dist.is_main)

        def on_step(step: int, info: dict) -> None:
            self._on_step(epoch, step, info)
            bar.update(1)
            img_s = info["img_s"] * self.dist.world_size
            bar.set_postfix(loss=f"{info['loss']:.3f}", lr=f"{info['lr']:.4f}", img_s=f"{img_s:.0f}")

        stats = train_one_epoch(
            backbone=self.backbone,
            head=self.ddp_head,
            loader=self.loader,
            optimizer=self.optimizer,
            on_step=on_step,
            mix=self._new_mixup(epoch),
            loss_fn=soft_target_cross_entropy,
            scaler=self.scaler,
            settings=TrainStep(self.accum, t.clip_grad, t.amp, self.dist.device),
        )
        bar.close()
        return stats

    def _evaluate(self) -> list[dict]:
        heads = {"head": self.head} | ({"ema": self.ema.module} if self.ema else {})
        return evaluate_sets(
            backbone=self.backbone,
            heads=heads,
            sets=["in1k"],
            data=self.cfg.data,
            transform=build_eval_transform(self.backbone.config.img_size),
            dist=self.dist,
            batch_size=self.cfg.eval.batch_size,
            amp=self.cfg.train.amp,
            wnids=self.wnids,
        )

    def fit(self) -> dict:
        self.resume()
        t = self.cfg.train
        for epoch in range(self.start_epoch, t.epochs):
            start = time.perf_counter()
            record = {"epoch": epoch + 1, **self._train_epoch(epoch)}
            if (epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs:
                for row in self._evaluate():
                    record[f"val_acc1_{row['head']}"] = row["acc1"]
                    record[f"val_acc5_{row['head']}"] = row["acc5"]
            record["seconds"] = round(time.perf_counter() - start, 2)
            self.history.append(record)
            log.info("epoch %d: %s", epoch + 1, record)
            if self.dist.is_main:
                append_jsonl(self.run_dir / "metrics.jsonl", record)
                save_checkpoint(self.run_dir, self.state_dict(epoch))
            barrier()
        return {"history": self.history, "lr": self.lr, "accum_steps": self.accum}
