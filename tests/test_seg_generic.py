"""Segmentation beyond ADE20K: the generic folder layout end to end, multi-scale + flip evaluation against a
hand-computed average, and `segment` on folders, duplicate names, EXIF orientation and unreadable files."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from internvit.cli import main
from internvit.data.seg_transforms import TestPipeline
from internvit.data.segmentation import SegmentationFolder, default_palette, read_classes_file
from internvit.demo import make_demo_checkpoint, segmentation_overrides
from internvit.demo.ade20k import MINI_FOLDER_CLASSES, make_mini_segfolder
from internvit.errors import InternViTError
from internvit.segmentation.segmentor import predict, predict_probs


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A 5-class generic dataset, a linear probe trained on it through the CLI, and the settings used."""
    root = tmp_path_factory.mktemp("generic")
    data = make_mini_segfolder(root / "data", num_train=16, num_val=4)
    checkpoint = make_demo_checkpoint(root / "debug.pth")
    run = root / "run"
    args = [
        *segmentation_overrides(data, checkpoint, run, crop=112),
        f"data.classes={data / 'classes.txt'}",
        "data.train_split=train",
        "data.val_split=val",
        "train.iters=24",
        "train.eval_every=24",
        "setting=mini5",
    ]
    assert main(["seg", "train", *args]) == 0
    return data, run, args


def test_classes_file_format(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# a comment\nroad #804080\nside walk #f423e8\n\n")
    assert read_classes_file(path) == (["road", "side walk"], [(128, 64, 128), (244, 35, 232)])
    path.write_text("road\nsky\n")
    assert read_classes_file(path) == (["road", "sky"], None)
    for text, message in (
        ("road #804080\nsky\n", "colours for some classes but not for sky"),
        ("road\nroad\n", "lists road more than once"),
        ("# nothing\n", "names no class"),
    ):
        path.write_text(text)
        with pytest.raises(InternViTError, match=message):
            read_classes_file(path)
    palette = default_palette(20)
    assert len(set(palette)) == 20 and all(0 <= c <= 255 for colour in palette for c in colour)


def test_generic_dataset_labels_and_errors(tmp_path):
    data = make_mini_segfolder(tmp_path / "d", num_train=2, num_val=1)
    names, palette = read_classes_file(data / "classes.txt")
    train = SegmentationFolder(data, "train", class_names=names, palette=palette)
    item = train[0]
    raw = np.array(Image.open(data / "annotations" / "train" / "img_000.png"))
    assert torch.equal(item["label"], torch.from_numpy(raw)) and item["label"].dtype == torch.uint8
    assert set(np.unique(raw)) <= {0, 1, 2, 3, 4, 255}
    reduced = SegmentationFolder(data, "train", class_names=names[1:], reduce_zero_label=True)
    assert set(reduced[0]["label"].unique().tolist()) <= {0, 1, 2, 3, 255}  # 0 -> ignored, v -> v - 1
    raw[10, 10] = 4
    Image.fromarray(raw).save(data / "annotations" / "train" / "img_000.png")
    with pytest.raises(InternViTError, match="values 4 above 3"):
        SegmentationFolder(data, "train", class_names=names[:4])[0]
    with pytest.raises(InternViTError, match="collides with the class indices"):
        SegmentationFolder(data, "train", class_names=names, ignore_index=3)
    with pytest.raises(InternViTError, match="no images/test/ folder"):
        SegmentationFolder(data, "test", class_names=names)


def test_generic_layout_trains_evaluates_and_segments(folder_run, tmp_path, capsys):
    data, run, args = folder_run
    history = json.loads((run / "train_history.json").read_text())
    assert history[-1]["mIoU"] >= 60.0, history  # a 5-class probe learns the colours
    best = run / "best.safetensors"
    assert main(["seg", "eval", *args, f"head.checkpoint={best}", f"output_dir={run}"]) == 0
    row = json.loads((run / "eval_results.json").read_text())[0]
    assert row["mIoU"] == history[-1]["mIoU"] and row["num_images"] == 4 and row["paper_mIoU"] is None
    per_class = json.loads((run / "eval_per_class.json").read_text())
    assert [r["class"] for r in per_class] == list(MINI_FOLDER_CLASSES)
    assert (run / "config.yaml").read_text() != (run / "eval_config.yaml").read_text()  # the run's config kept
    # flip + scales: a different (here: not worse than chance) evaluation of the same head
    tta = [
        *args,
        f"head.checkpoint={best}",
        f"output_dir={tmp_path / 'tta'}",
        "eval.scales=[0.75,1.0]",
        "eval.flip=true",
    ]
    assert main(["seg", "eval", *tta]) == 0
    tta_row = json.loads((tmp_path / "tta" / "eval_results.json").read_text())[0]
    assert tta_row["scales"] == [0.75, 1.0] and tta_row["flip"] is True and tta_row["mIoU"] > 20
    capsys.readouterr()
    out = tmp_path / "seg"
    assert main(["segment", str(data / "images" / "val"), "--checkpoint", str(best), "--out", str(out), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 4 and json.loads((out / "segment_results.json").read_text()) == results
    first = results[0]
    labels = np.array(Image.open(first["labels"]))
    mask = np.array(Image.open(first["mask"]).convert("RGB"))
    assert labels.shape == mask.shape[:2] == (70, 84) and labels.max() < 5
    _, palette = read_classes_file(data / "classes.txt")
    assert (mask == np.asarray(palette, np.uint8)[labels]).all()  # the mask is the palette of the label PNG
    assert Path(first["legend"]).is_file() and Path(first["overlay"]).is_file()
    assert {c["class"] for c in first["classes"]} <= set(MINI_FOLDER_CLASSES)
    assert abs(sum(c["share"] for c in first["classes"]) - 1) < 1e-3
    assert all(c["colour"] == list(palette[c["index"]]) for c in first["classes"])


def test_segment_names_exif_and_unreadable_inputs(folder_run, tmp_path, capsys):
    data, run, _ = folder_run
    source = Image.open(data / "images" / "val" / "img_000.png")
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        source.save(tmp_path / sub / "same.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    source.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    inputs = [
        tmp_path / "a" / "same.png",
        tmp_path / "b" / "same.png",
        tmp_path / "broken.png",
        tmp_path / "rotated.jpg",
    ]
    out = tmp_path / "out"
    code = main(["segment", *map(str, inputs), "--checkpoint", str(run / "best.safetensors"), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2 and "1 of 4 image(s) could not be segmented" in captured.err and "broken.png" in captured.err
    results = json.loads((out / "segment_results.json").read_text())
    assert [Path(r.get("mask", "")).name for r in results] == [
        "same_mask.png",
        "same-2_mask.png",
        "",
        "rotated_mask.png",
    ]
    assert "cannot decode image" in results[2]["error"]
    assert np.array(Image.open(results[3]["labels"])).shape == (84, 70)  # shown upright: EXIF orientation applied
    with pytest.raises(SystemExit):
        main(["segment"])
    assert main(["segment", str(tmp_path / "missing.png"), "--checkpoint", str(run / "best.safetensors")]) == 2
    assert "no such image file or folder" in capsys.readouterr().err


class Toy(torch.nn.Module):
    """2-class logits at the input resolution: channel 0 plus a left-to-right ramp (not flip-symmetric), channel 1."""

    def forward(self, x):
        ramp = torch.linspace(0.0, 1.0, x.shape[-1])
        return torch.stack([x[:, 0] + ramp, x[:, 1]], dim=1)


def test_multiscale_flip_is_the_average_of_view_softmaxes():
    torch.manual_seed(0)
    small = torch.randn(1, 3, 4, 6)
    large = torch.randn(1, 3, 8, 12)  # the second scale, twice the size
    probs = predict_probs(Toy(), [small, large], (4, 6), num_classes=2, crop=16, stride=8, flip=True)

    def view(img, flipped):  # one window (the crop exceeds the image), resized to 4x6, softmax, flipped back
        logits = Toy()(img.flip(-1) if flipped else img)
        logits = F.interpolate(logits, size=(4, 6), mode="bilinear", align_corners=False)
        p = logits.softmax(1)
        return p.flip(-1) if flipped else p

    # the 8x12 logits halved by bilinear interpolation (align_corners False) are the means of 2x2 blocks
    block = Toy()(large).unfold(2, 2, 2).unfold(3, 2, 2).mean((-1, -2))
    assert torch.allclose(view(large, False), block.softmax(1), atol=1e-6)
    expected = (view(small, False) + view(small, True) + view(large, False) + view(large, True)) / 4
    assert torch.allclose(probs, expected, atol=1e-6) and torch.allclose(probs.sum(1), torch.ones(1, 4, 6))
    assert not torch.allclose(probs, view(small, False), atol=1e-3)  # the other views matter
    single = predict(Toy(), small, (4, 6), num_classes=2, crop=16, stride=8)
    assert torch.equal(single, Toy()(small).softmax(1)[0].argmax(0))  # one view: mmseg's simple_test


def test_test_pipeline_scales():
    img = np.full((70, 84, 3), 90, np.uint8)
    views, _ = TestPipeline("setr", short=56, scales=(0.5, 1.0, 1.5), crop=56)(img, np.zeros((70, 84), np.uint8))
    # SETR (setr_multi_scale): ratios below 1 stop at the crop; 84 * 84/70 = 100.8 -> 101 -> 112
    assert [tuple(v.shape[1:]) for v in views] == [(56, 70), (56, 70), (84, 112)]
    views, _ = TestPipeline("keep_ratio", scale=(224, 56), scales=(0.5, 2.0))(img, np.zeros((70, 84), np.uint8))
    assert [tuple(v.shape[1:]) for v in views] == [(28, 42), (112, 140)]
    single, _ = TestPipeline("setr", short=56)(img, np.zeros((70, 84), np.uint8))
    assert isinstance(single, torch.Tensor) and single.dtype == torch.uint8


def test_custom_dataset_config_runs_on_the_generic_layout(folder_run, tmp_path):
    data, _, args = folder_run
    config = Path(__file__).parents[1] / "configs" / "segmentation" / "custom" / "linear_probe_folder.yaml"
    run = tmp_path / "run"
    overrides = [a for a in args if not a.startswith(("train.iters", "setting", "output_dir"))]
    extra = ["train.iters=2", "train.eval_every=2", f"output_dir={run}"]
    assert main(["seg", "train", "--config", str(config), *overrides, *extra]) == 0
    rows = json.loads((run / "train_history.json").read_text())
    assert rows[-1]["iter"] == 2 and "mIoU" in rows[-1]
