"""The fast probing mode: feature extraction once per image (resumable, split over processes, guarded by its
manifest) and weighted kNN on the cache, against a brute-force reference."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from internvit.classification.build import build_backbone
from internvit.classification.config import ClassificationConfig
from internvit.classification.evaluate import build_train_set
from internvit.classification.features import (
    FeatureShards,
    backbone_features,
    feature_variant,
    knn_scores,
    load_features,
)
from internvit.classification.sweep import CachedFeatures
from internvit.cli import main
from internvit.data.transforms import build_train_transform
from internvit.demo import classification_overrides, make_demo_checkpoint
from internvit.demo.imagenet import make_mini_imagenet
from internvit.engine.config import load_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("probing")
    paths = make_mini_imagenet(root / "data")
    return root, paths, make_demo_checkpoint(root / "debug.pth")


def settings(paths, checkpoint, out: Path, **extra) -> list[str]:
    base = classification_overrides(paths, checkpoint, out / "results")
    return [*base, f"features.out={out}", "features.shard_size=48", *(f"{k}={v}" for k, v in extra.items())]


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("shard_*.safetensors"))}


def cli(args: list[str], *, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, "-m", "internvit.cli"] if nproc > 1 else [sys.executable, "-m", "internvit.cli"]
    return subprocess.run([*cmd, *args], env=ENV, capture_output=True, text=True, timeout=300, check=False)


def brute_force_knn(train, train_y, test, num_classes, k, temperature):
    """The weighted kNN rule written out per test sample in numpy (float64)."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    out = np.zeros((len(test), num_classes))
    for i, query in enumerate(test):
        sims = train @ (query / np.linalg.norm(query))
        nearest = np.argsort(-sims, kind="stable")[:k]
        for j in nearest:
            out[i, train_y[j]] += np.exp(sims[j] / temperature)
    return out


def test_knn_equals_a_brute_force_reference():
    gen = torch.Generator().manual_seed(0)
    train, test = torch.randn(300, 16, generator=gen), torch.randn(37, 16, generator=gen)
    train_y = torch.randint(0, 7, (300,), generator=gen)
    scores = knn_scores(train, train_y, test, num_classes=7, ks=(1, 10, 20), temperature=0.07, chunk=8)
    for k in (1, 10, 20):
        expected = brute_force_knn(train.double().numpy(), train_y.numpy(), test.double().numpy(), 7, k, 0.07)
        np.testing.assert_allclose(scores[k].double().numpy(), expected, rtol=2e-4)
    big = knn_scores(train, train_y, test, num_classes=7, ks=(1000,))[1000]  # k beyond the training set: all of it
    np.testing.assert_allclose(
        big.double().numpy(), brute_force_knn(train.numpy(), train_y.numpy(), test.numpy(), 7, 300, 0.07), rtol=2e-4
    )


def test_extract_once_then_knn(mini, tmp_path, capsys):
    root, paths, checkpoint = mini
    out = tmp_path / "features"
    args = settings(paths, checkpoint, out, **{"features.sets": "[train,in1k,real,a]"})
    assert main(["cls", "extract", *args]) == 0
    rows = {r["set"]: r for r in json.loads((out / "extract_results.json").read_text())}
    assert rows["train"]["backbone_forwards"] == rows["train"]["images"] == 240  # one forward per image
    assert rows["train"]["paper_mode_forwards"] == 240 * 10 and rows["in1k"]["backbone_forwards"] == 60
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sets"]["train"]["num_shards"] == 5 and manifest["img_size"] == 56
    train = load_features(out, "train")
    assert (
        train["cls"].dtype == torch.bfloat16 and train["cls"].shape == (240, 64) and train["cls4"].shape == (240, 4, 64)
    )
    assert torch.equal(train["index"], torch.arange(240))
    assert feature_variant(train, "cls_mean").shape == (240, 128) and feature_variant(train, "cls4_mean").shape == (
        240,
        320,
    )
    # a rerun finds every shard done: no forward at all
    assert main(["cls", "extract", *args]) == 0
    again = {r["set"]: r for r in json.loads((out / "extract_results.json").read_text())}
    assert again["train"]["backbone_forwards"] == 0 and again["in1k"]["backbone_forwards"] == 0
    capsys.readouterr()
    assert main(["cls", "knn", *args, "knn.k=[1,20]"]) == 0
    knn = json.loads((out / "results" / "knn_results.json").read_text())
    assert {(r["set"], r["k"]) for r in knn} == {(s, k) for s in ("in1k", "real", "a") for k in (1, 20)}
    by = {(r["set"], r["k"]): r for r in knn}
    assert by[("in1k", 20)]["acc1"] > 50 and by[("in1k", 1)]["num_images"] == 60  # the mini classes are learnable
    assert by[("a", 20)]["num_images"] == 15 and all(r["mode"] == "fast (cached features)" for r in knn)
    # another resolution or transform is refused, naming what differs
    assert main(["cls", "extract", *args, "backbone.img_size=42"]) == 2
    assert "was made with other settings: img_size: 56 there, 42 now" in capsys.readouterr().err
    assert main(["cls", "knn", *settings(paths, checkpoint, tmp_path / "none")]) == 2
    assert "no manifest.json in" in capsys.readouterr().err


def test_killed_extraction_resumes_to_identical_shards_and_two_processes_agree(mini, tmp_path):
    root, paths, checkpoint = mini
    reference = tmp_path / "reference"
    assert cli(["cls", "extract", *settings(paths, checkpoint, reference)]).returncode == 0
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "internvit.cli", "cls", "extract", *settings(paths, checkpoint, run)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((run / "train").glob("shard_*.safetensors")) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = set(shard_bytes(run))
    assert 0 < len(done_before) < len(shard_bytes(reference)), "killed too late or too early"
    resumed = cli(["cls", "extract", *settings(paths, checkpoint, run)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert shard_bytes(run) == shard_bytes(reference)  # byte for byte
    assert not list(run.rglob(".*.tmp"))
    two = tmp_path / "two"
    result = cli(["cls", "extract", *settings(paths, checkpoint, two)], nproc=2)
    assert result.returncode == 0, result.stderr[-2000:]
    assert shard_bytes(two) == shard_bytes(reference)


def test_sweep_heads_do_not_interact_and_the_saved_head_scores_the_same_on_images(mini, tmp_path, capsys):
    root, paths, checkpoint = mini
    out = tmp_path / "features"
    exact = {"features.dtype": "fp32", "backbone.precision": "fp32", "features.sets": "[train,in1k]"}
    assert main(["cls", "extract", *settings(paths, checkpoint, out, **exact)]) == 0
    common = {"sweep.epochs": 2, "sweep.batch_size": 32, "sweep.holdout": 40, "sweep.lrs": "[0.1,1.0]"}
    grid_run, single_run = tmp_path / "grid", tmp_path / "single"
    grid = {**exact, **common, "sweep.variants": "[cls_mean,cls]", "sweep.batchnorm": "[true,false]"}
    assert main(["cls", "sweep", *settings(paths, checkpoint, out, **grid), f"output_dir={grid_run}"]) == 0
    rows = json.loads((grid_run / "sweep_grid.json").read_text())
    assert len(rows) == 8 and sum(r["chosen"] for r in rows) == 1
    assert [r["head"] for r in rows][:2] == ["cls_mean|bn|lr=0.00625", "cls_mean|bn|lr=0.0625"]  # x 32 / 512
    single = {**exact, **common, "sweep.lrs": "[1.0]", "sweep.variants": "[cls_mean]", "sweep.batchnorm": "[true]"}
    assert main(["cls", "sweep", *settings(paths, checkpoint, out, **single), f"output_dir={single_run}"]) == 0
    together = torch.load(grid_run / "checkpoint.pth", weights_only=True)["objects"]["heads"]
    alone = torch.load(single_run / "checkpoint.pth", weights_only=True)["objects"]["heads"]
    for key, value in alone.items():  # grid point 1 (cls_mean, BN, lr 1.0) against the one-head sweep
        assert torch.allclose(together[key.replace("heads.0.", "heads.1.")].float(), value.float(), atol=1e-6), key
    # the saved head of the paper's kind scores the same through `cls eval` on the images as on the cache
    paper = {**exact, **common, "sweep.variants": "[cls_mean]", "sweep.batchnorm": "[true]"}
    paper_run = tmp_path / "paper"
    assert main(["cls", "sweep", *settings(paths, checkpoint, out, **paper), f"output_dir={paper_run}"]) == 0
    cached = json.loads((paper_run / "sweep_results.json").read_text())[0]
    assert cached["set"] == "in1k" and cached["mode"] == "fast (cached features)"
    head = paper_run / "head.safetensors"
    evaluated = tmp_path / "eval"
    args = [*settings(paths, checkpoint, evaluated), f"head.checkpoint={head}", "eval.sets=[in1k]"]
    assert main(["cls", "eval", *args, "backbone.precision=fp32", f"output_dir={evaluated}"]) == 0
    on_images = json.loads((evaluated / "eval_results.json").read_text())[0]
    assert (on_images["acc1"], on_images["acc5"]) == (cached["acc1"], cached["acc5"])
    capsys.readouterr()


def test_extraction_names_a_corrupt_image_or_skips_and_counts_it(mini, tmp_path, capsys):
    _, _, checkpoint = mini
    paths = make_mini_imagenet(tmp_path / "data", num_classes=3, train_per_class=4, val_per_class=2)
    bad = sorted((paths["in1k"] / "train").rglob("*.JPEG"))[1]
    bad.write_bytes(b"not a jpeg")
    args = [*settings(paths, checkpoint, tmp_path / "f"), "head.num_classes=3"]
    assert main(["cls", "extract", *args]) == 2
    assert bad.name in capsys.readouterr().err
    assert main(["cls", "extract", *args, "data.skip_corrupt=true", f"features.out={tmp_path / 'g'}"]) == 0
    rows = {r["set"]: r for r in json.loads((tmp_path / "g" / "extract_results.json").read_text())}
    assert (rows["train"]["images"], rows["train"]["skipped"], rows["train"]["backbone_forwards"]) == (12, 1, 11)
    assert len(load_features(tmp_path / "g", "train")["index"]) == 11


def test_augmented_views_are_seeded_per_image_and_view_and_the_sweep_streams_them(mini, tmp_path):
    """features.views=K: K views of each training image through the paper's train transform, each the seeded
    (image, view) draw of that transform whatever the process; the sweep trains epoch e on view e % K, reading the
    memory-mapped shards a batch at a time."""
    root, paths, checkpoint = mini
    out = tmp_path / "features"
    extra = {"features.sets": "[train,in1k]", "features.views": 2, "features.dtype": "fp32"}
    assert main(["cls", "extract", *settings(paths, checkpoint, out, **extra)]) == 0
    rows = {r["set"]: r for r in json.loads((out / "extract_results.json").read_text())}
    assert [rows[f"train.v{k}"]["backbone_forwards"] for k in (0, 1)] == [240, 240]  # one forward per view
    assert rows["train.v0"]["paper_mode_forwards"] + rows["train.v1"]["paper_mode_forwards"] == 240 * 10
    views = [load_features(out, f"train.v{k}") for k in (0, 1)]
    assert not torch.allclose(views[0]["cls"], views[1]["cls"])  # two different crops
    # view k of image i is the train transform seeded by (seed, k, i): recompute two of them directly
    cfg = load_config(ClassificationConfig, None, settings(paths, checkpoint, out, **extra))
    dataset = build_train_set(cfg.data, build_train_transform(cfg.backbone.img_size))
    dataset.sample_seed = cfg.train.seed
    backbone, _ = build_backbone(
        str(checkpoint), preset=None, img_size=cfg.backbone.img_size, device=torch.device("cpu")
    )
    for k, i in ((0, 5), (1, 5), (1, 131)):
        dataset.set_epoch(k)
        image = dataset[i][0][None]
        expected = backbone_features(backbone, image, "fp32")["cls"][0]
        row = int((views[k]["index"] == i).nonzero())
        torch.testing.assert_close(views[k]["cls"][row], expected, rtol=1e-3, atol=1e-3)  # another crop: O(1) off
    # memory-mapped rows equal the loaded ones, across shard borders and in any order
    shards = FeatureShards(out, "train.v1")
    positions = torch.tensor([239, 0, 47, 48, 120, 5])
    picked = shards.rows(positions)
    assert all(torch.equal(picked[key], views[1][key][positions]) for key in ("cls", "mean", "cls4", "target"))
    cached = CachedFeatures([FeatureShards(out, f"train.v{k}") for k in (0, 1)], torch.arange(240))
    for epoch in (0, 1, 2):
        cached.set_epoch(epoch)
        stored, target = cached.__getitems__([3, 200])
        assert torch.equal(stored["cls"], views[epoch % 2]["cls"][[3, 200]]) and torch.equal(
            target, views[0]["target"][[3, 200]]
        )
    sweep = {"sweep.lrs": "[0.1]", "sweep.variants": "[cls_mean]", "sweep.epochs": 2, "sweep.holdout": 40}
    sweep["sweep.batch_size"] = 50
    assert main(["cls", "sweep", *settings(paths, checkpoint, out, **extra, **sweep)]) == 0
    (result,) = json.loads((out / "results" / "sweep_results.json").read_text())
    assert result["set"] == "in1k" and result["num_images"] == 60


def test_features_of_an_older_format_are_refused(mini, tmp_path, capsys):
    root, paths, checkpoint = mini
    out = tmp_path / "old"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": 1, "views": 1, "sets": {"train": {}}}))
    assert main(["cls", "knn", *settings(paths, checkpoint, out)]) == 2
    err = capsys.readouterr().err
    assert "holds features of format 1, this version reads format 2" in err and "extract them again" in err
