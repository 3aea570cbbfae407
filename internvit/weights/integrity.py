"""Integrity of weights, shared by every loader: the `content_sha256` of our safetensors files (written by `convert`,
verified on every read unless switched off) and the refusal of NaN / Inf weights (`check_finite`)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from internvit.errors import InternViTError

SKIP_HASH_ENV = "INTERNVIT_SKIP_HASH_CHECK"  # "1": do not verify content_sha256 (saves one pass over the bytes)
HASH_CHUNK_BYTES = 64 << 20  # content_sha256 hashes at most this much of a tensor at a time (never a whole copy)
_MAX_LISTED = 5


def _byte_chunks(t: torch.Tensor) -> Iterator[np.ndarray]:
    """The tensor's bytes in row-major order, as views of at most HASH_CHUNK_BYTES (or one row, if longer); a
    contiguous CPU tensor is never copied, any other is copied one chunk at a time."""
    t = t.detach().reshape(1) if t.ndim == 0 else t.detach()
    row_bytes = max(1, t[0].numel() * t.element_size()) if t.shape[0] else 1
    step = max(1, HASH_CHUNK_BYTES // row_bytes)
    for start in range(0, t.shape[0], step):
        yield t[start : start + step].cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def content_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes, in sorted key order: independent of file framing.

    For each key: the line `f"{key}|{dtype}|{tuple(shape)}\\n"`, then the tensor's bytes in row-major order (native
    byte order), streamed in chunks of at most HASH_CHUNK_BYTES, so hashing needs no second copy of the weights.
    This is what `convert` writes into our files' metadata and what reading them verifies.
    """
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        for chunk in _byte_chunks(t):
            digest.update(chunk)
    return digest.hexdigest()


def hash_check_enabled(verify_hash: bool = True) -> bool:
    """Whether to verify content_sha256: `verify_hash`, unless INTERNVIT_SKIP_HASH_CHECK=1 turns it off everywhere."""
    value = os.environ.get(SKIP_HASH_ENV, "").strip().lower()
    if not verify_hash or value in ("", "0", "false", "no", "off"):
        return verify_hash
    if value in ("1", "true", "yes", "on"):
        return False
    raise InternViTError(
        f"{SKIP_HASH_ENV}={os.environ[SKIP_HASH_ENV]!r} is neither 1 nor 0",
        fix=f"set {SKIP_HASH_ENV}=1 to skip the content_sha256 check of our safetensors files, or unset it",
    )


def verify_content_hash(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Refuse a file whose tensors no longer hash to the content_sha256 its header records (if it records one)."""
    expected = metadata.get("content_sha256")
    if expected and content_sha256(tensors) != expected:
        raise InternViTError(
            f"{path}: its tensors do not match the content_sha256 in its header: "
            "the file was modified or corrupted after it was written",
            fix=f"download or convert it again (`internvit convert SRC {path.name} --force`); "
            f"to load it as it is, set {SKIP_HASH_ENV}=1",
        )


def _is_finite(t: torch.Tensor) -> bool:
    if t.element_size() == 1:  # float8: torch.isfinite has no kernel for some of them (e4m3fn)
        t = t.float()
    return bool(torch.isfinite(t).all())


def non_finite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an Inf, in the mapping's order."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not _is_finite(t)]


def check_finite(tensors: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Refuse weights with NaN / Inf values (a diverged run, a broken conversion), naming the first such tensors."""
    bad = non_finite_tensors(tensors)
    if bad:
        shown = ", ".join(bad[:_MAX_LISTED]) + (
            f", ... ({len(bad) - _MAX_LISTED} more)" if len(bad) > _MAX_LISTED else ""
        )
        raise InternViTError(
            f"{source}: {len(bad)} tensor(s) hold NaN or Inf values: {shown}",
            fix="these weights are broken (a diverged run or a failed conversion): use an earlier checkpoint, "
            "or download / convert the file again",
        )
