"""ADE20K protocols end to end through the real CLI on a generated mini ADE20K, with the debug backbone."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from internvit.cli import main
from internvit.demo import make_demo_checkpoint, segmentation_overrides
from internvit.demo.ade20k import make_mini_ade20k

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
CONFIGS = sorted(Path(__file__).parents[1].joinpath("configs", "segmentation").glob("*.yaml"))


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade")
    return make_mini_ade20k(root / "data", num_train=32), make_demo_checkpoint(root / "debug.pth")


def _descendants(pid: int) -> list[int]:
    """`pid` and every process below it (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_job(proc: subprocess.Popen) -> None:
    """kill -9 a whole job, the launcher and all its workers, and wait until none of them runs."""
    pids = _descendants(proc.pid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while any(_alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.05)


def has_checkpoint(run: Path) -> bool:
    """A complete checkpoint: one file (DDP, one process) or a sharded folder (FSDP)."""
    return (run / "checkpoint.pth").exists() or (run / "checkpoint" / "state.pth").exists()


def small(data: Path, checkpoint: Path, out: Path, crop: int = 112, **extra) -> list[str]:
    """The demo's settings (debug backbone, crop scaled down from 504, fp32 on CPU), plus `extra`, which win."""
    return [*segmentation_overrides(data, checkpoint, out, crop), *(f"{k}={v}" for k, v in extra.items())]


def test_linear_probe_learns_and_evaluates(ade, tmp_path, capsys):
    data, checkpoint = ade
    run = tmp_path / "run"
    args = small(data, checkpoint, run, crop=224, **{"train.iters": 30, "train.eval_every": 30})
    assert main(["seg", "train", *args]) == 0
    history = json.loads((run / "train_history.json").read_text())
    assert history[-1]["mIoU"] >= 90.0, history
    assert main(["seg", "eval", *args, f"head.checkpoint={run / 'best.safetensors'}", f"output_dir={run}/eval"]) == 0
    row = json.loads((run / "eval" / "eval_results.json").read_text())[0]
    assert row["mIoU"] == history[-1]["mIoU"] and row["paper_mIoU"] == 47.2 and row["num_images"] == 6
    per_class = json.loads((run / "eval" / "eval_per_class.json").read_text())
    assert len(per_class) == 150 and per_class[0]["class"] == "wall"
    assert (run / "training.png").is_file() and (run / "eval" / "eval_per_class.png").is_file()
    # the fast path (compiled blocks; the default on GPUs) scores the same
    fast = [*args, f"head.checkpoint={run / 'best.safetensors'}", f"output_dir={run}/fast", "backbone.compile=true"]
    assert main(["seg", "eval", *fast]) == 0
    fast_row = json.loads((run / "fast" / "eval_results.json").read_text())[0]
    assert abs(fast_row["mIoU"] - row["mIoU"]) < 0.5, (fast_row, row)
    capsys.readouterr()
    image = sorted((data / "images" / "validation").iterdir())[0]
    assert (
        main(
            [
                "segment",
                str(image),
                "--checkpoint",
                str(run / "best.safetensors"),
                "--out",
                str(tmp_path / "s"),
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)[0]
    assert Path(result["mask"]).is_file() and Path(result["overlay"]).is_file()
    assert abs(sum(c["share"] for c in result["classes"]) - 1.0) < 1e-3


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_paper_setting_runs(ade, tmp_path, capsys, config):
    """The eight settings of docs/protocol.md §5.9 through the CLI, scaled to the debug backbone (4 blocks, 64 wide)."""
    data, checkpoint = ade
    text = config.read_text()
    extra = {
        "train.iters": 2,
        "train.eval_every": 2,
        "head.channels": 16,
        "train.batch_size": 2,
        "train.global_batch": 2,
        "backbone.precision": "bf16",  # the original regime: bf16 backbone, fp32 heads
    }
    if "out_indices: [11, 23, 35, 47]" in text:
        extra["backbone.out_indices"] = "[0,1,2,3]"
    run = tmp_path / "run"
    assert main(["seg", "train", "--config", str(config), *small(data, checkpoint, run, **extra)]) == 0
    record = json.loads((run / "train_history.json").read_text())[-1]
    assert record["iter"] == 2 and "mIoU" in record
    if "fewshot: 16" in text or "fewshot: 2" in text:
        split = next(run.glob("fewshot_1of*.txt"))
        assert len(split.read_text().split()) == 32 // int(split.name.split("1of")[1].split("_")[0])
        assert record["split_hash"]
    # the file's stored settings rebuild the model: seg eval needs the data and nothing else restated
    best = run / "best.safetensors"
    evaluation = ["seg", "eval", f"data.root={data}", "data.num_workers=0", "backbone.precision=bf16"]
    assert main([*evaluation, f"head.checkpoint={best}", f"output_dir={run / 'eval'}"]) == 0
    row = json.loads((run / "eval" / "eval_results.json").read_text())[0]
    setting = next(line.split(":")[1].strip() for line in text.splitlines() if line.startswith("setting:"))
    assert row["setting"] == setting, row
    # a trained backbone: fp32 master weights under bf16 autocast in training, bf16 weights in evaluation
    tolerance = 0.0 if "frozen: false" not in text else 0.5
    assert abs(row["mIoU"] - record["mIoU"]) <= tolerance, (row, record)
    capsys.readouterr()
    assert main(["info", str(best), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["kind"], info["setting"], info["iter"], info["crop"]) == ("segmentor", setting, 2, 112)
    assert info["tensors_per_part"]["decode_head"] > 0 and info["non_finite_tensors"] == []
    assert ("backbone" in info["tensors_per_part"]) == ("frozen: false" in text)  # a trained backbone is saved
    assert main([*evaluation, f"head.checkpoint={best}", "head.channels=8", f"output_dir={run / 'x'}"]) == 2
    assert "was trained with head.channels = 16 (given: 8)" in capsys.readouterr().err


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_killed_training_resumes_to_the_same_weights(ade, tmp_path, parallel):
    data, checkpoint = ade
    extra = {
        "train.parallel": parallel,
        "train.iters": 16,
        "train.save_every": 3,  # mid-epoch: 4 iterations make an epoch here
        "train.eval_every": 100,
        "backbone.frozen": "false",
        "backbone.drop_path_rate": 0.1,
        "train.layer_decay": 0.9,
        "train.lr": 0.002,
    }
    cmd = [sys.executable, "-m", "internvit.cli", "seg", "train"]
    reference = subprocess.run(
        [*cmd, *small(data, checkpoint, tmp_path / "a", **extra)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert reference.returncode == 0, reference.stderr[-2000:]
    run = tmp_path / "b"
    proc = subprocess.Popen(
        [*cmd, *small(data, checkpoint, run, **extra)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not has_checkpoint(run) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert proc.poll() is None, "training finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(
        [*cmd, *small(data, checkpoint, run, **extra)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-2000:]
    a, b = load_file(tmp_path / "a" / "last.safetensors"), load_file(run / "last.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("backbone.") for k in a)
    assert all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: (d / "images" / "validation").rename(d / "images" / "val"), "validation"),
        (lambda d: next((d / "annotations" / "training").iterdir()).unlink(), "annotation"),
        (lambda d: _write_png(next((d / "annotations" / "training").iterdir()), (5, 5)), "size"),
    ],
    ids=["wrong-layout", "missing-label", "mismatched-label-png"],
)
def test_bad_dataset_gives_a_clear_error(tmp_path, ade, capsys, mutate, message):
    _, checkpoint = ade
    data = make_mini_ade20k(tmp_path / "data", num_train=4, num_val=2)
    mutate(data)
    assert main(["seg", "train", *small(data, checkpoint, tmp_path / "run", **{"train.iters": 1})]) == 2
    assert message in capsys.readouterr().err


def _write_png(path: Path, size: tuple[int, int]) -> None:
    from PIL import Image

    Image.new("L", size).save(path)


def test_released_mmseg_checkpoint_loads_into_the_segmentor(tmp_path):
    """A synthetic checkpoint in the released layout (meta + state_dict, FPN under backbone.up*) loads bit-exactly."""
    from internvit.model import build_model, get_config
    from internvit.segmentation.build import build_segmentor
    from internvit.segmentation.checkpoints import load_segmentor_weights
    from internvit.segmentation.config import SegBackboneConfig, SegHeadConfig

    def fresh(seed: int):
        torch.manual_seed(seed)
        backbone = build_model(get_config("debug").replace(img_size=112))
        return build_segmentor(
            backbone,
            SegBackboneConfig(out_indices=[0, 1, 2, 3]),
            SegHeadConfig(kind="upernet", fpn=True, aux=True, channels=8),
        )

    source = fresh(0)
    mmseg = {("backbone." + k[4:] if k.startswith("fpn.") else k): v for k, v in source.state_dict().items()}
    assert any(k.startswith("backbone.up1.") for k in mmseg)
    torch.save({"meta": {"iter": 80000}, "state_dict": mmseg}, tmp_path / "upernet.pth")
    target = fresh(1)
    load_segmentor_weights(target, str(tmp_path / "upernet.pth"))
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in source.state_dict().items())


def test_two_process_evaluation_equals_one_process(ade, tmp_path):
    data, checkpoint = ade
    run = tmp_path / "run"
    assert main(["seg", "train", *small(data, checkpoint, run, **{"train.iters": 4, "train.eval_every": 4})]) == 0
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"eval{nproc}"
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]
        args = [*small(data, checkpoint, out), f"head.checkpoint={run / 'best.safetensors'}"]
        result = subprocess.run(
            [*launcher, "internvit.cli", "seg", "eval", *args],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        results[nproc] = json.loads((out / "eval_results.json").read_text())
        results[nproc][0].pop("checkpoint")
    assert results[1] == results[2] and results[1][0]["num_images"] == 6


def test_fine_tuning_moves_the_backbone_at_the_paper_learning_rate(ade, tmp_path):
    """fp32 master weights under bf16 autocast: at lr 4e-5 x 0.95^k a pure-bf16 AdamW step would round away."""
    data, checkpoint = ade
    config = Path(__file__).parents[1] / "configs" / "segmentation" / "fewshot_1of1.yaml"
    extra = {
        "train.iters": 2,
        "train.eval_every": 2,
        "train.lr": 4e-5,
        "backbone.precision": "bf16",
        "backbone.drop_path_rate": 0.0,
    }
    assert main(["seg", "train", "--config", str(config), *small(data, checkpoint, tmp_path / "run", **extra)]) == 0
    tuned = load_file(tmp_path / "run" / "last.safetensors")
    source = torch.load(checkpoint, weights_only=True)["module"]
    for key in ("blocks.0.mlp.fc1.weight", "blocks.3.attn.qkv.weight"):
        after = tuned[f"backbone.{key}"]
        assert after.dtype == torch.float32
        assert (after != source[key]).float().mean() > 0.5, key


def test_two_process_training_killed_and_resumed_equals_uninterrupted(ade, tmp_path):
    """DDP on 2 gloo processes: kill -9 the whole job mid-run, rerun, and get the weights of an uninterrupted run."""
    data, checkpoint = ade
    extra = {
        "train.iters": 12,
        "train.save_every": 3,
        "train.eval_every": 100,
        "train.batch_size": 2,
        "train.global_batch": 8,  # 2 per process x 2 processes x 2 accumulation steps
        "backbone.frozen": "false",
        "backbone.drop_path_rate": 0.1,
        "train.layer_decay": 0.9,
        "train.lr": 0.002,
    }
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    cmd = [*launcher, "internvit.cli", "seg", "train"]

    def run(out: Path) -> subprocess.CompletedProcess:
        args = small(data, checkpoint, out, **extra)
        return subprocess.run([*cmd, *args], env=ENV, capture_output=True, text=True, timeout=400, check=False)

    reference = run(tmp_path / "a")
    assert reference.returncode == 0, reference.stderr[-3000:]
    job = tmp_path / "b"
    proc = subprocess.Popen(
        [*cmd, *small(data, checkpoint, job, **extra)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not has_checkpoint(job) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert proc.poll() is None, "training finished before it could be interrupted"
    kill_job(proc)
    assert not (job / "last.safetensors").exists()
    resumed = run(job)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]
    a, b = load_file(tmp_path / "a" / "last.safetensors"), load_file(job / "last.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("backbone.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    history = json.loads((job / "train_history.json").read_text())
    assert history == json.loads((tmp_path / "a" / "train_history.json").read_text())
