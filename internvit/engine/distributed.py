"""Process-group set-up from torchrun's environment (one process to many nodes), seeding, and small collectives."""

from __future__ import annotations

import dataclasses
import datetime
import gc
import logging
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
import yaml

from internvit.atomic import atomic_path
from internvit.engine.progress import TqdmHandler
from internvit.errors import InternViTError

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: global rank, world size, local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto") -> torch.device:
    """ "auto": the GPU when one is visible, else the CPU; any other name as torch spells it ("cpu", "cuda:1")."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# The Python objects of the default process groups this process joined, kept to the end of the process (one per
# init: a process that joins and leaves many times keeps each, idle). A DDP module's
# reducer holds its group from C++ and, if it were the last holder, would destroy the group while holding the GIL:
# gloo's destructor joins its worker threads, and a worker still releasing the tensors of the last collective waits
# for the GIL, so the process hangs at the end of a run (seen under CPU load). Destroyed from its Python object, a
# group releases the GIL first.
_LIVE_GROUPS: list[object] = []


def init_distributed(device: str = "auto", *, process_group: bool = False) -> DistInfo:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPU); a plain run is world size 1, with a
    one-process group when `process_group` asks for one (FSDP2 and distributed checkpoints need a group)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but no GPU is visible")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    # on GPUs gloo serves CPU tensors too (CPU-offloaded FSDP shards reduce their gradient norms on the host)
    backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
    if world_size > 1 and not dist.is_initialized():
        # a long timeout: rank 0 may write multi-GB checkpoints while the others wait at a barrier
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    elif process_group and not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if dist.is_initialized() and dist.group.WORLD not in _LIVE_GROUPS:
        _LIVE_GROUPS.append(dist.group.WORLD)
    return DistInfo(rank, world_size, local_rank, dev)


def release_process_groups() -> None:
    """Destroy the kept process groups now, from Python (the GIL released while gloo joins its workers), once every
    module that holds one is gone: at the end of a command, not during interpreter shutdown, where a gloo worker
    still releasing tensors would abort the process."""
    gc.collect()  # DDP modules in reference cycles (a traceback's frames) go first
    _LIVE_GROUPS.clear()
    gc.collect()


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) in this process."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order (a one-element list when not distributed)."""
    if not dist.is_initialized():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def agree(check: Callable[[], T]) -> T:
    """Run `check` on every rank; if it raises InternViTError on any of them, raise it on all, so that no rank goes
    on alone into the next collective. Returns this rank's result."""
    try:
        result, error = check(), None
    except InternViTError as e:
        result, error = None, e
    failed = [e for e in all_gather_objects(None if error is None else (error.message, error.fix)) if e]
    if failed:
        raise error or InternViTError(failed[0][0], fix=failed[0][1])
    return result


def broadcast_object(obj: object, src: int = 0) -> object:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def setup_logging(rank: int = 0, level: int = logging.INFO, log_file: str | os.PathLike | None = None) -> None:
    """Configure the package logger once: rank 0 logs to stderr (and `log_file`), other ranks only warnings."""
    logger = logging.getLogger("internvit")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    fmt = logging.Formatter("%(asctime)s %(message)s" if log_file else "%(message)s", "%H:%M:%S")
    handler = TqdmHandler(sys.stderr)
    handler.setFormatter(fmt)
    logger.addHandler(handler)
    if log_file and rank == 0:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(file_handler)
    logger.setLevel(level if rank == 0 else logging.WARNING)
    logger.propagate = False


def start_run(output_dir: str | os.PathLike, device: str, *, process_group: bool = False) -> tuple[DistInfo, Path]:
    """Join the process group, create the run folder and log to it; `save_config` follows once the start-up checks
    pass, so a refused run leaves the folder's `config.yaml` saying what the folder holds."""
    run_dir = Path(output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise InternViTError(f"output_dir {run_dir} is a file, not a folder", fix="choose another output_dir")
    info = init_distributed(device, process_group=process_group)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InternViTError(
            f"cannot create output_dir {run_dir} ({e.strerror or e})", fix="choose a writable output_dir"
        ) from e
    setup_logging(info.rank, log_file=run_dir / "log.txt")
    return info, run_dir


def save_config(config: object, run_dir: Path, dist: DistInfo, name: str = "config.yaml") -> None:
    """The resolved config as `run_dir/<name>` (rank 0, atomically); evaluations use their own name, so that they
    never overwrite the config.yaml of a training run in the same folder."""
    if dist.is_main:
        with atomic_path(run_dir / name) as tmp:
            tmp.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
