"""ImageNet datasets in every on-disk layout, ReaL, A/R masks, class names, transforms and every user error."""

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torch.utils.data import DataLoader

from internvit.data.custom import CustomSplit, custom_classes, load_classes_file
from internvit.data.imagenet import (
    ImageNetAR,
    ImageNetSketch,
    ImageNetSplit,
    ImageNetV2,
    build_dataset,
    collate_skip_none,
)
from internvit.data.imagenet_meta import (
    IMAGENET_A_INDICES,
    IMAGENET_R_INDICES,
    image_number,
    imagenet_1k_categories,
    load_real_labels,
    load_wnids,
)
from internvit.data.images import load_image, read_image_bgr
from internvit.data.transforms import build_eval_transform, build_train_transform
from internvit.demo.imagenet import PALETTE, SYNSETS, make_mini_custom, make_mini_imagenet
from internvit.errors import InternViTError
from internvit.weights.tags import IMAGENET_MEAN, IMAGENET_STD

WNIDS = [wnid for wnid, _ in SYNSETS]


def expect_error(match: str, fn, *args, **kwargs) -> InternViTError:
    with pytest.raises(InternViTError, match=match) as info:
        fn(*args, **kwargs)
    assert info.value.fix.strip(), "every user error carries a fix"
    return info.value


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> dict[str, Path]:
    return make_mini_imagenet(tmp_path_factory.mktemp("mini"))


def val_txt_labels(mini) -> dict[str, int]:
    return {name: int(label) for name, label in (line.split() for line in mini["val_txt"].read_text().splitlines())}


def flat_val(mini, root: Path, *, train: bool = True) -> Path:
    """A copy of the mini val set in the flat layout (val/ILSVRC2012_val_*.JPEG), optionally beside train/."""
    (root / "val").mkdir(parents=True)
    for path in (mini["in1k"] / "val").glob("*/*.JPEG"):
        shutil.copy(path, root / "val" / path.name)
    if train:
        os.symlink(mini["in1k"] / "train", root / "train")
    return root


def write_devkit(folder: Path, labels: dict[str, int]) -> dict[str, int]:
    """A devkit whose ILSVRC2012_IDs are NOT in sorted-wnid order, plus non-leaf synsets that must be ignored."""
    ids = {wnid: len(WNIDS) - k for k, wnid in enumerate(WNIDS)}  # reversed: n01518878 -> 1, n01440764 -> 10
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    rows = [(ids[w], w, name, 0) for w, name in SYNSETS] + [(11, "n00001740", "entity", 3), (12, "n01317541", "x", 2)]
    synsets = np.zeros((len(rows), 1), dtype=dtype)
    for i, (sid, wnid, words, children) in enumerate(rows):
        synsets[i, 0] = (np.array([[sid]], np.uint16), wnid, words, np.array([[children]], np.uint8))
    (folder / "data").mkdir(parents=True)
    scipy.io.savemat(folder / "data" / "meta.mat", {"synsets": synsets})
    gt = [ids[WNIDS[labels[f"ILSVRC2012_val_{n:08d}.JPEG"]]] for n in range(1, len(labels) + 1)]
    (folder / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{i}\n" for i in gt))
    return ids


def tiny_image(path: Path, colour=(10, 200, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), colour).save(path)


# ----------------------------------------------------------------------------------------------- synthetic data


def test_mini_imagenet_layout_is_real(mini):
    root = mini["in1k"]
    assert sorted(p.name for p in (root / "train").iterdir()) == WNIDS
    assert len(list((root / "train").glob("n01440764/n01440764_*.JPEG"))) == 24
    val = sorted(p.name for p in (root / "val").glob("*/*.JPEG"))
    assert val == [f"ILSVRC2012_val_{n:08d}.JPEG" for n in range(1, 61)]
    labels = val_txt_labels(mini)
    for path in (root / "val").glob("*/*.JPEG"):
        assert WNIDS[labels[path.name]] == path.parent.name
    assert [labels[name] for name in val] != sorted(labels.values()), "val numbering interleaves classes"
    real = json.loads(mini["real_json"].read_text())
    assert len(real) == 60 and any(r == [] for r in real) and any(len(r) == 2 for r in real)
    assert all(labels[f"ILSVRC2012_val_{i + 1:08d}.JPEG"] in r for i, r in enumerate(real) if r)
    assert mini["synset_mapping"].read_text().splitlines()[0] == "n01440764 tench, Tinca tinca"
    assert len(list((mini["v2"] / "ImageNetV2-matched-frequency" / "9").glob("*.jpeg"))) == 3
    assert {p.name for p in mini["a"].iterdir()} != {p.name for p in mini["r"].iterdir()}
    assert len(list(mini["sketch"].glob("*/*.JPEG"))) == 30


def test_mini_imagenet_is_deterministic_fast_and_learnable(tmp_path, mini):
    def digest(root):
        return {p.relative_to(root): hashlib.md5(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}

    start = time.perf_counter()
    make_mini_imagenet(tmp_path / "a")
    assert time.perf_counter() - start < 3.0
    make_mini_imagenet(tmp_path / "b", num_classes=3, train_per_class=2, val_per_class=2)
    make_mini_imagenet(tmp_path / "c", num_classes=3, train_per_class=2, val_per_class=2)
    assert digest(tmp_path / "a") == digest(mini["root"])
    assert digest(tmp_path / "b") == digest(tmp_path / "c")
    # nearest class mean on the mean colour separates the classes: a probe has something to learn
    train, val = ImageNetSplit(mini["in1k"], "train"), ImageNetSplit(mini["in1k"], "val")

    def colour(ds):
        return torch.tensor(np.stack([np.asarray(Image.open(p)).reshape(-1, 3).mean(0) for p, _ in ds.samples]))

    x, y = colour(train), torch.tensor(train.targets)
    means = torch.stack([x[y == k].mean(0) for k in range(10)])
    pred = torch.cdist(colour(val), means).argmin(1)
    assert (pred == torch.tensor(val.targets)).float().mean() > 0.95
    assert len(PALETTE) == len(SYNSETS) == 10
    expect_error("out of range", make_mini_imagenet, tmp_path / "d", num_classes=11)


# ----------------------------------------------------------------------------------------------- IN-1K layouts


def test_train_split_labels_are_sorted_wnid_indices(mini):
    ds = ImageNetSplit(mini["in1k"], "train")
    assert ds.classes == WNIDS and ds.num_classes == 10 and len(ds) == 240 and ds.name == "in1k-train"
    assert all(ds.classes[t] == p.parent.name for p, t in ds.samples)
    image, target, index = ds[100]
    assert isinstance(image, Image.Image) and target == ds.samples[100][1] and index == 100
    assert ds.class_names[:3] == ["tench", "goldfish", "great white shark"]  # from LOC_synset_mapping.txt


def test_val_class_folders(mini):
    ds = ImageNetSplit(mini["in1k"], "val", transform=build_eval_transform(16))
    labels = val_txt_labels(mini)
    assert len(ds) == 60 and all(labels[p.name] == t for p, t in ds.samples)
    image, target, index = ds[7]
    assert image.shape == (3, 16, 16) and index == 7 and target == labels[ds.samples[7][0].name]


@pytest.mark.parametrize("where", ["explicit", "root", "meta_data"])
def test_flat_val_with_val_txt(mini, tmp_path, where):
    root = flat_val(mini, tmp_path / "in1k")
    labels = None
    if where == "explicit":
        labels = shutil.copy(mini["val_txt"], tmp_path / "my_labels.txt")
    else:
        (root / ("meta_data" if where == "meta_data" else "")).mkdir(exist_ok=True)
        shutil.copy(mini["val_txt"], root / ("meta_data" if where == "meta_data" else "") / "val.txt")
    ds = build_dataset("in1k", root, split="val", labels=labels)
    assert [p.name for p, _ in ds.samples] == [f"ILSVRC2012_val_{n:08d}.JPEG" for n in range(1, 61)]
    assert [t for _, t in ds.samples] == list(val_txt_labels(mini).values())
    assert ds.classes == WNIDS  # label space from train/


def test_flat_val_without_wnid_list_is_the_1k_space_with_torchvision_names(mini, tmp_path):
    root = flat_val(mini, tmp_path / "in1k", train=False)
    shutil.copy(mini["val_txt"], root / "val.txt")
    ds = ImageNetSplit(root, "val")
    assert ds.num_classes == 1000 and ds.class_names[:2] == ["tench", "goldfish"]
    assert ds.class_names == imagenet_1k_categories() and len(set(ds.class_names)) > 990


@pytest.mark.parametrize("how", ["devkit_dir", "ground_truth_file", "auto"])
def test_flat_val_with_devkit_maps_ids_through_meta_mat(mini, tmp_path, how):
    root = flat_val(mini, tmp_path / "in1k", train=(how != "auto"))
    labels = val_txt_labels(mini)
    devkit = root / "ILSVRC2012_devkit_t12"
    ids = write_devkit(devkit, labels)
    arg = {"devkit_dir": devkit, "ground_truth_file": devkit / "data/ILSVRC2012_validation_ground_truth.txt"}
    ds = ImageNetSplit(root, "val", labels=arg.get(how))
    assert {p.name: t for p, t in ds.samples} == labels
    assert ds.classes == WNIDS  # the devkit's leaves, sorted (no train/ in the "auto" case)
    assert any(ids[WNIDS[t]] - 1 != t for t in labels.values()), "IDs differ from labels, so the mapping matters"


def test_real_labels_match_by_file_number(mini):
    ds = build_dataset("real", mini["in1k"])
    raw = json.loads(mini["real_json"].read_text())
    assert ds.name == "real" and sorted(ds.real_labels) == list(range(1, 61))
    # the class-folder layout is not in file-number order, so position-based matching would be wrong
    assert [image_number(p) for p, _ in ds.samples] != sorted(image_number(p) for p, _ in ds.samples)
    for i, (path, _) in enumerate(ds.samples):
        assert ds.real_labels_of(i) == raw[int(path.stem.split("_")[-1]) - 1]
    assert load_real_labels(mini["real_json"]) == {i + 1: r for i, r in enumerate(raw)}


# ----------------------------------------------------------------------------------------------- variants


def test_imagenet_v2_layouts(mini):
    ds = build_dataset("v2", mini["v2"])
    assert len(ds) == 30 and ds.num_classes == 1000 and all(int(p.parent.name) == t for p, t in ds.samples)
    assert ds.class_names[:3] == ["tench", "goldfish", "great white shark"]  # torchvision's, 1k order
    direct = ImageNetV2(mini["v2"] / "ImageNetV2-matched-frequency", wnids=WNIDS)
    assert direct.samples == ds.samples and direct.classes == WNIDS and direct.num_classes == 10


def test_imagenet_sketch_nested_and_label_space(mini, tmp_path):
    ds = build_dataset("sketch", mini["sketch"])
    assert ds.classes == WNIDS and all(WNIDS[t] == p.parent.name for p, t in ds.samples)
    nested = tmp_path / "imagenet-sketch"
    for wnid in WNIDS[3:6]:
        shutil.copytree(mini["sketch"] / wnid, nested / "sketch" / wnid)
    sub = ImageNetSketch(nested, wnids=WNIDS)
    assert sub.num_classes == 10 and sorted(set(sub.targets)) == [3, 4, 5]
    assert ImageNetSketch(nested).targets[0] == 0  # without a wnid list: its own sorted folders


@pytest.mark.parametrize("variant", ["a", "r"])
def test_ar_mask_from_wnid_names(mini, variant):
    ds = build_dataset(variant, mini[variant], wnids=mini["in1k"] / "train")
    folders = sorted(p.name for p in mini[variant].iterdir())
    assert ds.classes == folders and ds.num_classes == len(folders) and ds.num_classes_1k == 10
    assert ds.class_mask.dtype == torch.bool and ds.class_mask.shape == (10,)
    assert torch.nonzero(ds.class_mask).flatten().tolist() == [WNIDS.index(f) for f in folders]
    selected = torch.nonzero(ds.class_mask).flatten()
    for path, target in ds.samples:  # target j <-> j-th selected 1k logit
        assert WNIDS[selected[target]] == path.parent.name
    logits = torch.arange(10.0).expand(2, 10)
    assert logits[:, ds.class_mask].shape == (2, ds.num_classes)


def test_ar_index_lists():
    for indices in (IMAGENET_A_INDICES, IMAGENET_R_INDICES):
        assert len(indices) == 200 and list(indices) == sorted(set(indices)) and 0 <= indices[0] < indices[-1] < 1000
    assert len(set(IMAGENET_A_INDICES) & set(IMAGENET_R_INDICES)) == 86
    assert (IMAGENET_A_INDICES[:3], IMAGENET_R_INDICES[-3:]) == ((6, 11, 13), (981, 983, 988))


@pytest.mark.parametrize("variant", ["a", "r"])
def test_ar_fallback_to_reference_indices(tmp_path, variant):
    fake_1k = [f"n{7 * i + 1000:08d}" for i in range(1000)]  # sorted, so wnid i has 1k index i
    reference = IMAGENET_A_INDICES if variant == "a" else IMAGENET_R_INDICES
    source = tmp_path / "one.jpg"
    tiny_image(source)
    for i in reference:
        (tmp_path / variant / fake_1k[i]).mkdir(parents=True)
        os.link(source, tmp_path / variant / fake_1k[i] / "0.jpg")
    ds = ImageNetAR(tmp_path / variant, variant)
    assert ds.indices_1k == list(reference) and ds.num_classes_1k == 1000 and int(ds.class_mask.sum()) == 200
    named = ImageNetAR(tmp_path / variant, variant, wnids=fake_1k)
    assert torch.equal(named.class_mask, ds.class_mask)
    assert ds.class_names[0] == imagenet_1k_categories()[reference[0]]
    # a LOC_synset_mapping.txt beside the dataset serves as the wnid list
    (tmp_path / "LOC_synset_mapping.txt").write_text("".join(f"{w} class {w}, alt\n" for w in fake_1k))
    loc = ImageNetAR(tmp_path / variant, variant)
    assert loc.indices_1k == list(reference) and loc.class_names[0] == f"class {fake_1k[reference[0]]}"


# ----------------------------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("size", [(64, 48), (30, 70)])
def test_eval_transform_is_pil_bicubic_resize_center_crop_normalize(size):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    out = build_eval_transform(32)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    w, h = size
    new = (32, int(32 * h / w)) if w < h else (int(32 * w / h), 32)
    resized = image.resize(new, Image.BICUBIC)
    left, top = round((new[0] - 32) / 2), round((new[1] - 32) / 2)
    crop = np.asarray(resized.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 255.0
    expected = (torch.from_numpy(crop).permute(2, 0, 1) - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(
        IMAGENET_STD
    )[:, None, None]
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    bilinear = np.asarray(image.resize(new, Image.BILINEAR).crop((left, top, left + 32, top + 32)), np.float32)
    assert not np.allclose(bilinear / 255.0, crop), "the comparison can tell the filters apart"


def test_train_transform_random_resized_crop_flip():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    transform = build_train_transform(24)
    torch.manual_seed(0)
    a = transform(image)
    torch.manual_seed(0)
    assert torch.equal(a, transform(image))
    assert a.shape == (3, 24, 24) and a.dtype == torch.float32
    assert not torch.equal(a, transform(image)), "random crops differ between calls"
    crop, flip = transform.transforms[:2]
    assert (crop.scale, crop.ratio) == ((0.08, 1.0), (3 / 4, 4 / 3))
    assert crop.interpolation.value == "bicubic" and flip.p == 0.5
    assert a.min() > -2.2 and a.max() < 2.7  # normalized with the ImageNet mean/std


# ----------------------------------------------------------------------------------------------- user errors


def test_layout_errors(mini, tmp_path):
    expect_error("ImageNet-1k root folder not found", ImageNetSplit, tmp_path / "nope", "val")
    (tmp_path / "in1k").mkdir()
    expect_error(r"no val/ folder in .*in1k \(found: nothing\)", ImageNetSplit, tmp_path / "in1k", "val")
    expect_error("unknown ImageNet split", ImageNetSplit, tmp_path / "in1k", "test")
    (tmp_path / "in1k" / "val").mkdir()
    expect_error("val is empty", ImageNetSplit, tmp_path / "in1k", "val")
    (tmp_path / "in1k" / "train").mkdir()
    tiny_image(tmp_path / "in1k" / "train" / "loose.JPEG")
    expect_error(r"has no class folders \(found 1 loose images\)", ImageNetSplit, tmp_path / "in1k", "train")
    (tmp_path / "in1k" / "train" / "n01440764").mkdir()
    expect_error("1 class folder.* hold no images: n01440764", ImageNetSplit, tmp_path / "in1k", "train")
    expect_error("ImageNetV2 folder not found", ImageNetV2, tmp_path / "nope")
    expect_error("cannot find ImageNetV2 class folders", ImageNetV2, mini["in1k"] / "val")
    expect_error("unknown dataset 'imagenet'", build_dataset, "imagenet", mini["in1k"])
    expect_error("has no 'train' split", build_dataset, "v2", mini["v2"], split="train")


def test_flat_val_label_errors(mini, tmp_path):
    root = flat_val(mini, tmp_path / "in1k")
    err = expect_error("val has 60 files but no labels file: expected val/<wnid>/ folders", ImageNetSplit, root)
    assert "labels=PATH" in err.fix
    (root / "val" / "ILSVRC2012_val_00000007.JPEG").unlink()
    err = expect_error(
        "1 image.* missing from .*: ILSVRC2012_val_00000007.JPEG", ImageNetSplit, root, labels=mini["val_txt"]
    )
    bad = tmp_path / "bad.txt"
    bad.write_text("ILSVRC2012_val_00000001.JPEG 3\nILSVRC2012_val_00000002.JPEG three\n")
    expect_error("bad.txt line 2 is .*expected '<file name> <integer label>'", ImageNetSplit, root, labels=bad)
    bad.write_text("ILSVRC2012_val_00000001.JPEG 12\n")
    expect_error("label 12, beyond the 10 classes", ImageNetSplit, root, labels=bad)
    bad.write_text("\n")
    expect_error("is empty", ImageNetSplit, root, labels=bad)
    tiny_image(root / "val" / "n01440764" / "x.JPEG")
    expect_error("mixes 1 folders and 59 loose images", ImageNetSplit, root)


def test_devkit_errors(mini, tmp_path):
    root = flat_val(mini, tmp_path / "in1k")
    devkit = root / "ILSVRC2012_devkit_t12"
    write_devkit(devkit, val_txt_labels(mini))
    gt = devkit / "data" / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("".join(gt.read_text().splitlines(keepends=True)[:50]))
    expect_error(
        "ILSVRC2012_val_00000051.JPEG is val image 51, but the devkit ground truth has 50", ImageNetSplit, root
    )
    gt.write_text("1\n11\n")  # 11 is a non-leaf synset
    expect_error("line 2 is '11': not an ILSVRC2012_ID of a class", ImageNetSplit, root)
    (devkit / "data" / "meta.mat").unlink()
    expect_error("devkit has no .*meta.mat", ImageNetSplit, root)
    write_devkit(tmp_path / "dk", val_txt_labels(mini))
    tiny_image(root / "val" / "holiday.JPEG")
    expect_error("holiday.JPEG is not named ILSVRC2012_val_XXXXXXXX", ImageNetSplit, root, labels=tmp_path / "dk")


def test_wnid_errors(mini, tmp_path):
    expect_error(r"1 class folder.* not in the 10-class wnid list: n09999999", _val_with_extra_class, mini, tmp_path)
    for variant in ("a", "r"):
        expect_error(
            r"class folder\(s\) of ImageNet-.* not in the 3-class IN-1K wnid list: .*n01443537",
            build_dataset,
            variant,
            mini[variant],
            wnids=WNIDS[5:8],
        )
        err = expect_error(r"has \d class folders .*without an IN-1K wnid list", ImageNetAR, mini[variant], variant)
        assert "wnids=" in err.fix
    expect_error("wnids must be a non-empty, sorted list", ImageNetSketch, mini["sketch"], wnids=WNIDS[::-1])
    expect_error(r"must be class indices 0..4; found 5, 6", ImageNetV2, mini["v2"], wnids=WNIDS[:5])
    expect_error("holds no wnid list", load_wnids, mini["val_txt"])
    assert load_wnids(mini["synset_mapping"]) == load_wnids(mini["in1k"] / "train") == WNIDS


def _val_with_extra_class(mini, tmp_path):
    root = tmp_path / "extra"
    shutil.copytree(mini["in1k"] / "val", root / "val")
    os.symlink(mini["in1k"] / "train", root / "train")
    tiny_image(root / "val" / "n09999999" / "ILSVRC2012_val_00000099.JPEG")
    return ImageNetSplit(root, "val")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("[[1], [2", "is not valid JSON"),
        ('{"1": [2]}', "holds a JSON dict: expected a list of label lists"),
        ('[[1], [2, "x"]]', r"entry 1 \(ILSVRC2012_val_00000002\) is \[2, 'x'\]"),
        ("[[1], 2]", r"entry 1 \(ILSVRC2012_val_00000002\) is 2: expected a list"),
        ("[[-1]]", r"entry 0 .* expected a list of class indices"),
        ("[[true]]", r"entry 0 .* expected a list of class indices"),
    ],
)
def test_malformed_real_json(tmp_path, content, match):
    path = tmp_path / "real.json"
    path.write_text(content)
    expect_error(match, load_real_labels, path)


def test_real_labels_errors(mini, tmp_path):
    expect_error("ReaL labels file not found", load_real_labels, tmp_path / "real.json")
    short = tmp_path / "short.json"
    short.write_text(json.dumps([[0]] * 50))
    expect_error("ReaL labels cover 50 val images; 10 of", build_dataset, "real", mini["in1k"], real_json=short)
    short.write_text(json.dumps([[0, 10]] * 60))
    expect_error("indices 10 beyond this dataset's 10 classes", build_dataset, "real", mini["in1k"], real_json=short)
    root = flat_val(mini, tmp_path / "in1k")
    shutil.copy(mini["val_txt"], root / "val.txt")
    expect_error("no ReaL labels found", build_dataset, "real", root)
    expect_error("no ReaL labels attached", ImageNetSplit(mini["in1k"]).real_labels_of, 0)


# ----------------------------------------------------------------------------------------------- corrupt images


def corrupt_copy(mini, tmp_path) -> tuple[Path, list[Path]]:
    root = tmp_path / "sketch"
    shutil.copytree(mini["sketch"], root)
    broken = [root / WNIDS[2] / "sketch_2.JPEG", root / WNIDS[7] / "sketch_1.JPEG"]
    broken[0].write_bytes(broken[0].read_bytes()[:200])  # truncated JPEG
    broken[1].write_bytes(b"not an image at all")
    return root, broken


def test_corrupt_image_error_names_the_file(mini, tmp_path):
    root, broken = corrupt_copy(mini, tmp_path)
    ds = ImageNetSketch(root)
    index = [p for p, _ in ds.samples].index(broken[1])
    expect_error(f"cannot decode image {broken[1]}", ds.__getitem__, index)
    with pytest.raises(InternViTError, match="cannot decode image .*sketch_2.JPEG"):
        list(DataLoader(ds, batch_size=8, collate_fn=collate_skip_none))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_corrupt_loader_yields_the_rest_and_reports(mini, tmp_path, caplog, num_workers):
    root, broken = corrupt_copy(mini, tmp_path)
    ds = build_dataset("sketch", root, transform=build_eval_transform(16), skip_corrupt=True)
    loader = DataLoader(ds, batch_size=4, num_workers=num_workers, collate_fn=collate_skip_none)
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    seen = torch.cat([indices for _, _, indices in batches]).tolist()
    expected = [i for i, (p, _) in enumerate(ds.samples) if p not in broken]
    assert seen == expected and len(seen) == len(ds) - 2
    assert all(images.shape[1:] == (3, 16, 16) for images, _, _ in batches)
    if num_workers == 0:  # worker processes log and count in their own process
        dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
        assert len(dropped) == 2 and all("dropped 1 undecodable image(s)" in m for m in dropped)
        assert sorted(ds.skipped) == sorted(broken)
    assert collate_skip_none([None, None]) is None


# ----------------------------------------------------------------------------------------- custom class trees


@pytest.fixture(scope="module")
def custom_tree(tmp_path_factory) -> Path:
    """make_mini_custom: classes.txt lists red_thing, green thing (a space), blue, not in sorted order."""
    return make_mini_custom(tmp_path_factory.mktemp("custom") / "tree", train_per_class=3, val_per_class=2)


def custom_copy(tree: Path, root: Path) -> Path:
    shutil.copytree(tree, root)
    return root


def test_custom_classes_follow_the_classes_file_else_sorted_train_folders(custom_tree, tmp_path):
    train, val = CustomSplit(custom_tree, "train"), CustomSplit(custom_tree, "val")
    assert train.classes == val.classes == ["red_thing", "green thing", "blue"]
    assert train.class_names == ["Red thing", "Green thing", "blue"]  # no display name: the folder name
    assert (len(train), len(val), train.name, val.name) == (9, 6, "tree-train", "tree-val")
    assert {p.suffix for p, _ in train.samples} == {".jpg", ".JPEG", ".jpeg"}  # suffixes in any letter case
    assert all(p.parent.name == train.classes[t] for p, t in train.samples + val.samples)
    # an explicit classes file wins over classes.txt; comments, blank lines and surrounding spaces are skipped
    listing = tmp_path / "my classes.txt"
    listing.write_text("# mine\n\n blue \t Blue sky \ngreen thing\nred_thing\tRed\n", encoding="utf-8")
    assert load_classes_file(listing) == (["blue", "green thing", "red_thing"], ["Blue sky", "green thing", "Red"])
    ds = CustomSplit(custom_tree, "val", classes_file=listing)
    assert ds.classes == ["blue", "green thing", "red_thing"] and ds.targets == [0, 0, 1, 1, 2, 2]
    # no classes file: the sorted train/ folders, named as they are
    bare = custom_copy(custom_tree, tmp_path / "bare")
    (bare / "classes.txt").unlink()
    (bare / "train" / "blue" / "notes.txt").write_text("not an image")  # non-images are ignored
    assert custom_classes(bare) == (["blue", "green thing", "red_thing"], ["blue", "green thing", "red_thing"])
    ds = CustomSplit(bare, "train", transform=build_eval_transform(16))
    assert len(ds) == 9 and ds[0][0].shape == (3, 16, 16) and ds[0][1:] == (0, 0)


def test_custom_val_missing_a_class_is_scored_with_a_warning(custom_tree, tmp_path, caplog):
    root = custom_copy(custom_tree, tmp_path / "tree")
    shutil.rmtree(root / "val" / "green thing")
    with caplog.at_level(logging.WARNING, logger="internvit"):
        ds = CustomSplit(root, "val")
    assert ds.num_classes == 3 and sorted(ds.targets) == [0, 0, 2, 2]
    assert "no images of 1 of the 3 classes: green thing" in caplog.text


def test_custom_layout_errors(custom_tree, tmp_path):
    expect_error("custom dataset folder not found", CustomSplit, tmp_path / "nope")
    expect_error("unknown custom dataset split 'test'", CustomSplit, custom_tree, "test")
    root = custom_copy(custom_tree, tmp_path / "tree")
    (root / "val" / "purple").mkdir()
    tiny_image(root / "val" / "purple" / "a.PNG")
    err = expect_error(r"1 class folder\(s\) of .*val are not in the 3-class list .*: purple", CustomSplit, root)
    assert "classes.txt" in err.fix
    shutil.rmtree(root / "val")
    expect_error(r"has no val/ folder \(found: classes.txt, train\)", CustomSplit, root, "val")
    tiny_image(root / "train" / "loose.jpg")
    expect_error("1 image.* lie directly in .*train, outside any class folder: loose.jpg", CustomSplit, root, "train")
    (root / "train" / "loose.jpg").unlink()
    shutil.move(root / "train" / "blue", root / "train" / "Blue")
    err = expect_error("not in the 3-class list .*: Blue", CustomSplit, root, "train")
    (root / "classes.txt").write_text("red_thing\ngreen thing\nblue\nBlue\n")
    expect_error("1 listed class.* have no folder in .*train: blue", CustomSplit, root, "train")
    (root / "train" / "blue").mkdir()
    expect_error("1 class folder.* hold no images: blue", CustomSplit, root, "train")
    (root / "classes.txt").write_text("red_thing\nblue\nred_thing\n")
    expect_error("lists class 'red_thing' twice \\(lines 1 and 3\\)", CustomSplit, root, "train")
    (root / "classes.txt").write_text("# nothing but comments\n\n")
    expect_error("lists no classes", CustomSplit, root, "train")
    (root / "classes.txt").write_text("red_thing\n\tBlue\n")
    expect_error("line 2 .*: no folder name before the tab", CustomSplit, root, "train")
    expect_error("classes file not found", CustomSplit, root, "train", classes_file=tmp_path / "none.txt")
    (root / "classes.txt").unlink()
    shutil.rmtree(root / "train")
    expect_error("neither a classes.txt nor a train/ folder", CustomSplit, root, "val")


def test_deep_images_bombs_and_symlink_loops(tmp_path, monkeypatch):
    """16-bit images are scaled to 8 bits (as OpenCV converts them), not clipped to white; a decompression bomb and
    a symlink loop are named errors, in both decoders."""
    deep = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)  # values up to 64491
    Image.fromarray(deep).save(tmp_path / "deep.png")
    pil = np.asarray(load_image(tmp_path / "deep.png"))
    assert (pil[..., 0] == deep >> 8).all() and pil.max() == 64491 >> 8 and (pil[..., 0] != 255).any()
    assert (read_image_bgr(tmp_path / "deep.png") == pil[..., ::-1]).all()  # Pillow and OpenCV agree
    (tmp_path / "a.jpg").symlink_to(tmp_path / "b.jpg")
    (tmp_path / "b.jpg").symlink_to(tmp_path / "a.jpg")
    for decode in (load_image, read_image_bgr):
        with pytest.raises(InternViTError, match="symbolic link that leads nowhere"):
            decode(tmp_path / "a.jpg")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels: more than twice the limit
    with pytest.raises(InternViTError, match="decompression-bomb limit") as info:
        load_image(tmp_path / "big.png")
    assert "MAX_IMAGE_PIXELS" in info.value.fix


def test_missing_val_classes_are_named(tmp_path, caplog):
    paths = make_mini_imagenet(tmp_path, num_classes=3, train_per_class=2, val_per_class=1)
    val = paths["in1k"] / "val"
    missing = sorted(p.name for p in val.iterdir() if p.is_dir())[1]
    shutil.rmtree(val / missing)
    wnids = sorted(p.name for p in (paths["in1k"] / "train").iterdir())
    with caplog.at_level(logging.WARNING):
        dataset = ImageNetSplit(paths["in1k"], "val", wnids=wnids)
    assert dataset.num_classes == 3 and f"no folder for 1 of its 3 classes: {missing}" in caplog.text
