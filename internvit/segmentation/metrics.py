"""ADE20K mIoU with mmseg pre_eval semantics (docs/protocol.md §5.4): per-image histograms summed over the dataset.

Counts are exact int64 (mmseg's histc counts in fp32); the ratios are computed in float64 and reported x100,
rounded to 2 decimals with numpy's rounding, as mmseg does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from internvit.segmentation.heads import IGNORE_INDEX

# mIoU % of the released InternViT-6B ADE20K results (README, single scale, §5.9).
PAPER_MIOU: dict[str, float] = {
    "linear_probe": 47.2,
    "head_tuning": 54.9,
    "full_tuning": 58.9,
    "fewshot_1of16": 46.5,
    "fewshot_1of8": 50.0,
    "fewshot_1of4": 53.3,
    "fewshot_1of2": 55.8,
    "fewshot_1of1": 57.2,
}

_AREAS = ("area_intersect", "area_union", "area_pred", "area_label")


def intersect_and_union(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class int64 histograms (intersect, union, pred, label) over the pixels whose label is not ignored.

    `label` is already reduced (0..num_classes-1, ignore_index elsewhere); any other value is an error rather than
    silently dropped (mmseg's histc would drop it, hiding a forgotten reduce_zero_label).
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
    valid = label != ignore_index
    pred, label = pred[valid].long(), label[valid].long()
    for name, values in (("prediction", pred), ("label", label)):
        if values.numel() and not 0 <= int(values.min()) <= int(values.max()) < num_classes:
            raise ValueError(
                f"{name} values must lie in [0, {num_classes}) (or be {ignore_index} in the label), "
                f"got [{int(values.min())}, {int(values.max())}]"
            )
    area_intersect = torch.bincount(label[pred == label], minlength=num_classes)
    area_pred = torch.bincount(pred, minlength=num_classes)
    area_label = torch.bincount(label, minlength=num_classes)
    return area_intersect, area_pred + area_label - area_intersect, area_pred, area_label


def _ratio(num: torch.Tensor, den: torch.Tensor) -> np.ndarray:
    """num / den in float64, NaN where den is 0."""
    num_np, den_np = num.double().numpy(), den.double().numpy()
    out = np.full_like(num_np, np.nan)
    np.divide(num_np, den_np, out=out, where=den_np > 0)
    return out


def _percent(value: float) -> float:
    return float(np.round(value * 100, 2))


def _nanmean(values: np.ndarray) -> float:
    """Mean over the non-NaN entries; NaN (without numpy's warning) when there are none."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else float("nan")


class MIoUAccumulator:
    """Sums the four per-class histograms over a dataset; summary() gives mIoU / mAcc / aAcc in % (§5.4)."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.num_images = 0
        self.area_intersect = torch.zeros(num_classes, dtype=torch.int64)
        self.area_union = torch.zeros(num_classes, dtype=torch.int64)
        self.area_pred = torch.zeros(num_classes, dtype=torch.int64)
        self.area_label = torch.zeros(num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Add one image (H, W) or a batch (B, H, W) of predictions against reduced labels."""
        if pred.ndim not in (2, 3):
            raise ValueError(f"expected (H, W) or (B, H, W) predictions, got {tuple(pred.shape)}")
        areas = intersect_and_union(pred, label, self.num_classes, self.ignore_index)
        for name, area in zip(_AREAS, areas, strict=True):
            setattr(self, name, getattr(self, name) + area.cpu())
        self.num_images += 1 if pred.ndim == 2 else pred.shape[0]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The four histograms and the image count (to gather across ranks, or save)."""
        state = {name: getattr(self, name).clone() for name in _AREAS}
        state["num_images"] = torch.tensor(self.num_images, dtype=torch.int64)
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = [k for k in (*_AREAS, "num_images") if k not in state]
        if missing:
            raise ValueError(f"accumulator state lacks {', '.join(missing)}")
        for name in _AREAS:
            area = torch.as_tensor(state[name]).to(device="cpu", dtype=torch.int64)
            if area.shape != (self.num_classes,):
                raise ValueError(f"{name} has shape {tuple(area.shape)}, expected ({self.num_classes},)")
            setattr(self, name, area.clone())
        self.num_images = int(state["num_images"])

    @classmethod
    def merge(cls, accumulators: Iterable[MIoUAccumulator]) -> MIoUAccumulator:
        """A new accumulator holding the sums of several (e.g. one per rank); all must share num_classes."""
        accumulators = list(accumulators)
        if not accumulators:
            raise ValueError("merge needs at least one accumulator")
        first = accumulators[0]
        merged = cls(first.num_classes, first.ignore_index)
        for acc in accumulators:
            if acc.num_classes != merged.num_classes:
                raise ValueError(f"cannot merge accumulators of {acc.num_classes} and {merged.num_classes} classes")
            for name in _AREAS:
                setattr(merged, name, getattr(merged, name) + getattr(acc, name))
            merged.num_images += acc.num_images
        return merged

    def iou(self) -> np.ndarray:
        """Per-class IoU in [0, 1], NaN for classes with an empty union (neither predicted nor present)."""
        return _ratio(self.area_intersect, self.area_union)

    def acc(self) -> np.ndarray:
        """Per-class accuracy (recall) in [0, 1], NaN for classes absent from the labels."""
        return _ratio(self.area_intersect, self.area_label)

    def summary(self) -> dict[str, float]:
        """{"mIoU", "mAcc", "aAcc"} in %, 2 decimals; class means skip NaN classes (mmseg's np.nanmean)."""
        total = int(self.area_label.sum())
        a_acc = int(self.area_intersect.sum()) / total if total else float("nan")
        return {
            "mIoU": _percent(_nanmean(self.iou())),
            "mAcc": _percent(_nanmean(self.acc())),
            "aAcc": _percent(a_acc),
        }

    def per_class(self, class_names: Sequence[str]) -> list[dict[str, str | float]]:
        """One row {"class", "IoU", "Acc"} (%, 2 decimals, NaN kept) per class, in class-index order."""
        if len(class_names) != self.num_classes:
            raise ValueError(f"got {len(class_names)} class names for {self.num_classes} classes")
        return [
            {"class": str(name), "IoU": _percent(iou), "Acc": _percent(acc)}
            for name, iou, acc in zip(class_names, self.iou(), self.acc(), strict=True)
        ]
