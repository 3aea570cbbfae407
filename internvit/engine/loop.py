"""Training and evaluation loops over a frozen backbone and a trainable head (DDP on the head only)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from internvit.engine.distributed import DistInfo, all_gather_objects
from internvit.errors import InternViTError

log = logging.getLogger(__name__)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, ...: every sample on exactly one rank, no padding (exact distributed scores)."""

    def __init__(self, num_samples: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, num_samples, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    dist: DistInfo,
    train: bool,
    seed: int = 0,
    num_workers: int = 0,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """Train: shuffled per epoch from `seed` (set_epoch), full batches only. Eval: exact shards, nothing dropped."""
    if train:
        sampler: Sampler[int] = DistributedSampler(
            dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed, drop_last=True
        )
    else:
        sampler = ShardSampler(len(dataset), dist.rank, dist.world_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=dist.device.type == "cuda",
        drop_last=train,
        collate_fn=collate_fn,
        persistent_workers=False,
    )


def autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@dataclass
class TrainStep:
    """One optimisation step's settings, fixed for a run."""

    accum_steps: int
    clip_grad: float
    amp: str
    device: torch.device


def _micro_batch(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and targets on the device; an odd batch (skip_corrupt dropped an image) loses one more for mixup."""
    if batch is None:  # skip_corrupt dropped every image: all DDP ranks must take part in the step, so stop here
        raise InternViTError("every image of a training batch was undecodable", fix="remove the corrupt files")
    images, targets = batch[0], batch[1]
    if len(images) % 2 and len(images) > 1:
        images, targets = images[:-1], targets[:-1]
    return images.to(device, non_blocking=True), targets.to(device, non_blocking=True)


def train_one_epoch(
    *,
    backbone: nn.Module,
    head: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    on_step: Callable[[int, dict], None],
    mix: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scaler: torch.amp.GradScaler,
    settings: TrainStep,
) -> dict[str, float]:
    """Micro-batches -> mixed images -> frozen features -> head loss; an optimizer step every `accum_steps`.

    `on_step(step_in_epoch, info)` runs after each optimizer step (scheduler, EMA, logging) with the step's loss,
    pre-clip grad norm, lr and this process's images/s. Leftover micro-batches that do not fill a whole accumulation
    are not used, so every step sees the same global batch. Returns the epoch's mean loss over all processes.
    """
    head.train()
    accum, device = settings.accum_steps, settings.device
    num_steps = len(loader) // accum
    params = [p for p in head.parameters() if p.requires_grad]
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss x images, images (one sync per step)
    start = time.perf_counter()
    for i, batch in enumerate(loader):
        step, micro = divmod(i, accum)
        if step >= num_steps:
            break
        images, soft = mix(*_micro_batch(batch, device))
        with torch.no_grad(), autocast(device, settings.amp):
            tokens = backbone.forward_features(images)
        sync = micro == accum - 1
        with nullcontext() if sync or not hasattr(head, "no_sync") else head.no_sync():
            with autocast(device, settings.amp):
                logits = head(tokens)
            loss = loss_fn(logits.float(), soft)
            scaler.scale(loss / accum).backward()
        totals += torch.stack([loss.detach().double() * len(images), torch.tensor(len(images), device=device)])
        if not sync:
            continue
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, settings.clip_grad if settings.clip_grad > 0 else math.inf)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        seen = totals[1].item()
        info = {
            "loss": loss.item(),
            "grad_norm": float(norm),
            "lr": optimizer.param_groups[0]["lr"],
            "img_s": seen / (time.perf_counter() - start),
        }
        on_step(step, info)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    return {"train_loss": (totals[0] / totals[1].clamp(min=1)).item(), "train_images": int(totals[1].item())}


@torch.no_grad()
def predict_scores(
    *,
    backbone: nn.Module,
    heads: dict[str, nn.Module],
    loader: DataLoader,
    score: Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
    amp: str,
    device: torch.device,
    progress: Callable[[int], None] = lambda n: None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Per-sample scores of every head, gathered from all ranks and ordered by dataset index (each sample once).

    The backbone runs once per batch for all heads. `score(head_name, logits, targets, indices)` returns a dict of
    per-sample tensors (e.g. top-1 / top-5 hits).
    """
    for head in heads.values():
        head.eval()
    local: dict[str, dict[str, list[torch.Tensor]]] = {name: {} for name in heads}
    indices: list[torch.Tensor] = []
    for batch in loader:
        if batch is None:  # every image of this batch was undecodable and skipped (skip_corrupt)
            continue
        images, targets, idx = batch[0].to(device, non_blocking=True), batch[1], batch[2]
        with autocast(device, amp):
            tokens = backbone.forward_features(images)
            for name, head in heads.items():
                for key, value in score(name, head(tokens).float().cpu(), targets, idx).items():
                    local[name].setdefault(key, []).append(value.cpu())
        indices.append(idx.cpu())
        progress(len(idx))
    mine = {
        "index": torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long),
        "scores": {n: {k: torch.cat(v) for k, v in d.items()} for n, d in local.items()},
    }
    return _merge_ranks(all_gather_objects(mine))


def _merge_ranks(parts: list[dict]) -> dict[str, dict[str, torch.Tensor]]:
    index = torch.cat([p["index"] for p in parts])
    if index.unique().numel() != index.numel():
        raise RuntimeError("a sample was scored twice across ranks")
    order = index.argsort()
    merged: dict[str, dict[str, torch.Tensor]] = {}
    for name in parts[0]["scores"]:
        keys = {k for p in parts for k in p["scores"][name]}
        merged[name] = {
            k: torch.cat([p["scores"][name][k] for p in parts if k in p["scores"][name]])[order] for k in keys
        }
    merged["_index"] = {"index": index[order]}
    return merged


def append_jsonl(path: Path, record: dict) -> None:
    """One JSON object per line (appends are line-atomic enough for a log of metrics)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
