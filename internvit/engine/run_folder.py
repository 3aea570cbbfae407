"""A training run's folder: one process at a time (an exclusive lock), no leftovers of interrupted writes."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from pathlib import Path

from internvit.engine.distributed import DistInfo, agree
from internvit.errors import InternViTError

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"
_held: dict[Path, int] = {}  # run folder -> open lock file descriptor, for the life of the process


def lock_run_folder(run_dir: Path) -> None:
    """Take the folder's exclusive lock (held until this process exits, so a crashed run's lock frees itself);
    a second process on the same folder stops at once, naming the one that holds it."""
    path = (run_dir / LOCK_NAME).resolve()
    if path.parent in _held:
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise InternViTError(
            f"another process (pid {holder}) is training in {run_dir}",
            fix="wait for it to finish, or choose another output_dir",
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[path.parent] = fd


def remove_orphans(run_dir: Path) -> list[Path]:
    """Delete what interrupted atomic writes left behind (`.NAME.*.tmp` files, a `checkpoint.tmp/` folder)."""
    orphans = [p for p in run_dir.glob(".*.tmp") if p.is_file()] + [
        p for p in [run_dir / "checkpoint.tmp"] if p.is_dir()
    ]
    for path in orphans:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if orphans:
        log.info("removed %d leftover temporary file(s) of an interrupted write in %s", len(orphans), run_dir)
    return orphans


def claim_run_folder(run_dir: Path, dist: DistInfo) -> None:
    """Rank 0 locks the folder and clears leftovers; a refusal stops every rank."""
    agree(lambda: (lock_run_folder(run_dir), remove_orphans(run_dir)) if dist.is_main else None)
