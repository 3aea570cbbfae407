"""The run folder's PNG pictures: what each plot draws (its returned data), valid PNG files, no partial writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from internvit.engine.plots import (
    DPI,
    plot_confusions,
    plot_per_class,
    plot_training,
    read_metrics,
    training_series,
)
from internvit.errors import InternViTError

NAN = float("nan")
CLS_RECORDS = [
    {"epoch": 1, "step": 0, "lr": 0.0, "loss": 2.29, "grad_norm": 2.7, "img_s": 111.6},
    {"epoch": 1, "step": 3, "lr": 1e-4, "loss": 2.01, "grad_norm": 2.1, "img_s": 120.0},
    {"epoch": 1, "train_loss": 2.02, "train_images": 224, "val_acc1_head": 83.3, "val_acc5_head": 100.0,
     "val_acc1_ema": 23.3, "val_acc5_ema": 51.6, "seconds": 1.08},
    {"epoch": 2, "step": 4, "lr": 2e-4, "loss": NAN, "grad_norm": 9.9, "img_s": 118.0},  # a diverged step
    {"epoch": 2, "step": 7, "lr": 3e-4, "loss": 1.50, "grad_norm": 1.9, "img_s": 119.0},
    {"epoch": 2, "train_loss": 1.70, "train_images": 224, "seconds": 1.01},  # no evaluation this epoch
    {"epoch": 3, "train_loss": 1.20, "train_images": 224, "val_acc1_head": 90.0, "val_acc1_ema": 41.0, "seconds": 1.0},
]  # fmt: skip
SEG_RECORDS = [
    {"iter": 10, "loss": 1.2, "decode.loss_ce": 1.2, "lr": 0.0004, "s_per_iter": 0.5},
    {"iter": 20, "loss": 0.9, "decode.loss_ce": 0.9, "lr": 0.0003, "s_per_iter": 0.5},
    {"iter": 30, "loss": 0.7, "decode.loss_ce": 0.7, "lr": 0.0002, "s_per_iter": 0.5},
    {"iter": 30, "aAcc": 70.1, "mIoU": 31.2, "mAcc": 40.0, "split_hash": "abc"},
    {"iter": 40, "loss": 0.6, "decode.loss_ce": 0.6, "lr": 0.0001, "s_per_iter": 0.5},
    {"iter": 40, "aAcc": 75.0, "mIoU": 35.5, "mAcc": 44.0, "split_hash": "abc"},
]


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG that decodes completely and is not a blank canvas."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 1.0, "the picture is blank"
    return pixels.shape[1], pixels.shape[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp")


def test_training_classification(tmp_path: Path) -> None:
    series = plot_training(CLS_RECORDS, tmp_path / "training.png")
    assert series == {
        "loss": [(1, 2.29), (4, 2.01), (8, 1.50)],  # x = step + 1; the NaN loss is left out
        "lr": [(1, 0.0), (4, 1e-4), (5, 2e-4), (8, 3e-4)],
        "val_acc1_head": [(1, 83.3), (3, 90.0)],  # x = epoch; epoch 2 did not evaluate
        "val_acc1_ema": [(1, 23.3), (3, 41.0)],
    }
    assert png_size(tmp_path / "training.png") == (3 * 5 * DPI, round(3.6 * DPI))
    assert leftovers(tmp_path) == []


def test_training_segmentation(tmp_path: Path) -> None:
    series = plot_training(SEG_RECORDS, tmp_path / "training.png")
    assert series == {
        "loss": [(10, 1.2), (20, 0.9), (30, 0.7), (40, 0.6)],  # x = iterations done, as logged
        "lr": [(10, 0.0004), (20, 0.0003), (30, 0.0002), (40, 0.0001)],
        "mIoU": [(30, 31.2), (40, 35.5)],
    }
    assert png_size(tmp_path / "training.png")[0] == 3 * 5 * DPI


def test_training_draws_only_the_panels_with_data(tmp_path: Path) -> None:
    steps_only = [r for r in CLS_RECORDS if "step" in r]
    assert set(plot_training(steps_only, tmp_path / "a.png")) == {"loss", "lr"}
    assert png_size(tmp_path / "a.png")[0] == 2 * 5 * DPI
    evaluations_only = [r for r in SEG_RECORDS if "mIoU" in r]
    assert plot_training(evaluations_only, tmp_path / "b.png") == {"mIoU": [(30, 31.2), (40, 35.5)]}
    assert png_size(tmp_path / "b.png")[0] == 5 * DPI


def test_training_series_of_a_probe_sweep() -> None:
    records = [{"epoch": 1, "step": 0, "head_loss": 4.5}, {"epoch": 1, "step": 10, "head_loss": 3.0}]
    assert training_series(records) == {"loss": [(1, 4.5), (11, 3.0)]}


def test_per_class_sorted_and_absent_classes_skipped(tmp_path: Path) -> None:
    rows = [
        {"class": "wall", "IoU": 71.2, "Acc": 80.1},
        {"class": "sky", "IoU": 94.0, "Acc": 97.0},
        {"class": "tent", "IoU": NAN, "Acc": NAN},  # absent from the evaluation
        {"class": "oven", "IoU": None, "Acc": None},
        {"class": "floor", "IoU": 5.5, "Acc": 99.0},
    ]
    drawn = plot_per_class(rows, tmp_path / "iou.png")
    assert drawn == [("sky", 94.0), ("wall", 71.2), ("floor", 5.5)]
    assert plot_per_class(rows, tmp_path / "acc.png", metric="Acc", title="ADE20K") == [
        ("floor", 99.0),
        ("sky", 97.0),
        ("wall", 80.1),
    ]
    png_size(tmp_path / "iou.png")
    assert leftovers(tmp_path) == []


def test_per_class_height_grows_with_the_classes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = [{"class": f"class {i}", "IoU": float(v)} for i, v in enumerate(rng.uniform(0, 100, 150))]
    drawn = plot_per_class(rows, tmp_path / "many.png")
    assert len(drawn) == 150
    assert [v for _, v in drawn] == sorted((r["IoU"] for r in rows), reverse=True)
    plot_per_class(rows[:5], tmp_path / "few.png")
    width, height = png_size(tmp_path / "many.png")
    assert width == 8 * DPI and height >= 150 * 0.16 * DPI  # room for every one of the 150 names
    assert png_size(tmp_path / "few.png")[1] < height / 5


def test_confusions_keep_their_order(tmp_path: Path) -> None:
    pairs = [
        {"true": "tabby cat", "predicted": "tiger cat", "count": 7},
        {"true": "husky", "predicted": "malamute", "count": 3},
        {"true": "laptop", "predicted": "notebook", "count": 5},  # the caller's order is kept, not re-sorted
    ]
    drawn = plot_confusions(pairs, tmp_path / "confusions.png", title="IN-1k val")
    assert drawn == [("tabby cat → tiger cat", 7), ("husky → malamute", 3), ("laptop → notebook", 5)]
    assert png_size(tmp_path / "confusions.png")[0] == 8 * DPI


def test_nothing_to_plot_writes_nothing(tmp_path: Path) -> None:
    no_curves = [{"epoch": 2, "train_loss": 1.7, "train_images": 224, "seconds": 1.0}, {"epoch": 1, "step": 0}]
    assert plot_training([], tmp_path / "a.png") is None
    assert plot_training(no_curves, tmp_path / "b.png") is None
    assert plot_per_class([], tmp_path / "c.png") is None
    assert plot_per_class([{"class": "tent", "IoU": NAN}, {"class": "oven", "IoU": None}], tmp_path / "d.png") is None
    assert plot_confusions([], tmp_path / "e.png") is None
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def killed(self, fname, **kwargs) -> None:
        Path(fname).write_bytes(b"\x89PNG half")
        raise RuntimeError("killed mid-write")

    (tmp_path / "training.png").write_bytes(b"previous")
    monkeypatch.setattr(Figure, "savefig", killed)
    with pytest.raises(RuntimeError, match="killed"):
        plot_training(SEG_RECORDS, tmp_path / "training.png")
    with pytest.raises(RuntimeError, match="killed"):
        plot_confusions([{"true": "a", "predicted": "b", "count": 1}], tmp_path / "confusions.png")
    assert [p.name for p in tmp_path.iterdir()] == ["training.png"]
    assert (tmp_path / "training.png").read_bytes() == b"previous"


def test_read_metrics_skips_blank_lines_and_a_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in SEG_RECORDS[:3])
    path.write_text(text + "\n  \n" + json.dumps(SEG_RECORDS[3]) + "\n" + '{"iter": 40, "loss": 0.6, "lr')
    assert read_metrics(path) == SEG_RECORDS[:4]
    path.write_text(json.dumps(CLS_RECORDS[3]) + "\n")  # NaN, as json.dumps writes it
    (record,) = read_metrics(path)
    assert record["step"] == 4 and math.isnan(record["loss"])
    path.write_text("")
    assert read_metrics(path) == []


def test_read_metrics_refuses_a_broken_line_before_the_end(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(SEG_RECORDS[0]) + "\n{not json\n" + json.dumps(SEG_RECORDS[1]) + "\n")
    with pytest.raises(InternViTError, match="line 2"):
        read_metrics(path)


def test_read_metrics_then_plot(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CLS_RECORDS) + '{"epoch": 3, "st')
    assert plot_training(read_metrics(path), tmp_path / "training.png") == training_series(CLS_RECORDS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "training.png"]
