"""The shared engine: checkpointer (signature, resume protocol), configs (frozen, renamed fields, one crop field),
parallelize (activation checkpointing and compile from outside the model), and the start-up order of the tasks."""

import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_6B, randomize_

import internvit.engine.data as engine_data
from internvit.classification import run as cls_run
from internvit.classification.config import ClassificationConfig
from internvit.cli import main
from internvit.demo import classification_overrides, make_demo_checkpoint
from internvit.demo.imagenet import make_mini_imagenet
from internvit.engine.checkpoint import Checkpointer, SingleFileBackend, signature_differences
from internvit.engine.config import load_config
from internvit.engine.distributed import DistInfo
from internvit.engine.parallelize import parallelize
from internvit.errors import InternViTError
from internvit.model import build_model
from internvit.segmentation.config import SegmentationConfig

DIST = DistInfo()


class Box:
    """A minimal stateful object."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def test_checkpointer_round_trip_and_signature_check(tmp_path):
    signature = {"train": {"lr": 0.1, "epochs": 10}, "world_size": 1}
    saver = Checkpointer(tmp_path, signature=signature, dist=DIST)
    assert saver.find() is None
    saver.save({"a": Box(3), "b": Box(7), "t": torch.nn.Linear(2, 2)})
    objects = {"a": Box(), "b": Box(), "t": torch.nn.Linear(2, 2)}
    point = Checkpointer(tmp_path, signature=signature, dist=DIST).find()
    Checkpointer(tmp_path, signature=signature, dist=DIST).restore(point, objects)
    assert (objects["a"].value, objects["b"].value) == (3, 7)
    assert point.state is None  # released: the memory-mapped file is not held once restored
    other = {"train": {"lr": 0.2, "epochs": 10}, "world_size": 2}
    with pytest.raises(InternViTError, match=r"other settings \(train.lr: 0.1 -> 0.2; world_size: 1 -> 2\)"):
        Checkpointer(tmp_path, signature=other, dist=DIST).find()
    with pytest.raises(InternViTError, match="lacks c"):
        saver.restore(saver.find(), objects | {"c": Box()})


def test_signature_differences_name_added_and_removed_fields():
    diffs = signature_differences({"a": {"x": 1, "y": 2}, "z": 0}, {"a": {"x": 1, "w": 3}, "z": 0})
    assert diffs == ["a.y (only in the checkpoint)", "a.w (only in this run)"]


def test_checkpoint_without_signature_or_unreadable_is_refused(tmp_path):
    torch.save({"head": {}, "epoch": 3}, tmp_path / "checkpoint.pth")
    with pytest.raises(InternViTError, match="checkpoint in another format"):
        Checkpointer(tmp_path, signature={}, dist=DIST).find()
    (tmp_path / "checkpoint.pth").write_bytes(b"not a zip")
    with pytest.raises(InternViTError, match="cannot read training checkpoint"):
        Checkpointer(tmp_path, signature={}, dist=DIST).find()


def test_configs_are_frozen():
    cfg = load_config(ClassificationConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3  # type: ignore[misc]
    assert dataclasses.replace(cfg.train, epochs=3).epochs == 3


def test_renamed_fields_still_work_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="internvit"):
        cls = load_config(ClassificationConfig, overrides=["train.amp=none"])
        seg = load_config(SegmentationConfig, overrides=["backbone.dtype=fp32"])
    assert cls.backbone.precision == "fp32" and seg.backbone.precision == "fp32"
    assert "train.amp is now backbone.precision" in caplog.text
    with pytest.raises(InternViTError, match="backbone.precision must be one of fp32, bf16, fp16"):
        load_config(ClassificationConfig, overrides=["backbone.precision=int8"])
    with pytest.raises(InternViTError, match="unknown config field train.amp"):  # never a segmentation field
        load_config(SegmentationConfig, overrides=["train.amp=bf16"])


def test_an_override_under_the_old_name_wins_over_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("backbone: {precision: bf16}\n")
    assert load_config(SegmentationConfig, path, ["backbone.dtype=fp32"]).backbone.precision == "fp32"
    path.write_text("backbone: {dtype: fp32}\n")
    assert load_config(SegmentationConfig, path, ["backbone.precision=bf16"]).backbone.precision == "bf16"


def test_one_segmentation_crop_field_drives_the_others():
    default = load_config(SegmentationConfig)
    assert (default.backbone.img_size, default.data.img_scale, default.data.test_short) == (504, [2016, 504], 504)
    assert (default.eval.crop, default.eval.stride) == (504, 322)  # the original's 504 / 322
    small = load_config(SegmentationConfig, overrides=["data.crop=224"])
    assert (small.backbone.img_size, small.data.img_scale, small.data.test_short) == (224, [896, 224], 224)
    assert (small.eval.crop, small.eval.stride) == (224, 140)
    kept = load_config(SegmentationConfig, overrides=["data.crop=224", "eval.stride=154", "data.test_short=256"])
    assert (kept.eval.stride, kept.data.test_short) == (154, 256)
    assert load_config(SegmentationConfig, overrides=["data.crop=224"]) == load_config(
        SegmentationConfig, overrides=["data.crop=224", "backbone.img_size=224", "eval.crop=224"]
    )
    for override in ("backbone.img_size=448", "eval.crop=448"):
        with pytest.raises(InternViTError, match=f"{override.split('=')[0]}=448 disagrees with data.crop=504"):
            load_config(SegmentationConfig, overrides=[override])
    with pytest.raises(InternViTError, match="multiple of the patch size"):
        load_config(SegmentationConfig, overrides=["data.crop=500"])


def test_parallelize_checkpoints_and_compiles_blocks_from_outside():
    """Activation checkpointing, then per-block compile, on a trainable backbone: same loss and gradients."""
    torch.manual_seed(0)
    eager = randomize_(build_model(TINY_6B)).train()
    prepared = build_model(TINY_6B)
    prepared.load_state_dict(eager.state_dict())
    assert parallelize(prepared, dist=DIST, backbone=prepared, activation_checkpointing=True, compile=True) is prepared
    assert all(type(b).__name__ == "CheckpointWrapper" and b._compiled_call_impl is not None for b in prepared.blocks)
    x = torch.randn(2, 3, 56, 56)
    losses = []
    for model in (eager, prepared):
        loss = model.forward_features(x).square().mean()
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for a, b in zip(eager.parameters(), prepared.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def probe_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("startup")
    paths = make_mini_imagenet(root / "data", num_classes=3, train_per_class=8, val_per_class=2)
    return paths, make_demo_checkpoint(root / "debug.pth")


def settings(paths, checkpoint, out: Path, **extra) -> list[str]:
    base = {"head.num_classes": 3, "train.epochs": 1, "train.batch_size": 8, "train.global_batch": 8}
    return [*classification_overrides(paths, checkpoint, out), *(f"{k}={v}" for k, v in (base | extra).items())]


def test_refused_resume_names_the_fields_before_the_backbone_loads_and_keeps_config_yaml(
    probe_data, capsys, monkeypatch
):
    paths, checkpoint = probe_data
    run = checkpoint.parent / "run"
    assert main(["cls", "train", *settings(paths, checkpoint, run)]) == 0
    before = (run / "config.yaml").read_text()
    monkeypatch.setattr(cls_run, "_backbone_and_head", lambda *a, **k: pytest.fail("the backbone was loaded"))
    capsys.readouterr()
    assert main(["cls", "train", *settings(paths, checkpoint, run, **{"train.base_lr": 0.5})]) == 2
    assert "holds a run with other settings (train.base_lr: 1.6 -> 0.5)" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == before
    assert yaml.safe_load(before)["train"]["base_lr"] == 1.6
    other = checkpoint.parent / "other.pth"  # the same architecture, other weights
    torch.save({"module": {k: v + 1 for k, v in torch.load(checkpoint, weights_only=True)["module"].items()}}, other)
    assert main(["cls", "train", *settings(paths, other, run)]) == 2
    assert "holds a run with other settings (backbone.files: " in capsys.readouterr().err


def test_bad_data_and_images_fail_before_the_backbone_loads(probe_data, tmp_path, capsys):
    paths, _ = probe_data
    missing_backbone = tmp_path / "no-backbone.pth"
    args = settings(paths, missing_backbone, tmp_path / "run", **{"data.imagenet": tmp_path / "nowhere"})
    assert main(["cls", "train", *args]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "no-backbone" not in err
    assert not (tmp_path / "run" / "config.yaml").exists()
    head = tmp_path / "head.safetensors"
    assert (
        main(["classify", str(tmp_path / "missing.jpg"), "--backbone", str(missing_backbone), "--head", str(head)]) == 2
    )
    assert "no such image file" in capsys.readouterr().err
    assert main(["segment", str(tmp_path / "missing.jpg"), "--checkpoint", str(head)]) == 2
    assert "no such image file" in capsys.readouterr().err


def test_resumed_history_and_config_are_those_of_the_run(probe_data):
    paths, checkpoint = probe_data
    run = checkpoint.parent / "twice"
    args = settings(paths, checkpoint, run, **{"train.epochs": 2})
    assert main(["cls", "train", *settings(paths, checkpoint, run, **{"train.epochs": 2})]) == 0
    first = json.loads((run / "train_history.json").read_text())
    assert main(["cls", "train", *args]) == 0  # all steps done: resumes at the end, trains nothing
    assert json.loads((run / "train_history.json").read_text()) == first and len(first) == 2


def test_one_training_per_folder_and_leftovers_removed(probe_data, tmp_path, capsys):
    from internvit.engine.run_folder import lock_run_folder

    paths, checkpoint = probe_data
    run = tmp_path / "run"
    run.mkdir()
    (run / ".checkpoint.pth.x1y2.tmp").write_bytes(b"half a checkpoint")
    (run / "checkpoint.tmp").mkdir()
    holder = subprocess.Popen(  # another process holds the folder's lock
        [
            sys.executable,
            "-c",
            f"import time; from internvit.engine.run_folder import lock_run_folder as l; "
            f"from pathlib import Path; l(Path({str(run)!r})); print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    assert main(["cls", "train", *settings(paths, checkpoint, run)]) == 2
    assert f"another process (pid {holder.pid}) is training in {run}" in capsys.readouterr().err
    holder.kill()
    holder.wait()  # a dead holder's lock is free again
    assert main(["cls", "train", *settings(paths, checkpoint, run)]) == 0
    assert not list(run.glob(".*.tmp")) and not (run / "checkpoint.tmp").exists()
    lock_run_folder(run)  # this process's own lock is taken once, silently


def test_a_diverging_run_stops_with_the_step_and_keeps_the_last_good_checkpoint(probe_data, tmp_path, capsys):
    paths, checkpoint = probe_data
    run = tmp_path / "run"
    assert (
        main(
            [
                "cls",
                "train",
                *settings(
                    paths, checkpoint, run, **{"train.base_lr": 1e38, "train.warmup_epochs": 0, "train.epochs": 2}
                ),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "training diverged at step" in err and "keeps the last good checkpoint" in err
    assert not (run / "head.safetensors").exists()


def test_loader_workers_follow_the_cpu_count(monkeypatch, caplog):
    monkeypatch.setattr(engine_data, "available_cpus", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert engine_data.resolve_num_workers(None) == 8  # capped default
    assert engine_data.resolve_num_workers(None, local_processes=4) == 3  # 4 cores each, one for the process
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert engine_data.resolve_num_workers(None) == 1 and engine_data.resolve_num_workers(0) == 0
    assert engine_data.resolve_num_workers(5) == 2 and "exceeds the 2 core(s)" in caplog.text  # never above the share
    monkeypatch.setattr(engine_data, "available_cpus", lambda: 1)
    assert engine_data.resolve_num_workers(None, local_processes=1) == 1


def test_first_signal_is_recorded_a_second_exits_at_once():
    code = """
import os, signal, sys, time
from internvit.engine.loop import StopSignals
with StopSignals() as signals:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)
    assert signals.signum == signal.SIGINT, signals.signum
    print("recorded", flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
print("not reached", flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + 2 and proc.stdout.strip() == "recorded", (proc.stdout, proc.stderr)
    assert "SIGINT: finishing this step" in proc.stderr and "second SIGINT: exiting now" in proc.stderr


def test_resume_with_other_shapes_is_a_clear_error(tmp_path):
    """A checkpoint whose tensors do not fit the run's objects (here: a head of another width, and optimizer
    moments of another shape) is refused with the folder named, not a raw size-mismatch traceback."""
    dist = DistInfo()
    head = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    head(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    writer = Checkpointer(tmp_path, dist=dist, signature={"a": 1}, backend=SingleFileBackend(tmp_path))
    writer.save({"head": head, "optimizer": optimizer})
    other = torch.nn.Linear(6, 3)
    reader = Checkpointer(tmp_path, dist=dist, signature={"a": 1}, backend=SingleFileBackend(tmp_path))
    with pytest.raises(InternViTError, match="does not fit this run's model") as info:
        reader.restore(reader.find(), {"head": other, "optimizer": torch.optim.SGD(other.parameters(), lr=0.1)})
    assert str(tmp_path) in info.value.message and "config.yaml" in info.value.fix
    # the same shapes, but optimizer moments of another shape (torch itself would accept them)
    stored = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    stored["objects"]["optimizer"]["state"][0]["momentum_buffer"] = torch.zeros(5)
    torch.save(stored, tmp_path / "checkpoint.pth")
    reader = Checkpointer(tmp_path, dist=dist, signature={"a": 1}, backend=SingleFileBackend(tmp_path))
    fresh = torch.nn.Linear(4, 3)
    with pytest.raises(InternViTError, match="optimizer state momentum_buffer of parameter 0 has shape"):
        reader.restore(reader.find(), {"head": fresh, "optimizer": torch.optim.SGD(fresh.parameters(), lr=0.1)})
