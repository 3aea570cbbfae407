"""The classification protocol end to end through the real CLI, on a generated learnable mini ImageNet family."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from internvit.classification.checkpoints import read_head_file, select_head_state
from internvit.cli import main
from internvit.data.images import load_image
from internvit.demo import classification_overrides, make_demo_checkpoint
from internvit.demo.imagenet import make_mini_custom, make_mini_imagenet
from internvit.engine.schedule import cosine_lr

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini")
    paths = make_mini_imagenet(root / "data")
    checkpoint = make_demo_checkpoint(root / "debug.pth")
    return root, paths, checkpoint


def overrides(paths: dict, checkpoint: Path, out: Path, **extra) -> list[str]:
    """The demo's probe settings (the paper recipe scaled to 240 images), plus `extra`, which win."""
    return [*classification_overrides(paths, checkpoint, out), *(f"{k}={v}" for k, v in extra.items())]


def cli(args: list[str], *, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, "-m", "internvit.cli"] if nproc > 1 else [sys.executable, "-m", "internvit.cli"]
    return subprocess.run([*cmd, *args], env=ENV, capture_output=True, text=True, timeout=300, check=False)


def test_probe_learns_and_scores_all_six_sets(mini, capsys):
    root, paths, checkpoint = mini
    run = root / "probe"
    assert main(["cls", "train", *overrides(paths, checkpoint, run, **{"train.epochs": 10})]) == 0
    history = json.loads((run / "train_history.json").read_text())
    assert len(history) == 10 and "val_acc1_ema" in history[-1]
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "grad_norm" in r]
    # 7 steps of 32 images per epoch: a record at every 10th step of each epoch, i.e. at each epoch's first step
    assert [r["step"] for r in steps[:3]] == [0, 7, 14]
    for r in steps:  # the lr as the original logs it: after step_update(s), f(s) (docs/protocol.md §4.1)
        expected = cosine_lr(r["step"], base_lr=1.6 * 32 / 512, total_steps=70, warmup_steps=7)
        assert r["lr"] == pytest.approx(expected, rel=1e-12), r
    head = run / "head.safetensors"
    assert main(["cls", "eval", *overrides(paths, checkpoint, run / "eval", **{"head.checkpoint": head})]) == 0
    rows = {r["set"]: r for r in json.loads((run / "eval" / "eval_results.json").read_text())}
    assert set(rows) == {"in1k", "real", "v2", "a", "r", "sketch"}
    assert rows["in1k"]["acc1"] >= 95.0, rows["in1k"]
    assert rows["in1k"]["num_images"] == 60 and rows["in1k"]["paper_acc1"] == 88.23
    assert rows["real"]["num_images"] < 60  # images with an empty ReaL label set are not scored
    assert (run / "eval" / "eval_results.csv").is_file() and (run / "eval" / "eval_results.md").is_file()
    assert (run / "training.png").is_file()  # loss, lr and validation curves
    confusions = json.loads((run / "eval" / "eval_confusions.json").read_text())
    for name, row in rows.items():  # every mistake in a (true, predicted) pair: few classes, so all pairs listed
        pairs = [c for c in confusions if c["set"] == name]
        if name == "real":
            assert not pairs  # label sets, not one class per image
            continue
        wrong = round(row["num_images"] * (100 - row["acc1"]) / 100)
        assert sum(c["count"] for c in pairs) == wrong and all(c["true"] != c["predicted"] for c in pairs), name
        assert (run / "eval" / f"eval_confusions_{name}.png").is_file() == bool(pairs)
    capsys.readouterr()
    image = next((paths["in1k"] / "val" / "n01443537").iterdir())
    assert main(["classify", str(image), "--backbone", str(checkpoint), "--head", str(head), "--json"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"]
    assert top[0]["class"] == "goldfish" and len(top) == 5


def test_two_process_evaluation_equals_one_process_exactly(mini):
    root, paths, checkpoint = mini
    run = root / "ddp-train"
    args = overrides(paths, checkpoint, run, **{"train.epochs": 2, "train.batch_size": 8})
    result = cli(["cls", "train", *args], nproc=2)  # DDP on the head, 2 processes x 8 x 2 accumulation steps
    assert result.returncode == 0, result.stderr[-2000:]
    assert "16 per process" not in result.stderr and "8 per process x 2 process(es) x 2" in result.stderr
    outputs = {}
    for nproc in (1, 2):
        out = root / f"eval-{nproc}"
        result = cli(
            ["cls", "eval", *overrides(paths, checkpoint, out, **{"head.checkpoint": run / "head.safetensors"})],
            nproc=nproc,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        outputs[nproc] = json.loads((out / "eval_results.json").read_text())
    assert outputs[1] == outputs[2]
    assert sum(r["num_images"] for r in outputs[1] if r["set"] == "in1k") == 60


def test_killed_training_resumes_to_the_same_head(mini):
    root, paths, checkpoint = mini
    extra = {"train.epochs": 8, "train.eval_every": 100}
    reference = cli(["cls", "train", *overrides(paths, checkpoint, root / "uninterrupted", **extra)])
    assert reference.returncode == 0, reference.stderr[-2000:]
    run = root / "interrupted"
    cmd = [sys.executable, "-m", "internvit.cli", "cls", "train", *overrides(paths, checkpoint, run, **extra)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoint.pth").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.4)  # into the next epoch
    assert proc.poll() is None, "training finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "head.safetensors").exists()
    resumed = cli(["cls", "train", *overrides(paths, checkpoint, run, **extra)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    for name in ("head.safetensors", "head_ema.safetensors"):
        a, b = load_file(root / "uninterrupted" / name), load_file(run / name)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), name
    assert not list(run.glob(".*.tmp"))

    def records(folder: Path) -> list[tuple]:  # each metrics record once, in order, as an uninterrupted run writes
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return [(r["epoch"], r.get("step"), r.get("train_loss")) for r in map(json.loads, lines)]

    assert records(run) == records(root / "uninterrupted")


def _wait_for_record(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until metrics.jsonl holds the step record `step` (the run is then part-way into an epoch)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and f'"step": {step},' in metrics.read_text():
            return
        time.sleep(0.02)
    raise AssertionError(f"no record of step {step} in {run} (process status {proc.poll()})")


def test_sigterm_saves_mid_epoch_and_resumes_bit_identically(mini):
    """SIGTERM (a preemption notice) finishes the step, checkpoints part-way into the epoch and exits with status 3;
    the rerun, with a loader worker where the reference had none, ends with the same heads and records."""
    root, paths, checkpoint = mini
    extra = {"train.epochs": 3, "train.eval_every": 100}
    reference = cli(["cls", "train", *overrides(paths, checkpoint, root / "sigterm-ref", **extra)])
    assert reference.returncode == 0, reference.stderr[-2000:]
    run = root / "sigterm"
    args = [*overrides(paths, checkpoint, run, **extra), "data.num_workers=1"]
    cmd = [sys.executable, "-m", "internvit.cli", "cls", "train", *args]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_record(run, 7, proc)  # the first step of the second epoch (7 per epoch) is done
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-2000:]
    stopped = int(err.split("after step ")[1].split(";")[0])
    assert "internvit: stopped by SIGTERM after step" in err and "rerun the same command to resume" in err
    assert "Traceback" not in err and stopped % 7 and (run / "checkpoint.pth").is_file()
    assert not (run / "head.safetensors").exists()
    resumed = cli(["cls", "train", *args])
    assert resumed.returncode == 0 and f"at step {stopped} of 21" in resumed.stderr, resumed.stderr[-2000:]
    for name in ("head.safetensors", "head_ema.safetensors"):
        a, b = load_file(root / "sigterm-ref" / name), load_file(run / name)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), name
    history = json.loads((run / "train_history.json").read_text())
    reference_history = json.loads((root / "sigterm-ref" / "train_history.json").read_text())
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in history]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in reference_history]  # train_loss too


def test_corrupt_image_names_the_file_or_is_skipped_and_counted(tmp_path, mini, capsys):
    _, _, checkpoint = mini
    paths = make_mini_imagenet(tmp_path / "data", num_classes=3, train_per_class=4, val_per_class=2)
    bad = sorted((paths["in1k"] / "val").rglob("*.JPEG"))[0]
    bad.write_bytes(b"not a jpeg at all")
    sorted((paths["in1k"] / "train").rglob("*.JPEG"))[0].write_bytes(b"\xff\xd8 truncated")  # odd batches follow
    head = tmp_path / "run" / "head.safetensors"
    train = overrides(
        paths,
        checkpoint,
        tmp_path / "run",
        **{"head.num_classes": 3, "train.epochs": 1, "train.batch_size": 4, "train.global_batch": 8},
    )
    assert main(["cls", "train", *train, "train.eval_every=100", "data.skip_corrupt=true"]) == 0
    common = [*train, f"head.checkpoint={head}", "eval.sets=[in1k]"]
    assert main(["cls", "eval", *common]) == 2
    assert bad.name in capsys.readouterr().err
    assert main(["cls", "eval", *common, "data.skip_corrupt=true"]) == 0
    row = json.loads((tmp_path / "run" / "eval_results.json").read_text())[0]
    assert (row["num_images"], row["skipped"]) == (5, 1)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=ten", "train.epochs: expected int"),
        ("train.epoch=3", "unknown config field train.epoch"),
        ("eval.sets=[in1k,imagenet-c]", "unknown set 'imagenet-c'"),
        ("train.global_batch=30", "not a multiple of batch_size"),
    ],
)
def test_config_mistakes_are_named(mini, tmp_path, capsys, override, message):
    root, paths, checkpoint = mini
    assert main(["cls", "train", *overrides(paths, checkpoint, tmp_path / "run"), override]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "switches",
    [
        ["backbone.precision=fp16"],
        ["backbone.precision=fp32", "train.mixup=0", "train.cutmix=0", "train.clip_grad=0", "tensorboard=true"],
        ["head.kind=attention_pooling", "train.ema=false"],
        ["head.kind=clip_projector"],
    ],
    ids=["fp16-gradscaler", "no-mixup-fp32", "attention-pooling-no-ema", "clip-projector"],
)
def test_recipe_switches_train_and_save(mini, tmp_path, switches):
    root, paths, _ = mini
    checkpoint = tmp_path / "with_clip.pth"
    state = torch.load(root / "debug.pth", weights_only=True)["module"]
    c = state["cls_token"].shape[-1]
    clip = {
        f"clip_projector.norm1_{x}.{p}": torch.ones(c) if p == "weight" else torch.zeros(c)
        for x in "qkv"
        for p in ("weight", "bias")
    }
    clip |= {f"clip_projector.cross_attn.{x}_bias": torch.zeros(c) for x in "qkv"}
    clip |= {f"clip_projector.cross_attn.{x}.weight": torch.randn(c, c) * 0.05 for x in "qkv"}
    clip |= {
        "clip_projector.cross_attn.proj.weight": torch.randn(768, c) * 0.05,
        "clip_projector.cross_attn.proj.bias": torch.zeros(768),
    }
    torch.save({"module": state | clip}, checkpoint)
    run = tmp_path / "run"
    assert main(["cls", "train", *overrides(paths, checkpoint, run, **{"train.epochs": 1}), *switches]) == 0
    head = load_file(run / "head.safetensors")
    assert all(torch.isfinite(t).all() for t in head.values())
    assert (run / "head_ema.safetensors").exists() == ("train.ema=false" not in switches)
    record = json.loads((run / "train_history.json").read_text())[0]
    assert record["train_images"] == 224 and record["val_acc1_head"] > 10.0
    if "tensorboard=true" in switches:  # the metrics records as scalars, at the optimizer step
        events = EventAccumulator(str(run / "tensorboard"))
        events.Reload()
        (point,) = events.Scalars("val_acc1_head")
        assert (point.step, point.value) == (7, pytest.approx(record["val_acc1_head"]))
        steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "grad_norm" in r]
        assert [p.step for p in events.Scalars("loss")] == [r["step"] + 1 for r in steps]
    else:
        assert not (run / "tensorboard").exists()


CUSTOM_NAMES = ["Red thing", "Green thing", "blue"]  # make_mini_custom's display names, in classes.txt order


def custom_overrides(tree: Path, checkpoint: Path, out: Path, **extra) -> list[str]:
    """A probe on a custom tree (24 train images in 3 steps of 8 per epoch), plus `extra`, which win."""
    settings = {
        "backbone.checkpoint": checkpoint,
        "backbone.img_size": 56,
        "head.num_classes": 3,
        "data.custom": tree,
        "data.num_workers": 0,
        "train.epochs": 8,
        "train.batch_size": 8,
        "train.global_batch": 8,
        "train.base_lr": 3.2,
        "eval.batch_size": 64,
        "output_dir": out,
    } | extra
    return [f"{k}={v}" for k, v in settings.items()]


@pytest.fixture(scope="module")
def custom_run(mini):
    """A head trained with `cls train` on a 3-class custom tree (classes.txt order and display names)."""
    root, _, checkpoint = mini
    tree = make_mini_custom(root / "flowers")
    assert main(["cls", "train", *custom_overrides(tree, checkpoint, root / "custom-probe")]) == 0
    return tree, checkpoint, root / "custom-probe"


def test_custom_tree_trains_evaluates_and_classifies_with_its_class_names(custom_run, tmp_path, capsys):
    tree, checkpoint, run = custom_run
    history = json.loads((run / "train_history.json").read_text())
    assert len(history) == 8 and history[-1]["train_images"] == 24 and "val_acc1_ema" in history[-1]
    assert f"custom: {tree}" in (run / "config.yaml").read_text()
    head = run / "head.safetensors"
    info = read_head_file(head)
    assert (info.num_classes, info.class_names) == (3, CUSTOM_NAMES)
    assert info.classes == ["red_thing", "green thing", "blue"]  # the folders, in classes.txt (not sorted) order

    capsys.readouterr()
    out = tmp_path / "eval"
    assert main(["cls", "eval", *custom_overrides(tree, checkpoint, out, **{"head.checkpoint": head})]) == 0
    assert "flowers-val" in capsys.readouterr().out  # the printed table
    (row,) = json.loads((out / "eval_results.json").read_text())
    assert (row["set"], row["name"], row["num_images"], row["skipped"]) == ("custom", "flowers-val", 12, 0)
    assert row["acc1"] >= 75.0 and row["acc5"] == 100.0 and "paper_acc1" not in row, row
    assert "flowers-val" in (out / "eval_results.csv").read_text() and (out / "eval_results.md").is_file()
    per_class = json.loads((out / "eval_per_class.json").read_text())
    assert [(r["index"], r["class"], r["name"], r["num_images"]) for r in per_class] == [
        (0, "red_thing", "Red thing", 4),
        (1, "green thing", "Green thing", 4),
        (2, "blue", "blue", 4),
    ]
    assert all(name in (out / "eval_per_class.md").read_text() for name in CUSTOM_NAMES)

    image = sorted((tree / "val" / "green thing").iterdir())[0]
    assert main(["classify", str(image), "--backbone", str(checkpoint), "--head", str(head), "--json"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"]
    assert top[0]["class"] == "Green thing" and top[0]["index"] == 1
    assert sorted(t["class"] for t in top) == sorted(CUSTOM_NAMES)  # top-5 of 3 classes: all three
    assert main(["classify", str(image), "--backbone", str(checkpoint), "--head", str(head)]) == 0
    assert "1. Green thing" in capsys.readouterr().out


def test_classify_folders_exif_and_unreadable_inputs(custom_run, tmp_path, capsys):
    """A folder is every image in it; an EXIF-rotated picture is classified upright; an unreadable file is
    reported while the others are still classified, and the exit status says so."""
    tree, checkpoint, run = custom_run
    head = run / "head.safetensors"
    source = Image.open(sorted((tree / "val" / "green thing").iterdir())[0]).convert("RGB")
    folder = tmp_path / "in"
    folder.mkdir()
    source.save(folder / "plain.png")
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees to view
    source.transpose(Image.Transpose.ROTATE_270).save(folder / "rotated.jpg", exif=exif.tobytes(), quality=95)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    code = main(["classify", str(folder), "--backbone", str(checkpoint), "--head", str(head), "--json"])
    captured = capsys.readouterr()
    results = {Path(r["image"]).name: r for r in json.loads(captured.out)}
    assert code == 2 and "1 of 3 image(s) could not be classified" in captured.err
    assert "cannot decode image" in results["broken.jpg"]["error"]
    assert results["plain.png"]["top"][0]["class"] == "Green thing"
    plain = {t["class"]: t["prob"] for t in results["plain.png"]["top"]}
    rotated = {t["class"]: t["prob"] for t in results["rotated.jpg"]["top"]}
    assert rotated["Green thing"] == pytest.approx(plain["Green thing"], abs=0.05)  # upright again, JPEG aside
    assert load_image(folder / "rotated.jpg", exif=True).size == source.size  # classify's decoding: upright
    assert load_image(folder / "rotated.jpg").size == source.size[::-1]  # the protocols' datasets: as stored


def test_custom_tree_mistakes_are_clear_errors(custom_run, tmp_path, capsys):
    tree, checkpoint, run = custom_run
    args = custom_overrides(tree, checkpoint, tmp_path / "run", **{"train.epochs": 1})

    def error(argv: list[str]) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "fix:" in err, err
        return err

    err = error(["cls", "train", *args, "head.num_classes=1000"])
    assert "has 3 classes but head.num_classes=1000" in err and "set head.num_classes=3" in err
    err = error(["cls", "eval", *args, f"head.checkpoint={run / 'head.safetensors'}", "eval.sets=[in1k,v2]"])
    assert "with data.custom set, only its val/ split is scored" in err
    # the same folders in another order: the head's logits would name the wrong classes
    other = tmp_path / "reordered"
    shutil.copytree(tree, other)
    (other / "classes.txt").write_text("blue\nred_thing\ngreen thing\n")
    err = error(["cls", "eval", *args, f"data.custom={other}", f"head.checkpoint={run / 'head.safetensors'}"])
    assert "was trained on the classes" in err and "class 0 differs: 'red_thing' in the head, 'blue' here" in err
    (other / "val" / "purple").mkdir()
    shutil.copy(next((other / "val" / "blue").iterdir()), other / "val" / "purple" / "x.png")
    err = error(["cls", "train", *args, f"data.custom={other}"])
    assert "not in the 3-class list" in err and "purple" in err
    assert not (tmp_path / "run" / "checkpoint.pth").exists()  # every check ran before any training


def test_evaluation_from_the_training_checkpoint_and_info_on_every_file(custom_run, tmp_path, capsys):
    """`cls eval` reads a run's checkpoint.pth (its head, or with head.use_ema its EMA head) and scores exactly as
    the head files saved beside it; `info` describes heads and training checkpoints as well as backbones."""
    tree, checkpoint, run = custom_run
    scores = {}
    for name, extra in {
        "head": {"head.checkpoint": run / "head.safetensors"},
        "ema": {"head.checkpoint": run / "head_ema.safetensors"},
        "ckpt": {"head.checkpoint": run / "checkpoint.pth"},
        "ckpt-ema": {"head.checkpoint": run / "checkpoint.pth", "head.use_ema": "true"},
    }.items():
        out = tmp_path / name
        assert main(["cls", "eval", *custom_overrides(tree, checkpoint, out, **extra)]) == 0
        scores[name] = json.loads((out / "eval_results.json").read_text())[0]["acc1"]
    assert scores["ckpt"] == scores["head"] and scores["ckpt-ema"] == scores["ema"], scores
    for use_ema, name in ((False, "head.safetensors"), (True, "head_ema.safetensors")):  # the switch selects
        expected = load_file(run / name)
        state, entry = select_head_state(torch.load(run / "checkpoint.pth", weights_only=True), use_ema, "ckpt")
        assert entry == ("objects.ema" if use_ema else "objects.head")
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    assert not torch.equal(load_file(run / "head.safetensors")["head.weight"], state["head.weight"])
    capsys.readouterr()
    assert main(["info", str(run / "head.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["kind"], info["head_kind"], info["num_classes"], info["img_size"]) == (
        "classification head",
        "cls_patch_concat",
        3,
        56,
    )
    assert info["class_names"] == CUSTOM_NAMES and info["non_finite_tensors"] == []
    assert main(["info", str(run / "checkpoint.pth"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "training checkpoint" and info["step"] == 24 and "ema" in info["objects"]
    assert info["signature"]["head"]["num_classes"] == 3
