"""One checkpointer for both tasks: named stateful objects, a run's settings signature, one resume protocol.

A checkpoint holds `{"signature": ..., "objects": {name: state_dict}}`: the objects are whatever the task and the
loop name (model parts, optimizer, schedule, EMA, scaler, loop counters and history), each with the usual
`state_dict()` / `load_state_dict()` pair (`torch.distributed.checkpoint`'s Stateful protocol). The signature is
what must not change between a run and its resumption; a mismatch is refused, naming every field that differs.

Resume protocol: every rank reads the checkpoint itself (memory-mapped, so a 36 GB fine-tuning state is paged in
as it is copied, never held twice), after checking that all ranks see it (the run folder must be shared).
Storage is a backend: `SingleFileBackend` (rank 0 writes one `checkpoint.pth` atomically, tensors and plain values
only, read with weights_only=True), or `ShardedBackend` for FSDP2 runs (`torch.distributed.checkpoint`: every rank
writes its own shards of the sharded objects, model and optimizer, and any number of processes can read them back).
Objects marked `sharded = True` (`ShardedModelState`, `ShardedOptimizerState`) go through the backend's sharded
path; the rest are plain state saved by rank 0.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from internvit.atomic import atomic_path
from internvit.engine.distributed import DistInfo, agree, all_gather_objects, barrier, save_config
from internvit.engine.parallelize import broadcast_buffers
from internvit.errors import InternViTError

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "checkpoint.pth"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class ShardedModelState:
    """A sharded (FSDP2) module's state for the checkpointer: DTensor shards, canonical names, `keep(name)` entries."""

    sharded = True

    def __init__(self, module: nn.Module, keep: Callable[[str], bool] = lambda name: True) -> None:
        self.module, self.keep = module, keep

    def state_dict(self) -> dict[str, Any]:
        # replicated buffers are stored once, from any rank: make them rank 0's first (BatchNorm statistics differ
        # between ranks where there is no SyncBatchNorm)
        broadcast_buffers(self.module)
        return {k: v for k, v in get_model_state_dict(self.module).items() if self.keep(k)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.module, state, options=StateDictOptions(strict=False))


class ShardedOptimizerState:
    """An optimizer over sharded parameters: its states keyed by parameter name, so they reshard on load."""

    sharded = True

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module, self.optimizer = module, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.module, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.module, self.optimizer, state)


def full_state_dict(module: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The whole state of `module` in host memory on rank 0 (empty elsewhere); gathered tensor by tensor into CPU
    memory when sharded (a collective: every rank calls it), so host memory holds one full copy, never two."""
    if not sharded:
        return module.state_dict()
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class CheckpointBackend(Protocol):
    """Where and how a run folder's checkpoint is stored."""

    def exists(self) -> bool:
        """Whether this rank sees a checkpoint."""

    def write(self, plain: dict[str, Any], sharded: dict[str, Any], dist: DistInfo) -> None:
        """Store the plain state (rank 0's) and the sharded states (every rank's shards); called on every rank, so
        that an interruption leaves the previous checkpoint intact."""

    def read(self) -> dict[str, Any]:
        """This rank's view of the stored plain state (the signature included)."""

    def read_sharded(self, templates: dict[str, Any], plain: dict[str, Any]) -> dict[str, Any]:
        """The stored sharded states, laid into `templates` (the live objects' state dicts, which say the shards)."""


class SingleFileBackend:
    """`run_dir/checkpoint.pth`, written by rank 0 atomically and read by every rank memory-mapped."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / CHECKPOINT_NAME

    def exists(self) -> bool:
        return self.path.is_file()

    def write(self, plain: dict[str, Any], sharded: dict[str, Any], dist: DistInfo) -> None:
        if dist.is_main:
            state = plain | {"objects": plain["objects"] | sharded}
            with atomic_path(self.path) as tmp:
                torch.save(state, tmp)

    def read_sharded(self, templates: dict[str, Any], plain: dict[str, Any]) -> dict[str, Any]:
        return {name: plain["objects"][name] for name in templates}

    def read(self) -> dict[str, Any]:
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # corrupt zip, refused pickle, truncated file: all mean "cannot resume from this"
            first = str(e).splitlines()[0] if str(e) else ""
            raise InternViTError(
                f"cannot read training checkpoint {self.path} ({type(e).__name__}: {first})",
                fix="delete it to start the run afresh, or point output_dir to another folder",
            ) from e


class ShardedBackend:
    """`run_dir/checkpoint/`: `torch.distributed.checkpoint` shards (every rank writes its own) plus `state.pth`,
    the plain state written by rank 0. A save goes to `checkpoint.tmp/` and is swapped in once every rank has
    finished, so a half-written step never replaces the last good one; any number of processes reads it back."""

    def __init__(self, run_dir: str | Path) -> None:
        run_dir = Path(run_dir)
        self.path, self.tmp, self.old = run_dir / "checkpoint", run_dir / "checkpoint.tmp", run_dir / "checkpoint.old"

    def exists(self) -> bool:
        if not (self.path / "state.pth").is_file() and (self.old / "state.pth").is_file():
            return True  # interrupted between the two renames of a swap: the previous checkpoint is complete
        return (self.path / "state.pth").is_file()

    def folder(self) -> Path:
        """The complete checkpoint folder (the previous one while a swap was interrupted)."""
        return self.path if (self.path / "state.pth").is_file() else self.old

    def write(self, plain: dict[str, Any], sharded: dict[str, Any], dist: DistInfo) -> None:
        if dist.is_main:
            shutil.rmtree(self.tmp, ignore_errors=True)
        barrier()
        dcp.save(sharded, checkpoint_id=self.tmp)
        if dist.is_main:
            with atomic_path(self.tmp / "state.pth") as tmp:
                torch.save(plain, tmp)
        barrier()  # every rank's shards are complete
        if dist.is_main:
            if (self.path / "state.pth").is_file():
                shutil.rmtree(self.old, ignore_errors=True)
                os.replace(self.path, self.old)
            shutil.rmtree(self.path, ignore_errors=True)  # a folder without state.pth is incomplete
            os.replace(self.tmp, self.path)
            shutil.rmtree(self.old, ignore_errors=True)
        barrier()

    def read(self) -> dict[str, Any]:
        path = self.folder() / "state.pth"
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else ""
            raise InternViTError(
                f"cannot read training checkpoint {path} ({type(e).__name__}: {first})",
                fix="delete the checkpoint*/ folders to start the run afresh, or point output_dir to another folder",
            ) from e

    def read_sharded(self, templates: dict[str, Any], plain: dict[str, Any]) -> dict[str, Any]:
        dcp.load(templates, checkpoint_id=self.folder())
        return templates


@dataclass
class ResumePoint:
    """A checkpoint whose signature matched, read but not yet applied to the objects (`restore` releases it)."""

    state: dict[str, Any] | None


def signature_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields where two signatures differ, with both values ("train.lr: 0.02 -> 0.002")."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        diffs = []
        for key in list(old) + [k for k in new if k not in old]:
            name = f"{prefix}{key}"
            if key not in old or key not in new:
                where = "the checkpoint" if key not in new else "this run"
                diffs.append(f"{name} (only in {where})")
            else:
                diffs += signature_differences(old[key], new[key], f"{name}.")
        return diffs
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def _check_optimizer_shapes(name: str, obj: object, state: dict) -> None:
    """torch's Optimizer.load_state_dict accepts moment buffers of other shapes (the step fails later): refuse them."""
    if not isinstance(obj, torch.optim.Optimizer):
        return
    params = [p for group in obj.param_groups for p in group["params"]]
    for index, entry in state.get("state", {}).items():
        for key, value in entry.items():
            if torch.is_tensor(value) and value.ndim and value.shape != params[int(index)].shape:
                raise ValueError(
                    f"{name} state {key} of parameter {index} has shape {tuple(value.shape)}, the parameter "
                    f"{tuple(params[int(index)].shape)}"
                )


class Checkpointer:
    """Saves and restores a run's named stateful objects under one settings signature."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        signature: dict[str, Any],
        dist: DistInfo,
        backend: CheckpointBackend | None = None,
    ) -> None:
        self.run_dir, self.signature, self.dist = Path(run_dir), signature, dist
        self.backend = backend or SingleFileBackend(run_dir)

    def find(self) -> ResumePoint | None:
        """The run folder's checkpoint if there is one; refused when its signature differs (cheap: call it before
        the backbone loads, so a refused resume costs nothing)."""
        seen = all_gather_objects(self.backend.exists())
        if len(set(seen)) > 1:
            raise InternViTError(
                f"only some processes see the checkpoint in {self.run_dir}",
                fix="put output_dir on a filesystem that every node shares",
            )
        if not seen[0]:
            return None
        return ResumePoint(agree(self._read_checked))

    def _read_checked(self) -> dict[str, Any]:
        state = self.backend.read()
        stored = state.get("signature") if isinstance(state, Mapping) else None
        if stored is None or "objects" not in state:
            raise InternViTError(
                f"{self.run_dir} holds a checkpoint in another format (written by an earlier version, or not ours)",
                fix="delete its checkpoint (checkpoint.pth, or the checkpoint*/ folders) to start afresh, "
                "or choose a new output_dir",
            )
        diffs = signature_differences(stored, self.signature)
        if diffs:
            shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
            raise InternViTError(
                f"{self.run_dir} holds a run with other settings ({shown})",
                fix="rerun with the settings in its config.yaml, or choose a new output_dir",
            )
        return state

    def restore(self, point: ResumePoint, objects: Mapping[str, Stateful]) -> None:
        """Load every object's state (an object missing from the checkpoint is an error), then release the read
        state: a memory-mapped file must not stay mapped once a newer checkpoint replaces it."""
        if point.state is None:
            raise RuntimeError("this resume point was already restored")
        stored = point.state["objects"]
        sharded = {name for name, obj in objects.items() if getattr(obj, "sharded", False)}
        missing = sorted(set(objects) - set(stored) - set(point.state.get("sharded", [])))
        if missing:
            raise InternViTError(
                f"the checkpoint in {self.run_dir} lacks {', '.join(missing)}",
                fix="delete its checkpoint (checkpoint.pth, or the checkpoint*/ folders) to start afresh, "
                "or choose a new output_dir",
            )
        try:
            if sharded:
                templates = {name: objects[name].state_dict() for name in sorted(sharded)}
                loaded = self.backend.read_sharded(templates, point.state)
                for name in sorted(sharded):
                    objects[name].load_state_dict(loaded[name])
            for name, obj in objects.items():
                if name not in sharded:
                    obj.load_state_dict(stored[name])
                    _check_optimizer_shapes(name, obj, stored[name])
        except (RuntimeError, ValueError, KeyError, CheckpointException) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InternViTError(
                f"the checkpoint in {self.run_dir} does not fit this run's model ({first[:300]})",
                fix="rerun with the settings in its config.yaml, or delete its checkpoint (checkpoint.pth, or the "
                "checkpoint*/ folders) to start afresh, or choose a new output_dir",
            ) from e
        point.state = None

    def save(self, objects: Mapping[str, Stateful]) -> None:
        """Write every object's state with the signature (atomically), then wait for all ranks."""
        sharded = {name: obj.state_dict() for name, obj in objects.items() if getattr(obj, "sharded", False)}
        plain = {name: obj.state_dict() for name, obj in objects.items() if name not in sharded}
        state = {"signature": self.signature, "objects": plain, "sharded": sorted(sharded)}
        self.backend.write(state, sharded, self.dist)
        barrier()


def open_run(
    config: object,
    *,
    run_dir: Path,
    dist: DistInfo,
    signature: dict[str, Any],
    backend: CheckpointBackend | None = None,
) -> tuple[Checkpointer, ResumePoint | None]:
    """The run folder's checkpointer and resume point (refused on other settings), then `config.yaml`: in that
    order, so that a refused run leaves the folder saying what it holds. Call it before the backbone loads."""
    checkpointer = Checkpointer(run_dir, signature=signature, dist=dist, backend=backend)
    resume = checkpointer.find()
    save_config(config, run_dir, dist)
    return checkpointer, resume


def read_run_state(run_dir: str | Path, name: str = "model") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The whole object `name` of a run folder's checkpoint (sharded or one file) in host memory, once, plus the
    checkpoint's plain state; in one process, without a model (for exporting a sharded run)."""
    run_dir = Path(run_dir)
    sharded = ShardedBackend(run_dir)
    if sharded.exists():
        folder = sharded.folder()
        plain = sharded.read()
        metadata = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
        prefix = f"{name}."
        template = {
            key[len(prefix) :]: torch.empty(md.size, dtype=md.properties.dtype)
            for key, md in metadata.items()
            if key.startswith(prefix) and isinstance(md, TensorStorageMetadata)
        }
        if not template:
            raise InternViTError(f"{folder} holds no {name!r} state", fix="pass a run folder written by seg train")
        dcp.load({name: template}, checkpoint_id=folder, no_dist=True)
        return template, plain
    single = SingleFileBackend(run_dir)
    if not single.exists():
        raise InternViTError(f"{run_dir} holds no training checkpoint", fix="pass the output_dir of a seg train run")
    state = single.read()
    return dict(state["objects"][name]), state
