"""Iteration-based ADE20K training (REFERENCE §5.7): AdamW with layer decay, poly schedule, exact resume."""

from __future__ import annotations

import functools
import logging
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from internvit.data.ade20k import ADE20K, make_fewshot_subset, read_split_file, split_hash, write_split_file
from internvit.data.seg_transforms import TrainPipeline
from internvit.engine.checkpoint import find_resume_checkpoint, load_checkpoint, save_checkpoint
from internvit.engine.distributed import DistInfo, all_gather_objects, barrier, broadcast_object, seed_everything
from internvit.engine.loop import append_jsonl
from internvit.engine.optim import build_adamw
from internvit.engine.schedule import StepScheduler, poly_lr
from internvit.errors import InternViTError
from internvit.segmentation.build import trainable_state
from internvit.segmentation.config import SegmentationConfig
from internvit.segmentation.evaluate import build_val_set, evaluate_segmentor
from internvit.segmentation.segmentor import Segmentor

log = logging.getLogger(__name__)


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start part-way into an epoch (the samples a resumed run already consumed)."""

    start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return super().__len__() - self.start


def training_subset(cfg: SegmentationConfig, run_dir: Path) -> tuple[Path | None, str | None]:
    """The few-shot split file (written once from the seed, or reused) and its hash; (None, None) for all images."""
    data = cfg.data
    if data.split_file:
        names = read_split_file(data.split_file)
        return Path(data.split_file), split_hash(names)
    if data.fewshot <= 1:
        return None, None
    names = ADE20K(data.root, "training").names
    subset = make_fewshot_subset(names, data.fewshot, data.fewshot_seed)
    path = run_dir / f"fewshot_1of{data.fewshot}_seed{data.fewshot_seed}.txt"
    write_split_file(path, subset)
    log.info(
        "few-shot 1/%d: %d of %d training images (seed %d) -> %s",
        data.fewshot,
        len(subset),
        len(names),
        data.fewshot_seed,
        path,
    )
    return path, split_hash(subset)


class SegTrainer:
    """Owns the segmentor's trainable state and runs the iterations; checkpoints every `save_every` iterations."""

    def __init__(self, cfg: SegmentationConfig, *, segmentor: Segmentor, dist: DistInfo, run_dir: Path) -> None:
        t = cfg.train
        self.cfg, self.segmentor, self.dist, self.run_dir = cfg, segmentor, dist, run_dir
        per_step = t.batch_size * dist.world_size
        if t.global_batch % per_step:
            raise InternViTError(
                f"train.global_batch={t.global_batch} is not a multiple of batch_size x processes = {per_step}",
                fix="choose train.batch_size to divide train.global_batch",
            )
        self.accum = t.global_batch // per_step
        split_file, self.split_hash = training_subset(cfg, run_dir) if dist.is_main else (None, None)
        split_file, self.split_hash = broadcast_object((split_file, self.split_hash))
        self.pipeline = TrainPipeline(cfg.data.crop, t.seed, img_scale=tuple(cfg.data.img_scale))
        self.train_set = ADE20K(cfg.data.root, "training", pipeline=self.pipeline, subset_file=split_file)
        self.sampler = ResumableSampler(
            self.train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=t.seed, drop_last=True
        )
        if len(self.sampler) < t.batch_size:
            raise InternViTError(
                f"{len(self.train_set)} training images are fewer than one batch per process",
                fix="lower train.batch_size",
            )
        self.optimizer = build_adamw(
            segmentor,
            base_lr=t.lr,
            weight_decay=t.weight_decay,
            layer_decay=t.layer_decay,
            num_blocks=len(segmentor.backbone.blocks),
            quirk_decay_pos_embed=t.decay_pos_embed,
        )
        schedule = functools.partial(poly_lr, base_lr=t.lr, total_steps=t.iters, warmup_steps=t.warmup_iters)
        self.scheduler = StepScheduler(self.optimizer, schedule, lag_one_step=False)  # mmcv: f(t) before iter t
        self.model = self._wrap(segmentor)
        self.start_iter, self.best, self.history = 0, None, []

    def _wrap(self, segmentor: Segmentor) -> nn.Module:
        if not self.dist.distributed:
            return LossForward(segmentor)
        if self.dist.device.type == "cuda":
            for name in ("decode_head", "auxiliary_head", "fpn"):
                if getattr(segmentor, name) is not None:
                    setattr(segmentor, name, nn.SyncBatchNorm.convert_sync_batchnorm(getattr(segmentor, name)))
        ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        return DistributedDataParallel(LossForward(segmentor), device_ids=ids, broadcast_buffers=False)

    def _signature(self) -> dict:
        return {
            "train": {k: v for k, v in asdict(self.cfg.train).items() if k not in ("eval_every", "log_every")},
            "head": asdict(self.cfg.head) | {"checkpoint": ""},
            "backbone": asdict(self.cfg.backbone),
            "data": {k: v for k, v in asdict(self.cfg.data).items() if k != "num_workers"},
            "world_size": self.dist.world_size,
            "split_hash": self.split_hash,
        }

    def _loader(self, epoch: int, start: int) -> DataLoader:
        self.sampler.set_epoch(epoch)
        self.sampler.start = start
        self.pipeline.set_epoch(epoch)
        return DataLoader(
            self.train_set,
            batch_size=self.cfg.train.batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=self.cfg.data.num_workers,
            pin_memory=self.dist.device.type == "cuda",
            # its own generator: creating the iterator must not consume the global stream (a resumed run creates
            # one mid-epoch, where the uninterrupted run did not)
            generator=torch.Generator().manual_seed(self.cfg.train.seed + epoch),
        )

    def _batches(self, start_iter: int):
        """Micro-batches from iteration `start_iter` on, epoch after epoch, in the order an uninterrupted run sees."""
        per_epoch = len(self.sampler) // self.cfg.train.batch_size
        consumed = start_iter * self.accum
        epoch, offset = divmod(consumed, per_epoch)
        while True:
            yield from self._loader(epoch, offset * self.cfg.train.batch_size)
            epoch, offset = epoch + 1, 0

    def state_dict(self, iteration: int) -> dict:
        return {
            "iter": iteration,
            "model": trainable_state(self.segmentor, self.cfg.backbone.frozen),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "best": self.best,
            "history": self.history,
            "signature": self._signature(),
        }

    def resume(self) -> None:
        """Every rank reads the run folder's checkpoint (memory-mapped; the folder must be on a shared filesystem)."""
        path = find_resume_checkpoint(self.run_dir)
        if len(set(all_gather_objects(path is not None))) > 1:
            raise InternViTError(
                f"only some processes see {self.run_dir}/checkpoint.pth",
                fix="put output_dir on a filesystem that every node shares",
            )
        if path is None:
            return
        state = load_checkpoint(path)
        if state["signature"] != self._signature():
            raise InternViTError(
                f"{self.run_dir} holds a run with other settings",
                fix="rerun with the settings in its config.yaml, or choose a new output_dir",
            )
        self.segmentor.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_iter, self.best, self.history = state["iter"], state["best"], list(state["history"])
        log.info("resumed from %s at iteration %d of %d", self.run_dir, self.start_iter, self.cfg.train.iters)

    def _step(self, iteration: int, batches) -> dict[str, float]:
        """One optimizer step over `accum` micro-batches; the lr in use is poly(iteration) (mmcv's order)."""
        # dropout / drop path replay on resume; distinct streams for every (iteration, rank)
        seed_everything(self.cfg.train.seed * 1_000_003 + iteration * self.dist.world_size + self.dist.rank)
        self.segmentor.train()
        if self.cfg.backbone.frozen:
            self.segmentor.backbone.eval()
        logs: dict[str, float] = {"lr": self.optimizer.param_groups[-1]["lr"]}
        for micro in range(self.accum):
            batch = next(batches)
            img, label = batch["img"].to(self.dist.device), batch["label"].to(self.dist.device)
            sync = micro == self.accum - 1
            with nullcontext() if sync or not hasattr(self.model, "no_sync") else self.model.no_sync():
                losses = self.model(img, label)
                (losses["loss"] / self.accum).backward()
            for key, value in losses.items():
                logs[key] = logs.get(key, 0.0) + value.item() / self.accum
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step_update(iteration)
        return logs

    def evaluate(self) -> dict:
        dataset = build_val_set(self.cfg.data)
        acc = evaluate_segmentor(
            self.segmentor, dataset, settings=self.cfg.eval, num_classes=self.cfg.head.num_classes, dist=self.dist
        )
        return acc.summary()

    def fit(self) -> dict:
        self.resume()
        t = self.cfg.train
        batches = self._batches(self.start_iter)
        bar = tqdm(total=t.iters, initial=self.start_iter, desc="train", disable=not self.dist.is_main)
        start = time.perf_counter()
        for iteration in range(self.start_iter, t.iters):
            logs = self._step(iteration, batches)
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.3f}", lr=f"{logs['lr']:.2e}")
            done = iteration + 1
            if self.dist.is_main and (done % t.log_every == 0 or done == t.iters):
                append_jsonl(
                    self.run_dir / "metrics.jsonl",
                    {"iter": done, **logs, "s_per_iter": (time.perf_counter() - start) / (done - self.start_iter)},
                )
            if done % t.eval_every == 0 or done == t.iters:
                self._evaluate_and_keep_best(done)
            if done % t.save_every == 0 or done == t.iters:
                if self.dist.is_main:
                    save_checkpoint(self.run_dir, self.state_dict(done))
                barrier()
        bar.close()
        return {"history": self.history, "best": self.best, "split_hash": self.split_hash}

    def _evaluate_and_keep_best(self, done: int) -> None:
        from internvit.segmentation.run import save_segmentor

        summary = self.evaluate()
        record = {"iter": done, **summary, "split_hash": self.split_hash}
        self.history.append(record)
        log.info("iteration %d: %s", done, summary)
        if self.dist.is_main:
            append_jsonl(self.run_dir / "metrics.jsonl", record)
            if self.best is None or summary["mIoU"] > self.best["mIoU"]:
                self.best = record
                save_segmentor(self.segmentor, self.cfg, self.run_dir / "best.safetensors", extra={"iter": done})
            save_segmentor(self.segmentor, self.cfg, self.run_dir / "last.safetensors", extra={"iter": done})


class LossForward(nn.Module):
    """Routes forward() to Segmentor.loss, so DDP sees the training computation as the module's forward."""

    def __init__(self, segmentor: Segmentor) -> None:
        super().__init__()
        self.segmentor = segmentor

    def forward(self, img: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.segmentor.loss(img, label)
