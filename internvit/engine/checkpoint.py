"""Training checkpoints that hold only trainable state, written atomically and read back with weights_only=True."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from internvit.atomic import atomic_path
from internvit.errors import InternViTError

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "checkpoint.pth"


def save_checkpoint(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Write `run_dir/checkpoint.pth` atomically: an interruption leaves the previous checkpoint intact."""
    path = Path(run_dir) / CHECKPOINT_NAME
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint (tensors and plain Python values only), memory-mapped: a 36 GB fine-tuning state
    is paged in as it is copied into the model and optimizer, not held twice."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # corrupt zip, refused pickle, truncated file: all mean "cannot resume from this"
        raise InternViTError(
            f"cannot read training checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
            fix="delete it to start the run afresh, or point output_dir to another folder",
        ) from e


def find_resume_checkpoint(run_dir: str | Path) -> Path | None:
    path = Path(run_dir) / CHECKPOINT_NAME
    return path if path.is_file() else None
