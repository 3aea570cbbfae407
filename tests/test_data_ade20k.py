"""ADE20K: every mmseg pipeline step on hand-made arrays, the dataset on a generated mini ADE20K, few-shot subsets,
split files, and every user error."""

import hashlib
import random
import time
from pathlib import Path

import numpy as np
import pytest
import seg_numpy_reference as R
import torch
from PIL import Image

from internvit.data import seg_transforms as T
from internvit.data.ade20k import ADE20K, ADE20K_CLASS_NAMES, ADE20K_CLASSES, ADE20K_PALETTE
from internvit.data.segmentation import (
    make_fewshot_subset,
    read_split_file,
    reduce_labels,
    split_hash,
    write_split_file,
)
from internvit.demo.ade20k import CLASS_COLOURS, make_mini_ade20k, used_classes
from internvit.errors import InternViTError


class ScriptedRng:
    """Stands in for np.random.Generator: hands out scripted values in order and records every call."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)
        self.calls: list[tuple] = []

    def _next(self, call: tuple) -> float:
        self.calls.append(call)
        assert self.values, f"unscripted draw {call}"
        return self.values.pop(0)

    def random(self) -> float:
        value = self._next(("random",))
        assert 0 <= value < 1
        return value

    def integers(self, low: int, high: int | None = None) -> int:
        low, high = (0, low) if high is None else (low, high)
        value = self._next(("integers", low, high))
        assert low <= value < high, (value, low, high)
        return value

    def uniform(self, low: float, high: float) -> float:
        value = self._next(("uniform", low, high))
        assert low <= value < high, (value, low, high)
        return value


class SpyRng(ScriptedRng):
    """Records the calls of a real Generator (for range checks over many random draws)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.gen = np.random.default_rng(seed)

    def _next(self, call: tuple) -> float:
        self.calls.append(call)
        kind, *args = call
        return self.gen.random() if kind == "random" else getattr(self.gen, kind)(*args)


def expect_error(match: str, fn, *args, **kwargs) -> InternViTError:
    with pytest.raises(InternViTError, match=match) as info:
        fn(*args, **kwargs)
    assert info.value.fix.strip(), "every user error carries a fix"
    return info.value


# ----------------------------------------------------------------------------------------------- resizing


def test_keep_ratio_size_arithmetic():
    assert T.keep_ratio_size(375, 500, (2016, 504)) == (504, 672)
    assert T.keep_ratio_size(4, 6, (9, 5)) == (5, 8)  # factor 1.25: 7.5 rounds up by int(x + 0.5), not down
    assert T.keep_ratio_size(100, 1000, (2016, 504)) == (202, 2016)  # long side cap: factor 2.016, 201.6 -> 202
    assert T.keep_ratio_size(1000, 100, (504, 2016)) == (2016, 202)  # scale order does not matter


def test_resize_ratio_range_draws_one_ratio_and_rounds():
    img, label = np.zeros((61, 100, 3), np.uint8), np.zeros((61, 100), np.int64)
    rng = ScriptedRng(0.2)  # r = 0.2 * 1.5 + 0.5 = 0.8 -> target (1612, 403); factor 403/61; w 660.66 -> 661
    out_img, out_label = T.resize_ratio_range(img, label, rng)
    assert rng.calls == [("random",)]
    assert out_img.shape == (403, 661, 3) and out_label.shape == (403, 661)
    out_img, _ = T.resize_ratio_range(np.zeros((504, 504, 3), np.uint8), np.zeros((504, 504)), ScriptedRng(0.0))
    assert out_img.shape == (252, 252, 3)  # r = 0.5: target (1008, 252)


def test_bilinear_matches_hand_computed_cv2_values():
    img = np.array([[0, 64], [128, 192]], np.uint8)  # half-pixel centres, edges clamped, no antialias
    expected = [[0, 16, 48, 64], [32, 48, 80, 96], [96, 112, 144, 160], [128, 144, 176, 192]]
    assert T.resize_bilinear(img, (4, 4)).tolist() == expected
    rgb = np.stack([img, img, 255 - img], axis=-1)
    assert T.resize_bilinear(rgb, (4, 4))[..., 2].tolist() == (255 - np.array(expected)).tolist()
    assert T.resize_bilinear(np.array([[0, 100, 200, 40]], np.uint8), (1, 2)).tolist() == [[50, 120]]
    assert (T.resize_bilinear(np.full((5, 7, 3), 77, np.uint8), (13, 3)) == 77).all()
    same = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert (T.resize_bilinear(same, (3, 4)) == same).all()


def test_nearest_uses_cv2_index_rule():
    label = np.array([[1, 2], [3, 4]])
    assert T.resize_nearest(label, (3, 5)).tolist() == [[1, 1, 1, 2, 2], [1, 1, 1, 2, 2], [3, 3, 3, 4, 4]]


# ----------------------------------------------------------------------------------------------- crop, flip


def test_crop_rejects_single_class_then_accepts():
    label = np.array([[1, 1, 1, 1, 2, 2, 3, 3]] * 4)
    img = np.arange(4 * 8 * 3, dtype=np.uint8).reshape(4, 8, 3)
    rng = ScriptedRng(0, 0, 0, 4)  # first crop: only class 1 (rejected); second: classes 2, 3 at 50%
    out_img, out_label = T.random_crop_cat_max(img, label, rng, crop=(4, 4))
    assert rng.calls == [("integers", 0, 1), ("integers", 0, 5)] * 2
    assert (out_label == label[:, 4:]).all() and (out_img == img[:, 4:]).all()


@pytest.mark.parametrize(
    ("crop_label", "accepted"),
    [
        ([[1, 1], [1, 2]], False),  # largest class exactly 75%: not < 0.75
        ([[1, 1], [2, 2]], True),
        ([[1, 255], [2, 255]], True),  # ignored pixels do not count
        ([[1, 255], [255, 255]], False),  # one non-ignored class
        ([[1, 255], [1, 255]], False),  # ignore is not a class (it would make a 50/50 pair)
    ],
)
def test_crop_acceptance_rule(crop_label, accepted):
    label = np.concatenate([np.array(crop_label), np.array([[3, 4], [4, 3]])], axis=1)
    rng = ScriptedRng(0, 0, 0, 2)
    _, out = T.random_crop_cat_max(np.zeros((2, 4, 3), np.uint8), label, rng, crop=(2, 2))
    assert len(rng.calls) == (2 if accepted else 4)
    assert (out == (np.array(crop_label) if accepted else label[:, 2:])).all()


def test_crop_falls_back_to_the_eleventh_draw():
    label = np.full((4, 14), 7)  # every crop is single-class
    img = np.tile(np.arange(14, dtype=np.uint8)[None, :, None], (4, 1, 3))
    rng = ScriptedRng(*[v for x in range(11) for v in (0, x)])
    out_img, out_label = T.random_crop_cat_max(img, label, rng, crop=(4, 4))
    assert len(rng.calls) == 22 and not rng.values
    assert out_img[0, :, 0].tolist() == [10, 11, 12, 13]  # the 11th offset, x = 10
    short = T.random_crop_cat_max(img[:3], label[:3], ScriptedRng(0, 3), crop=(4, 4), cat_max_ratio=1.0)
    assert short[0].shape == (3, 4, 3)  # a side shorter than the crop is kept whole; one draw without the rule


def test_flip_moves_image_and_label_together():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    label = np.array([[0, 1, 2], [3, 4, 5]])
    flipped_img, flipped_label = T.random_flip(img, label, ScriptedRng(0.49))
    assert flipped_label.tolist() == [[2, 1, 0], [5, 4, 3]] and (flipped_img == img[:, ::-1]).all()
    kept_img, kept_label = T.random_flip(img, label, ScriptedRng(0.5))
    assert (kept_img == img).all() and (kept_label == label).all()


# ----------------------------------------------------------------------------------------------- photometric


def test_photometric_mode1_contrast_right_after_brightness_with_truncation_and_clipping():
    img = np.array([[[100, 250, 5]]], np.uint8)
    rng = ScriptedRng(1, 10.7, 1, 1, 1.2, 0, 0)
    out = T.photometric_distortion(img, rng)
    coin = ("integers", 0, 2)
    assert rng.calls == [coin, ("uniform", -32, 32), coin, coin, ("uniform", 0.5, 1.5), coin, coin]
    assert out.tolist() == [[[132, 255, 18]]]  # 110.7 -> 110 -> 132; 260.7 -> 255 -> 255; 15.7 -> 15 -> 18


def test_photometric_mode0_contrast_last():
    img = np.full((2, 4, 3), 100, np.uint8)  # grey: saturation and hue leave it unchanged
    rng = ScriptedRng(1, -20.5, 0, 1, 0.5, 1, 17, 1, 0.8)
    out = T.photometric_distortion(img, rng)
    coin = ("integers", 0, 2)
    assert rng.calls == [
        coin, ("uniform", -32, 32), coin,
        coin, ("uniform", 0.5, 1.5),  # saturation
        coin, ("integers", -18, 18),  # hue (upper bound exclusive)
        coin, ("uniform", 0.5, 1.5),  # contrast last
    ]  # fmt: skip
    assert (out == 63).all()  # 79.5 -> 79, then 79 * 0.8 = 63.2 -> 63
    assert (T.photometric_distortion(img, ScriptedRng(0, 0, 0, 0, 0)) == img).all()  # every step off


def test_photometric_ranges_over_many_draws():
    img = np.random.default_rng(0).integers(0, 256, size=(3, 5, 3), dtype=np.uint8)
    rng = SpyRng(1)
    for _ in range(300):
        out = T.photometric_distortion(img, rng)
        assert out.dtype == np.uint8 and out.shape == img.shape
    kinds = {call for call in rng.calls}
    assert kinds == {("integers", 0, 2), ("uniform", -32, 32), ("uniform", 0.5, 1.5), ("integers", -18, 18)}


def test_hsv_matches_opencv_on_known_colours():
    known = {  # BGR -> OpenCV uint8 HSV (H in [0, 180)), from cv2.cvtColor
        (0, 0, 255): (0, 255, 255), (0, 255, 0): (60, 255, 255), (255, 0, 0): (120, 255, 255),
        (255, 255, 255): (0, 0, 255), (0, 0, 0): (0, 0, 0), (128, 128, 128): (0, 0, 128),
        (0, 128, 255): (15, 255, 255), (200, 100, 50): (110, 191, 200), (10, 20, 30): (15, 170, 30),
        (255, 0, 255): (150, 255, 255), (0, 255, 255): (30, 255, 255),
    }  # fmt: skip
    bgr = np.array([list(known)], np.uint8)
    assert T.bgr_to_hsv(bgr)[0].tolist() == [list(v) for v in known.values()]
    pure = bgr[:, [0, 1, 2, 3, 4, 8, 9, 10]]
    assert (T.hsv_to_bgr(T.bgr_to_hsv(pure)) == pure).all()


def test_hsv_round_trip():
    bgr = np.random.default_rng(0).integers(0, 256, size=(200, 300, 3), dtype=np.uint8)
    hsv = T.bgr_to_hsv(bgr)
    assert hsv[..., 0].max() < 180
    back = T.hsv_to_bgr(hsv).astype(int)
    assert np.abs(back - bgr).max() <= 5 and (back == bgr).all(-1).mean() > 0.1  # uint8 HSV quantisation, truncation


# ----------------------------------------------------------------------------------------------- normalize, pad, test


def test_normalize_is_rgb():
    out = T.normalize(np.array([[[255, 0, 128]]], np.uint8))
    expected = [(255 - 123.675) / 58.395, (0 - 116.28) / 57.12, (128 - 103.53) / 57.375]
    assert out.dtype == np.float32 and np.allclose(out[0, 0], expected, atol=1e-6)


def test_pad_bottom_right():
    img, label = np.full((3, 2, 3), -1.5, np.float32), np.full((3, 2), 4)
    out_img, out_label = T.pad_to(img, label, (4, 4))
    assert (out_img[:3, :2] == -1.5).all() and (out_img[3:] == 0).all() and (out_img[:, 2:] == 0).all()
    assert (out_label[:3, :2] == 4).all() and (out_label[3:] == 255).all() and (out_label[:, 2:] == 255).all()
    with pytest.raises(ValueError, match="cannot pad"):
        T.pad_to(np.zeros((5, 2, 3)), np.zeros((5, 2)), (4, 4))


@pytest.mark.parametrize(
    ("size", "setr", "keep_ratio"),
    [
        ((375, 500), (504, 672), (504, 672)),
        ((300, 457), (504, 770), (504, 770)),  # 768 -> 770: rounded up to a multiple of 14
        ((1000, 333), (1526, 504), (1526, 504)),  # 1514 -> 1526
        ((100, 1000), (504, 5040), (210, 2016)),  # SETR: long side not capped; keep-ratio: capped at 2016
        ((600, 2100), (504, 1764), (504, 1764)),
    ],
)
def test_test_resizes(size, setr, keep_ratio):
    img = np.full((*size, 3), 90, np.uint8)
    out, ori = T.setr_resize_to_multiple(img)
    assert out.shape[:2] == setr and ori == size and (out == 90).all()
    out, ori = T.resize_keep_ratio_to_multiple(img)
    assert out.shape[:2] == keep_ratio and ori == size


def test_resize_to_multiple_stretches_bilinearly():
    img = np.array([[0, 140]] * 3, np.uint8)
    assert T.resize_to_multiple(img, 3).tolist() == [[0, 70, 140]] * 3  # width 2 -> 3: centre is the average
    assert T.resize_to_multiple(np.zeros((14, 28, 3), np.uint8), 14).shape == (14, 28, 3)


# ----------------------------------------------------------------------------------------------- dataset


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    return make_mini_ade20k(tmp_path_factory.mktemp("ade"))


def test_mini_ade_is_deterministic_fast_and_in_layout(tmp_path):
    start = time.perf_counter()
    a = make_mini_ade20k(tmp_path / "a", seed=3)
    assert time.perf_counter() - start < 2.0
    b, c = make_mini_ade20k(tmp_path / "b", seed=3), make_mini_ade20k(tmp_path / "c", seed=4)

    def digest(root: Path) -> list[tuple[str, str]]:
        return [
            (p.relative_to(root).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*.*"))
        ]

    assert digest(a) == digest(b) != digest(c)
    assert a.name == "ADEChallengeData2016"
    assert len(list((a / "images" / "training").glob("ADE_train_*.jpg"))) == 24
    assert len(list((a / "annotations" / "validation").glob("ADE_val_*.png"))) == 6


def test_dataset_reads_reduced_labels(mini):
    train = ADE20K(mini.parent, "training")  # the parent of ADEChallengeData2016 works too
    assert len(train) == 24 and len(ADE20K(mini, "validation")) == 6 and len(ADE20K(mini, "val")) == 6
    assert train.names == sorted(train.names) and train.names[0] == "ADE_train_00000001"
    item = train[3]
    assert set(item) == {"img", "label", "index", "ori_size", "path"}
    assert item["img"].dtype == torch.uint8 and item["img"].shape == (3, 70, 84) and item["ori_size"] == (70, 84)
    assert item["label"].dtype == torch.uint8 and item["label"].shape == (70, 84) and item["index"] == 3
    rgb = np.array(Image.open(mini / "images" / "training" / "ADE_train_00000004.jpg"))
    assert (item["img"].numpy().transpose(1, 2, 0) == rgb).all()  # OpenCV's decoding equals Pillow's here
    raw = np.array(Image.open(mini / "annotations" / "training" / "ADE_train_00000004.png"))
    label = item["label"].numpy()
    assert (label[raw == 0] == 255).all() and (label[raw > 0] == raw[raw > 0] - 1).all()
    assert set(np.unique(label)) <= {c - 1 for c in used_classes()} | {255} and (raw == 0).any()
    assert reduce_labels(np.array([0, 1, 150, 255], np.uint8), True).tolist() == [255, 0, 149, 255]
    assert reduce_labels(np.array([0, 1, 150, 255], np.int32), True).tolist() == [255, 0, 149, 255]


def test_mini_ade_is_learnable_colour_per_class(mini):
    train = ADE20K(mini, "training")
    img, raw = train.load_raw(0)
    img = img[..., ::-1]  # BGR, as OpenCV decodes
    for cls, colour in zip(used_classes(), CLASS_COLOURS, strict=True):
        if (raw == cls).sum() > 50:
            assert np.abs(np.median(img[raw == cls], axis=0) - colour).max() < 15


def test_dataset_with_pipelines(mini):
    seen = []

    def spy(img, label, index):
        seen.append((img.dtype, img.shape, label.dtype, index))
        return img, label

    ADE20K(mini, "training", pipeline=spy)[2]
    assert seen == [(np.uint8, (70, 84, 3), np.uint8, 2)]
    pipeline = T.TrainPipeline(crop=504, seed=0)
    train = ADE20K(mini, "training", pipeline=pipeline)
    a, b, c = train[0], train[0], train[1]
    assert a["img"].shape == (3, 504, 504) and a["label"].shape == (504, 504) and a["ori_size"] == (70, 84)
    assert a["img"].dtype == torch.uint8 and a["label"].dtype == torch.uint8 and len(a["valid_size"]) == 2
    assert torch.equal(a["img"], b["img"]) and not torch.equal(a["img"], c["img"])  # per (seed, epoch, index)
    pipeline.set_epoch(1)
    assert not torch.equal(train[0]["img"], a["img"])
    assert set(a["label"].unique().tolist()) <= {c - 1 for c in used_classes()} | {255}
    val = ADE20K(mini, "validation", pipeline=T.TestPipeline("setr"))[0]
    assert val["img"].shape == (3, 504, 616) and val["label"].shape == (70, 84)  # 84*7.2 = 604.8 -> 605 -> 616


# ----------------------------------------------------------------------------------------------- few-shot, split files


def test_fewshot_subsets():
    names = [f"ADE_train_{i:08d}" for i in range(1, 20211)]
    shuffled = random.Random(0).sample(names, len(names))
    for k, size in ((16, 1263), (8, 2526), (4, 5052), (2, 10105)):
        subset = make_fewshot_subset(shuffled, k, seed=0)
        assert len(subset) == size and subset == sorted(subset) and set(subset) <= set(names)
    assert make_fewshot_subset(names, 16, seed=1) == make_fewshot_subset(names, 16, seed=1)
    assert make_fewshot_subset(names, 16, seed=1) != make_fewshot_subset(names, 16, seed=2)
    assert make_fewshot_subset(names, 1, seed=5) == names
    state = random.getstate()  # mmseg: random.seed(seed) (set_random_seed), then random.shuffle of the sorted list
    try:
        random.seed(7)
        reference = sorted(names)
        random.shuffle(reference)
    finally:
        random.setstate(state)
    assert make_fewshot_subset(names, 4, seed=7) == sorted(reference[:5052])
    expect_error("positive int", make_fewshot_subset, names, 0, 0)
    expect_error("duplicates", make_fewshot_subset, names + names[:1], 2, 0)


def test_split_file_round_trip_and_hash(tmp_path, mini):
    names = ["ADE_train_00000003", "ADE_train_00000001", "ADE_train_00000002"]
    path = write_split_file(tmp_path / "splits" / "x.txt", names)
    assert path.read_text() == "ADE_train_00000001\nADE_train_00000002\nADE_train_00000003\n"
    assert read_split_file(path) == sorted(names)
    assert split_hash(names) == hashlib.sha256(path.read_bytes()).hexdigest() == split_hash(sorted(names))
    assert split_hash(names[:2]) != split_hash(names)
    assert [p.name for p in path.parent.iterdir()] == ["x.txt"]  # no temporary files left
    subset = ADE20K(mini, "training", subset_file=path)
    assert subset.names == sorted(names) and len(subset) == 3
    assert subset[0]["path"].endswith("ADE_train_00000001.jpg")
    expect_error("no such split file", read_split_file, tmp_path / "missing.txt")
    (tmp_path / "dup.txt").write_text("a\nb\na\n")
    expect_error("more than once", read_split_file, tmp_path / "dup.txt")
    expect_error("cannot write split file", write_split_file, tmp_path / "bad.txt", ["a", " b"])


# ----------------------------------------------------------------------------------------------- errors


@pytest.fixture
def small(tmp_path) -> Path:
    return make_mini_ade20k(tmp_path, num_train=2, num_val=1)


def test_layout_errors(tmp_path, small):
    (tmp_path / "empty").mkdir()
    expect_error("no ADE20K layout", ADE20K, tmp_path / "empty")
    expect_error("does not exist", ADE20K, tmp_path / "nowhere")
    expect_error("unknown ADE20K split", ADE20K, small, "test")
    for png in (small / "annotations" / "validation").iterdir():
        png.unlink()
    (small / "annotations" / "validation").rmdir()
    expect_error("no annotations/validation/ folder", ADE20K, small, "validation")
    for jpg in (small / "images" / "training").iterdir():
        jpg.rename(jpg.with_suffix(".jpeg"))
    expect_error("no \\*.jpg images", ADE20K, small, "training")


def test_missing_annotation_names_both_files(small):
    (small / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    err = expect_error("without annotation", ADE20K, small, "training")
    assert "images/training/ADE_train_00000002.jpg" in err.message
    assert "annotations/training/ADE_train_00000002.png" in err.message


def test_bad_label_pngs(small):
    labels = small / "annotations" / "training"
    Image.fromarray(np.zeros((70, 83), np.uint8)).save(labels / "ADE_train_00000001.png")
    err = expect_error("is 83x70 \\(WxH\\) but its image", ADE20K(small, "training").__getitem__, 0)
    assert (
        "ADE_train_00000001.png" in err.message and "ADE_train_00000001.jpg" in err.message and "84x70" in err.message
    )
    bad = np.zeros((70, 84), np.uint8)
    bad[5, 5] = 151
    Image.fromarray(bad).save(labels / "ADE_train_00000001.png")
    expect_error("values 151 above 150", ADE20K(small, "training").__getitem__, 0)
    Image.fromarray(np.zeros((70, 84, 3), np.uint8)).save(labels / "ADE_train_00000002.png")
    expect_error("is a RGB image", ADE20K(small, "training").__getitem__, 1)
    (labels / "ADE_train_00000002.png").write_bytes(b"not a png")
    expect_error("cannot decode label", ADE20K(small, "training").__getitem__, 1)


def test_subset_file_with_unknown_names(small, tmp_path):
    path = write_split_file(tmp_path / "split.txt", ["ADE_train_00000001", "ADE_train_99999999"])
    expect_error("names 1 image\\(s\\) not in training: ADE_train_99999999", ADE20K, small, subset_file=path)


# ----------------------------------------------------------------------------------------------- metadata, cv2


def test_class_names_and_palette():
    assert len(ADE20K_CLASSES) == len(ADE20K_CLASS_NAMES) == len(ADE20K_PALETTE) == 150
    assert ADE20K_CLASSES[7] == "bed " and ADE20K_CLASS_NAMES[7] == "bed"
    assert ADE20K_CLASSES[:3] == ("wall", "building", "sky") and ADE20K_CLASSES[-1] == "flag"
    assert ADE20K_PALETTE[:4] == ((120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50))
    assert ADE20K_PALETTE[-1] == (92, 0, 255) and ADE20K_PALETTE[6] == ADE20K_PALETTE[48]  # mmseg repeats one


def test_opencv_steps_equal_the_numpy_reference():
    """The exact numpy re-implementation of OpenCV's arithmetic (tests/seg_numpy_reference.py, the pre-OpenCV
    pipeline) and the OpenCV calls agree on random sizes and pixels."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        (h, w), (nh, nw) = rng.integers(1, 90, size=2), rng.integers(1, 200, size=2)
        img = rng.integers(0, 256, size=(int(h), int(w), 3), dtype=np.uint8)
        assert (T.resize_bilinear(img, (nh, nw)) == R.resize_bilinear(img, (nh, nw))).all()
        assert (T.resize_nearest(img[..., 0], (nh, nw)) == R.resize_nearest(img[..., 0], (nh, nw))).all()
        assert (T.bgr_to_hsv(img) == R.bgr_to_hsv(img)).all()
        hsv = T.bgr_to_hsv(img)
        assert (T.hsv_to_bgr(hsv) == R.hsv_to_bgr(hsv)).all()


def _photo_image(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]].astype(np.float32)
    base = np.stack([xx * 0.4 + 60 * np.sin(yy / 9), yy * 0.5 + 50 * np.cos(xx / 13), (xx + yy) / 5], -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pipelines_bit_identical_to_the_numpy_pipeline(seed):
    """Same draws, same pixels, same labels: the OpenCV training and test pipelines (uint8 out, normalised on the
    device) against the numpy pipeline they replace (float32 normalised in the worker) on RGB input."""
    rng = np.random.default_rng(seed)
    for index in range(4):
        size = (int(rng.integers(100, 260)), int(rng.integers(100, 260)))
        rgb = _photo_image(rng, size)
        label = rng.integers(0, 6, size=size).astype(np.uint8)
        label[: size[0] // 5] = 255
        new, old = T.TrainPipeline(crop=112, seed=seed), R.TrainPipeline(crop=112, seed=seed)
        img, lab, valid = new(rgb[..., ::-1].copy(), label, index)
        ref_img, ref_lab = old(rgb, label.astype(np.int64), index)
        normalized = T.normalize_images(img[None], torch.tensor([valid]))[0]
        assert torch.equal(normalized, ref_img) and torch.equal(lab.long(), ref_lab)
        for mode in ("setr", "keep_ratio"):
            test_img, _ = T.TestPipeline(mode, short=112, scale=(448, 112))(rgb[..., ::-1].copy(), label)
            ref_test, _ = R.TestPipeline(mode, short=112, scale=(448, 112))(rgb, label)
            assert torch.equal(T.normalize_images(test_img[None])[0], ref_test)
