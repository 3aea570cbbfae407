"""Per-image classification metrics on hand-built tensors with answers known by hand (docs/protocol.md §3.2, 3.5)."""

import pytest
import torch

from internvit.classification.metrics import (
    PAPER_RESULTS,
    mask_from_indices,
    real_hits,
    restrict_logits,
    summarize,
    topk_hits,
)

# ranks per row, best first: row 0: 1, 3, 2, 0 / row 1: 0, 2, 1, 3 / row 2: 3, 2, 1, 0 (no ties)
LOGITS = torch.tensor([[0.1, 0.9, 0.3, 0.5], [0.8, 0.2, 0.7, 0.1], [0.2, 0.3, 0.4, 0.6]])
TARGETS = torch.tensor([1, 2, 0])  # ranks of the targets: 1st, 2nd, 4th


def as_list(t: torch.Tensor) -> list[bool]:
    assert t.dtype == torch.bool and t.ndim == 1
    return t.tolist()


def test_topk_hits_by_hand_with_k_clipped_to_the_class_count():
    hits = topk_hits(LOGITS, TARGETS, ks=(1, 2, 3, 5))
    assert set(hits) == {1, 2, 3, 5}
    assert as_list(hits[1]) == [True, False, False]
    assert as_list(hits[2]) == [True, True, False]
    assert as_list(hits[3]) == [True, True, False]
    assert as_list(hits[5]) == [True, True, True]  # only 4 classes: top-5 is top-4
    assert set(topk_hits(LOGITS, TARGETS)) == {1, 5}


def test_topk_hits_bad_inputs():
    with pytest.raises(ValueError, match="3 rows but 2 labels"):
        topk_hits(LOGITS, TARGETS[:2])
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 4\)"):
        topk_hits(LOGITS, torch.tensor([1, 4, 0]))
    with pytest.raises(ValueError, match="ks must be positive"):
        topk_hits(LOGITS, TARGETS, ks=(0, 1))
    with pytest.raises(ValueError, match=r"shape \(B, K\)"):
        topk_hits(LOGITS[0], TARGETS[:1])


# 4 images, 6 classes; image 2 has an empty ReaL set and must not be scored
REAL_LOGITS = torch.tensor(
    [
        [0.0, 1, 2, 3, 4, 5],  # arg-max 5, top-5 = 5 4 3 2 1
        [5.0, 4, 3, 2, 1, 0],  # arg-max 0, top-5 = 0 1 2 3 4
        [9.0, 0, 0, 0, 0, 1],  # (would be right for its original label, but has no ReaL labels)
        [0.0, 5, 1, 2, 3, 4],  # arg-max 1, top-5 = 1 5 4 3 2 (class 0 is last)
    ]
)
REAL_SETS = [[5], [4, 5], [], [0]]


def test_real_hits_by_hand():
    valid, top1, top5 = real_hits(REAL_LOGITS, REAL_SETS)
    assert as_list(valid) == [True, True, False, True]
    assert as_list(top1) == [True, False, False, False]
    assert as_list(top5) == [True, True, False, False]
    summary = summarize(top1, top5, valid)
    assert summary["num_images"] == 3  # the empty set is left out of the denominator
    assert summary["acc1"] == pytest.approx(100 / 3) and summary["acc5"] == pytest.approx(200 / 3)
    assert summarize(top1, top5)["acc1"] == pytest.approx(25.0)  # what counting it would wrongly give


def test_real_hits_any_label_of_a_multi_label_set_counts():
    valid, top1, top5 = real_hits(torch.tensor([[0.0, 3, 1], [2.0, 0, 1]]), [[2, 1], [1, 0]])
    assert as_list(valid) == [True, True] and as_list(top1) == [True, True] and as_list(top5) == [True, True]


def test_real_hits_bad_inputs():
    with pytest.raises(ValueError, match="4 rows but 3 labels"):
        real_hits(REAL_LOGITS, REAL_SETS[:3])
    with pytest.raises(ValueError, match=r"image 1 must lie in \[0, 6\)"):
        real_hits(REAL_LOGITS, [[5], [6], [], [0]])


def test_restrict_logits_keeps_column_order_and_maps_targets():
    # 10 "1k" classes, a 3-class subset {2, 5, 7}: subset target j is 1k class [2, 5, 7][j]
    mask = mask_from_indices([7, 2, 5], num_classes=10)
    assert mask.tolist() == [False, False, True, False, False, True, False, True, False, False]
    logits = torch.tensor(
        [
            [0.0, 0, 3, 0, 0, 4, 0, 1, 0, 9],  # best overall is class 9 (not in the subset); best in it: 5
            [0.0, 8, 6, 0, 0, 4, 0, 5, 0, 0],  # best in the subset: 2, then 7, then 5
        ]
    )
    sub = restrict_logits(logits, mask)
    assert sub.tolist() == [[3.0, 4.0, 1.0], [6.0, 4.0, 5.0]]
    targets = torch.tensor([1, 2])  # 1k classes 5 and 7
    hits = topk_hits(sub, targets, ks=(1, 2))
    assert as_list(hits[1]) == [True, False] and as_list(hits[2]) == [True, True]
    assert as_list(topk_hits(logits, torch.tensor([5, 7]), ks=(1,))[1]) == [False, False]  # unrestricted: wrong


def test_restrict_logits_and_mask_bad_inputs():
    logits = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        restrict_logits(logits, torch.tensor([1, 0, 1, 0]))  # 0/1 ints would silently index columns
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        restrict_logits(logits, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="selects no class"):
        restrict_logits(logits, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="must not repeat"):
        mask_from_indices([1, 1], num_classes=4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        mask_from_indices([4], num_classes=4)


def test_summarize_counts_and_errors():
    hits1 = torch.tensor([True, False, True, True, False, False, False, True])
    hits5 = torch.tensor([True, True, True, True, False, True, False, True])
    assert summarize(hits1, hits5) == {"acc1": 50.0, "acc5": 75.0, "num_images": 8}
    valid = torch.tensor([True] * 4 + [False] * 4)
    assert summarize(hits1, hits5, valid) == {"acc1": 75.0, "acc5": 100.0, "num_images": 4}
    with pytest.raises(ValueError, match="no images to score"):
        summarize(hits1, hits5, torch.zeros(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="one shape"):
        summarize(hits1, hits5[:4])
    with pytest.raises(ValueError, match="valid has shape"):
        summarize(hits1, hits5, valid[:4])


def test_per_image_hits_gathered_from_ranks_count_each_image_once():
    """Concatenating per-image hits of two ranks and dropping sampler padding gives the exact single-pass answer."""
    targets = torch.tensor([0, 1, 2, 3, 0])
    logits = torch.eye(4)[[0, 1, 3, 3, 1]]  # images 0, 1, 3 right; 2 and 4 wrong
    rank0, rank1 = [0, 2, 4], [1, 3, 0]  # 5 images over 2 ranks: image 0 is padded onto rank 1
    parts = [(idx, topk_hits(logits[idx], targets[idx], ks=(1,))[1]) for idx in (rank0, rank1)]
    index = torch.tensor(rank0 + rank1)
    hits = torch.cat([h for _, h in parts])
    first = torch.tensor([i == index.tolist().index(int(j)) for i, j in enumerate(index)])  # drop repeats
    assert summarize(hits[first], hits[first])["acc1"] == pytest.approx(60.0)
    assert summarize(hits, hits)["acc1"] == pytest.approx(400 / 6)  # counting padding twice is wrong


def test_paper_results():
    assert PAPER_RESULTS == {"in1k": 88.2, "real": 90.4, "v2": 79.9, "a": 77.5, "r": 89.8, "sketch": 69.1}
