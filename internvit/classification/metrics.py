"""Exact per-sample classification scoring (docs/protocol.md §3.2, §3.5).

Every function returns one boolean per image rather than a batch average, so that a distributed evaluation can
gather the per-image results (dropping sampler padding) and count every image exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Top-1 % of the paper's InternViT-6B linear probe (cls_patch_concat, 224px), README summary table (§6.1).
PAPER_RESULTS: dict[str, float] = {"in1k": 88.2, "real": 90.4, "v2": 79.9, "a": 77.5, "r": 89.8, "sketch": 69.1}
# The released head's printed (Acc@1, Acc@5) per set (docs/protocol.md §6.1): cls_patch_concat on the 224px model at
# 224 px.
PAPER_RESULTS_DETAILED: dict[str, tuple[float, float]] = {
    "in1k": (88.230, 98.474),
    "real": (90.437, 98.567),
    "v2": (79.940, 95.340),
    "a": (77.479, 92.737),
    "r": (89.777, 97.023),
    "sketch": (69.117, 88.341),
}


def _check_logits(logits: torch.Tensor, batch: int | None = None) -> None:
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must have shape (B, K) with K >= 1, got {tuple(logits.shape)}")
    if batch is not None and logits.shape[0] != batch:
        raise ValueError(f"logits have {logits.shape[0]} rows but {batch} labels were given")


def topk_hits(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, torch.Tensor]:
    """Per image: is the target among the top-k logits? One (B,) bool tensor per k; k is clipped to K (timm)."""
    if targets.ndim != 1:
        raise ValueError(f"targets must have shape (B,), got {tuple(targets.shape)}")
    _check_logits(logits, targets.shape[0])
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
    num_classes = logits.shape[1]
    if targets.numel() and not 0 <= int(targets.min()) <= int(targets.max()) < num_classes:
        raise ValueError(f"targets must lie in [0, {num_classes}), got [{int(targets.min())}, {int(targets.max())}]")
    maxk = min(max(ks), num_classes)
    pred = logits.topk(maxk, dim=1).indices  # (B, maxk), best first
    correct = pred == targets.to(pred.device).unsqueeze(1)
    return {int(k): correct[:, : min(int(k), num_classes)].any(dim=1) for k in ks}


def real_hits(
    logits: torch.Tensor, real_label_sets: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ImageNet-ReaL per image (§3.5): (valid, top1, top5); images with an empty label set are not valid.

    top-1 is correct iff the arg-max class is in the image's set, top-5 iff any of the top-5 classes is.
    Invalid images score False in both and must be left out of the denominator (see `summarize(valid=...)`).
    """
    _check_logits(logits, len(real_label_sets))
    batch, num_classes = logits.shape
    in_set = torch.zeros(batch, num_classes, dtype=torch.bool)
    for i, labels in enumerate(real_label_sets):
        labels = [int(c) for c in labels]
        if any(not 0 <= c < num_classes for c in labels):
            raise ValueError(f"ReaL labels of image {i} must lie in [0, {num_classes}), got {labels}")
        in_set[i, labels] = True
    in_set = in_set.to(logits.device)
    valid = in_set.any(dim=1)
    pred = logits.topk(min(5, num_classes), dim=1).indices
    hit = in_set.gather(1, pred)  # (B, 5): is each of the top-5 predictions in the set?
    return valid, hit[:, 0], hit.any(dim=1)


def mask_from_indices(indices: Sequence[int], num_classes: int = 1000) -> torch.Tensor:
    """A (num_classes,) bool mask selecting `indices` (e.g. the 200 ImageNet-A/R classes of §3.2)."""
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    if idx.numel() and not 0 <= int(idx.min()) <= int(idx.max()) < num_classes:
        raise ValueError(f"class indices must lie in [0, {num_classes})")
    if idx.unique().numel() != idx.numel():
        raise ValueError("class indices must not repeat")
    mask = torch.zeros(num_classes, dtype=torch.bool)
    mask[idx] = True
    return mask


def restrict_logits(logits: torch.Tensor, class_mask: torch.Tensor) -> torch.Tensor:
    """Keep the columns where `class_mask` is True, in their original order (ImageNet-A/R, §3.2).

    Because both the 1k class list and the 200 dataset folders are sorted, target j of the 200-class dataset is
    column j of the result.
    """
    mask = torch.as_tensor(class_mask)
    if mask.dtype != torch.bool or mask.ndim != 1 or mask.shape[0] != logits.shape[-1]:
        raise ValueError(
            f"class_mask must be a bool tensor of shape ({logits.shape[-1]},), got {mask.dtype} {tuple(mask.shape)}"
        )
    if not mask.any():
        raise ValueError("class_mask selects no class")
    return logits[..., mask.to(logits.device)]


def summarize(hits1: torch.Tensor, hits5: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, float | int]:
    """Acc@1 / Acc@5 in percent over the scored images (those with `valid` True, or all), and how many there were."""
    hits1, hits5 = torch.as_tensor(hits1, dtype=torch.bool), torch.as_tensor(hits5, dtype=torch.bool)
    if hits1.shape != hits5.shape or hits1.ndim != 1:
        raise ValueError(
            f"hits1 and hits5 must be (B,) tensors of one shape, got {tuple(hits1.shape)}, {tuple(hits5.shape)}"
        )
    if valid is not None:
        valid = torch.as_tensor(valid, dtype=torch.bool)
        if valid.shape != hits1.shape:
            raise ValueError(f"valid has shape {tuple(valid.shape)}, hits have {tuple(hits1.shape)}")
        hits1, hits5 = hits1[valid.to(hits1.device)], hits5[valid.to(hits5.device)]
    num_images = int(hits1.numel())
    if num_images == 0:
        raise ValueError("no images to score (empty hits, or no valid image)")
    return {
        "acc1": 100.0 * int(hits1.sum()) / num_images,
        "acc5": 100.0 * int(hits5.sum()) / num_images,
        "num_images": num_images,
    }
