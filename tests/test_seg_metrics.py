"""ADE20K mIoU (docs/protocol.md §5.4, §5.9): histograms and summaries against hand-computed answers."""

import math
import warnings

import numpy as np
import pytest
import torch

from internvit.segmentation.metrics import PAPER_MIOU, MIoUAccumulator, intersect_and_union

# One 2x3 image, 4 classes. Pixel (1, 0) is ignored (its prediction, 2, must not count); class 2 is predicted once but
# absent from the labels (IoU 0, counted; Acc NaN); class 3 is neither predicted nor present (IoU NaN, excluded).
LABEL = torch.tensor([[0, 0, 1], [255, 1, 0]])
PRED = torch.tensor([[0, 1, 1], [2, 1, 2]])
K = 4


def test_intersect_and_union_by_hand():
    intersect, union, pred, label = intersect_and_union(PRED, LABEL, K)
    assert intersect.tolist() == [1, 2, 0, 0]
    assert pred.tolist() == [1, 3, 1, 0]
    assert label.tolist() == [3, 2, 0, 0]
    assert union.tolist() == [3, 3, 1, 0]
    assert intersect.dtype == torch.int64


def test_summary_by_hand_skips_classes_with_empty_union():
    acc = MIoUAccumulator(K)
    acc.update(PRED, LABEL)
    iou, cls_acc = acc.iou(), acc.acc()
    np.testing.assert_allclose(iou[:3], [1 / 3, 2 / 3, 0.0])
    assert math.isnan(iou[3]) and math.isnan(cls_acc[2]) and math.isnan(cls_acc[3])
    # mIoU = mean(1/3, 2/3, 0); mAcc = mean(1/3, 1); aAcc = 3 correct of 5 valid pixels
    assert acc.summary() == {"mIoU": 33.33, "mAcc": 66.67, "aAcc": 60.0}
    rows = acc.per_class(["wall", "building", "sky", "floor"])
    assert rows[0] == {"class": "wall", "IoU": 33.33, "Acc": 33.33}
    assert rows[1] == {"class": "building", "IoU": 66.67, "Acc": 100.0}
    assert rows[2]["IoU"] == 0.0 and math.isnan(rows[2]["Acc"]) and math.isnan(rows[3]["IoU"])
    with pytest.raises(ValueError, match="3 class names for 4 classes"):
        acc.per_class(["a", "b", "c"])


def test_dataset_sums_not_per_image_means():
    # image A: class 0 perfect (1 px); image B: class 0 with 1 of 3 pixels right (IoU 1/3)
    acc = MIoUAccumulator(2)
    acc.update(torch.tensor([[0]]), torch.tensor([[0]]))
    acc.update(torch.tensor([[0, 1, 1]]), torch.tensor([[0, 0, 0]]))
    # summed: class 0 intersect 2, union 4 -> 0.5; class 1 intersect 0, union 2 -> 0. mIoU 25 (per-image: 33.33)
    assert acc.summary()["mIoU"] == 25.0
    assert acc.num_images == 2


def reference_areas(pred: np.ndarray, label: np.ndarray, k: int, ignore: int = 255) -> list[np.ndarray]:
    """mmseg's pre_eval written with numpy histograms instead of torch.histc."""
    keep = label != ignore
    p, g = pred[keep], label[keep]
    bins = np.arange(k + 1) - 0.5
    inter = np.histogram(p[p == g], bins=bins)[0]
    area_p, area_g = np.histogram(p, bins=bins)[0], np.histogram(g, bins=bins)[0]
    return [inter, area_p + area_g - inter, area_p, area_g]


def random_images(n: int, k: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        h, w = torch.randint(5, 30, (2,), generator=g).tolist()
        label = torch.randint(0, k, (h, w), generator=g)
        label[torch.rand(h, w, generator=g) < 0.2] = 255
        pred = torch.where(torch.rand(h, w, generator=g) < 0.6, label % k, torch.randint(0, k, (h, w), generator=g))
        out.append((pred, label))
    return out


def test_matches_numpy_reference_on_random_images():
    images, k = random_images(6, 7), 7
    acc = MIoUAccumulator(k)
    totals = [np.zeros(k, dtype=np.int64) for _ in range(4)]
    for pred, label in images:
        ours = intersect_and_union(pred, label, k)
        ref = reference_areas(pred.numpy(), label.numpy(), k)
        for t, o, r in zip(totals, ours, ref, strict=True):
            np.testing.assert_array_equal(o.numpy(), r)
            t += r
        acc.update(pred, label)
    assert totals[1].min() > 0  # every class occurs, so plain means apply
    assert acc.summary()["mIoU"] == float(np.round((totals[0] / totals[1]).mean() * 100, 2))
    assert acc.summary()["mAcc"] == float(np.round((totals[0] / totals[3]).mean() * 100, 2))
    assert acc.summary()["aAcc"] == float(np.round(totals[0].sum() / totals[3].sum() * 100, 2))


def test_merge_equals_single_accumulation():
    images = random_images(7, 5, seed=1)
    single, parts = MIoUAccumulator(5), [MIoUAccumulator(5) for _ in range(3)]
    for i, (pred, label) in enumerate(images):
        single.update(pred, label)
        parts[i % 3].update(pred, label)
    merged = MIoUAccumulator.merge(parts)
    for key, value in single.state_dict().items():
        assert torch.equal(merged.state_dict()[key], value), key
    assert merged.summary() == single.summary() and merged.num_images == 7
    assert parts[0].summary() != single.summary()  # the parts alone do differ
    restored = MIoUAccumulator(5)
    restored.load_state_dict(single.state_dict())
    assert restored.state_dict().keys() == single.state_dict().keys()
    assert restored.summary() == single.summary() and restored.num_images == 7
    with pytest.raises(ValueError, match="cannot merge"):
        MIoUAccumulator.merge([single, MIoUAccumulator(6)])
    with pytest.raises(ValueError, match="expected \\(6,\\)"):
        MIoUAccumulator(6).load_state_dict(single.state_dict())


def test_batched_update_equals_per_image():
    images = random_images(3, 4, seed=2)
    pred = torch.stack([p[:5, :5] for p, _ in images])
    label = torch.stack([lbl[:5, :5] for _, lbl in images])
    batched, single = MIoUAccumulator(4), MIoUAccumulator(4)
    batched.update(pred, label)
    for p, lbl in zip(pred, label, strict=True):
        single.update(p, lbl)
    assert all(torch.equal(batched.state_dict()[k], v) for k, v in single.state_dict().items())


def test_bad_inputs():
    with pytest.raises(ValueError, match="differ in shape"):
        intersect_and_union(PRED, LABEL[:, :2], K)
    with pytest.raises(ValueError, match=r"label values must lie in \[0, 4\)"):
        intersect_and_union(PRED, torch.tensor([[0, 0, 4], [255, 1, 0]]), K)  # e.g. labels not reduced
    with pytest.raises(ValueError, match="prediction values"):
        intersect_and_union(PRED, LABEL, 2)
    with pytest.raises(ValueError, match=r"\(H, W\) or \(B, H, W\)"):
        MIoUAccumulator(K).update(PRED.flatten(), LABEL.flatten())


def test_empty_accumulator_gives_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = MIoUAccumulator(3).summary()
    assert all(math.isnan(v) for v in summary.values())


def test_all_ignored_image_counts_nothing():
    acc = MIoUAccumulator(3)
    acc.update(torch.zeros(4, 4, dtype=torch.long), torch.full((4, 4), 255))
    assert int(acc.area_union.sum()) == 0 and acc.num_images == 1


def test_paper_results():
    assert PAPER_MIOU == {
        "linear_probe": 47.2,
        "head_tuning": 54.9,
        "full_tuning": 58.9,
        "fewshot_1of16": 46.5,
        "fewshot_1of8": 50.0,
        "fewshot_1of4": 53.3,
        "fewshot_1of2": 55.8,
        "fewshot_1of1": 57.2,
    }
