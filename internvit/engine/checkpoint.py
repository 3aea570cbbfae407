"""One checkpointer for both tasks: named stateful objects, a run's settings signature, one resume protocol.

A checkpoint holds `{"signature": ..., "objects": {name: state_dict}}`: the objects are whatever the task and the
loop name (model parts, optimizer, schedule, EMA, scaler, loop counters and history), each with the usual
`state_dict()` / `load_state_dict()` pair (`torch.distributed.checkpoint`'s Stateful protocol). The signature is
what must not change between a run and its resumption; a mismatch is refused, naming every field that differs.

Resume protocol: every rank reads the checkpoint itself (memory-mapped, so a 36 GB fine-tuning state is paged in
as it is copied, never held twice), after checking that all ranks see it (the run folder must be shared).
Storage is a backend: `SingleFileBackend` (rank 0 writes one `checkpoint.pth` atomically, tensors and plain values
only, read with weights_only=True). A sharded backend (`torch.distributed.checkpoint`, every rank writing its
shards) implements the same three methods, and the tasks do not change.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from internvit.atomic import atomic_path
from internvit.engine.distributed import DistInfo, all_gather_objects, barrier, save_config
from internvit.errors import InternViTError

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "checkpoint.pth"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class CheckpointBackend(Protocol):
    """Where and how a run folder's checkpoint is stored."""

    def exists(self) -> bool:
        """Whether this rank sees a checkpoint."""

    def write(self, state: dict[str, Any], dist: DistInfo) -> None:
        """Store `state` (called on every rank) so that an interruption leaves the previous one intact."""

    def read(self) -> dict[str, Any]:
        """This rank's view of the stored state."""


class SingleFileBackend:
    """`run_dir/checkpoint.pth`, written by rank 0 atomically and read by every rank memory-mapped."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / CHECKPOINT_NAME

    def exists(self) -> bool:
        return self.path.is_file()

    def write(self, state: dict[str, Any], dist: DistInfo) -> None:
        if dist.is_main:
            with atomic_path(self.path) as tmp:
                torch.save(state, tmp)

    def read(self) -> dict[str, Any]:
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # corrupt zip, refused pickle, truncated file: all mean "cannot resume from this"
            first = str(e).splitlines()[0] if str(e) else ""
            raise InternViTError(
                f"cannot read training checkpoint {self.path} ({type(e).__name__}: {first})",
                fix="delete it to start the run afresh, or point output_dir to another folder",
            ) from e


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
        try:
            state, error = self._read_checked(), None
        except InternViTError as e:
            state, error = None, e
        # every rank learns of any rank's failure, so none of them goes on alone into the next collective
        errors = [e for e in all_gather_objects(None if error is None else (error.message, error.fix)) if e]
        if errors:
            raise error or InternViTError(errors[0][0], fix=errors[0][1])
        return ResumePoint(state)

    def _read_checked(self) -> dict[str, Any]:
        state = self.backend.read()
        stored = state.get("signature") if isinstance(state, Mapping) else None
        if stored is None or "objects" not in state:
            raise InternViTError(
                f"{self.run_dir} holds a checkpoint in another format (written by an earlier version, or not ours)",
                fix="delete its checkpoint.pth to start afresh, or choose a new output_dir",
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
        missing = sorted(set(objects) - set(stored))
        if missing:
            raise InternViTError(
                f"the checkpoint in {self.run_dir} lacks {', '.join(missing)}",
                fix="delete its checkpoint.pth to start afresh, or choose a new output_dir",
            )
        for name, obj in objects.items():
            obj.load_state_dict(stored[name])
        point.state = None

    def save(self, objects: Mapping[str, Stateful]) -> None:
        """Write every object's state with the signature (atomically), then wait for all ranks."""
        state = {"signature": self.signature, "objects": {name: obj.state_dict() for name, obj in objects.items()}}
        self.backend.write(state, self.dist)
        barrier()


def open_run(
    config: object, *, run_dir: Path, dist: DistInfo, signature: dict[str, Any]
) -> tuple[Checkpointer, ResumePoint | None]:
    """The run folder's checkpointer and resume point (refused on other settings), then `config.yaml`: in that
    order, so that a refused run leaves the folder saying what it holds. Call it before the backbone loads."""
    checkpointer = Checkpointer(run_dir, signature=signature, dist=dist)
    resume = checkpointer.find()
    save_config(config, run_dir, dist)
    return checkpointer, resume
