"""Samplers and DataLoaders shared by both tasks: exact evaluation shards, and training order that resumes mid-epoch."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Iterator

import cv2
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from internvit.engine.distributed import DistInfo

log = logging.getLogger(__name__)
MAX_DEFAULT_WORKERS = 8


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a cluster's allocation), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def resolve_num_workers(requested: int | None, local_processes: int | None = None) -> int:
    """Loader processes per training process: the request, capped at this process's share of the cores (the node's
    cores over LOCAL_WORLD_SIZE processes by default); unset: that share less one core for the process (at most 8)."""
    local = local_processes if local_processes is not None else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    share = max(1, available_cpus() // max(1, local))
    if requested is None:
        return min(MAX_DEFAULT_WORKERS, max(1, share - 1))
    if requested > share:
        log.warning("data.num_workers=%d exceeds the %d core(s) of this process: using %d", requested, share, share)
        return share
    return requested


def init_worker(_worker_id: int) -> None:
    """DataLoader workers: one OpenCV thread each (the workers are the parallelism; results do not depend on it),
    and deaf to SIGINT / SIGTERM, which a Ctrl-C or a cluster sends to every process: the training process finishes
    its step with their batches, checkpoints and exits, and they end with it."""
    cv2.setNumThreads(1)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, ...: every sample on exactly one rank, no padding (exact distributed scores)."""

    def __init__(self, num_samples: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, num_samples, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled per epoch from its seed, full batches only) that can start part-way into an
    epoch: the samples a resumed run already consumed are skipped, so the order equals an uninterrupted run's."""

    start = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return super().__len__() - self.start


def build_eval_loader(
    dataset: Dataset, *, batch_size: int, dist: DistInfo, num_workers: int = 0, collate_fn: Callable | None = None
) -> DataLoader:
    """Exact shards over the ranks, in order, nothing dropped (each sample scored once)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), dist.rank, dist.world_size),
        num_workers=num_workers,
        pin_memory=dist.device.type == "cuda",
        collate_fn=collate_fn,
        worker_init_fn=init_worker if num_workers else None,
    )


class TrainBatches:
    """Training micro-batches in the order an uninterrupted run sees them, from any global micro-batch on.

    Epoch e shuffles with `seed + e` (DistributedSampler's rule) over this rank's share, in full batches. Before an
    epoch's loader is made, `on_epoch(epoch)` runs (per-epoch reseeding, augmentation epochs), so a run that resumes
    at an epoch start or part-way into one replays the same draws. `generator_seed(epoch)`, when given, seeds
    the DataLoader's own generator, so creating an iterator mid-epoch does not consume the global stream; without
    it the loader draws its worker base seed from the global stream, as a plain DataLoader does.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        dist: DistInfo,
        seed: int,
        num_workers: int = 0,
        collate_fn: Callable | None = None,
        generator_seed: Callable[[int], int] | None = None,
    ) -> None:
        self.dataset, self.batch_size, self.dist = dataset, batch_size, dist
        self.num_workers, self.collate_fn = num_workers, collate_fn
        self.generator_seed = generator_seed
        self.sampler = ResumableSampler(
            dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed, drop_last=True
        )
        self.per_epoch = len(self.sampler) // batch_size  # full micro-batches per epoch on this rank

    def loader(self, epoch: int, start_batch: int = 0) -> DataLoader:
        """Epoch `epoch`'s loader from its micro-batch `start_batch` on."""
        self.sampler.set_epoch(epoch)
        self.sampler.start = start_batch * self.batch_size
        generator = None if self.generator_seed is None else torch.Generator().manual_seed(self.generator_seed(epoch))
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=self.dist.device.type == "cuda",
            collate_fn=self.collate_fn,
            generator=generator,
            worker_init_fn=init_worker if self.num_workers else None,
        )

    def epochs(
        self, start: int, *, use_per_epoch: int | None = None, on_epoch: Callable[[int], None] | None = None
    ) -> Iterator:
        """Micro-batches from global micro-batch `start` on, endlessly, epoch after epoch.

        `use_per_epoch` caps the micro-batches used from each epoch (the rest are left unused, so every optimizer
        step of an epoch-based recipe sees a whole accumulation); default: all full batches.
        """
        per_epoch = use_per_epoch or self.per_epoch
        epoch, offset = divmod(start, per_epoch)
        while True:
            if on_epoch is not None:
                on_epoch(epoch)
            batches = iter(self.loader(epoch, offset))
            for i in range(offset, per_epoch):
                batch = next(batches)
                if i == per_epoch - 1:
                    del batches  # the epoch's last batch: its workers stop now, not after the evaluation that follows
                yield batch
            epoch, offset = epoch + 1, 0
