"""FSDP2 fine-tuning of the backbone on 2 gloo processes (CPU): equal to one process, resumable across world sizes
from sharded checkpoints, exported as one safetensors file, and a memory plan that matches the real shards."""

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_seg_e2e import ENV, has_checkpoint, kill_job, small

from internvit.demo import make_demo_checkpoint
from internvit.demo.ade20k import make_mini_ade20k

LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
# fp32, one image per micro-batch and no drop path: every micro-batch is the same computation on any number of
# processes (BatchNorm statistics of one image, no per-rank random streams), so results agree to round-off
EXACT = {
    "backbone.frozen": "false",
    "backbone.precision": "fp32",
    "backbone.drop_path_rate": 0.0,
    "train.parallel": "fsdp",
    "train.batch_size": 1,
    "train.global_batch": 4,
    "train.iters": 6,
    "train.save_every": 2,
    "train.eval_every": 6,
    "train.layer_decay": 0.9,
    "train.weight_decay": 0.05,
    "train.lr": 0.002,
}


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    return make_mini_ade20k(root / "data", num_train=16, num_val=2), make_demo_checkpoint(root / "debug.pth")


def command(nproc: int) -> list[str]:
    prefix = [*LAUNCH, f"--nproc_per_node={nproc}", "-m"] if nproc > 1 else [sys.executable, "-m"]
    return [*prefix, "internvit.cli", "seg", "train"]


def train(ade, out: Path, nproc: int, **extra) -> subprocess.CompletedProcess:
    data, checkpoint = ade
    args = small(data, checkpoint, out, **(EXACT | extra))
    result = subprocess.run([*command(nproc), *args], env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def kill_after_first_checkpoint(ade, out: Path, nproc: int, **extra) -> None:
    data, checkpoint = ade
    args = small(data, checkpoint, out, **(EXACT | extra))
    proc = subprocess.Popen([*command(nproc), *args], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not has_checkpoint(out) and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be interrupted"
    kill_job(proc)
    assert not (out / "last.safetensors").exists()


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


BN_STATS = ("running_mean", "running_var", "num_batches_tracked")  # per process on CPUs (no SyncBatchNorm on gloo)


def assert_same_weights(a: Path, b: Path, atol: float = 2e-5) -> None:
    x, y = load_file(a / "last.safetensors"), load_file(b / "last.safetensors")
    assert x.keys() == y.keys() and any(k.startswith("backbone.blocks.") for k in x)
    for key in (k for k in x if not k.endswith(BN_STATS)):
        torch.testing.assert_close(x[key], y[key], rtol=1e-4, atol=atol, msg=key)


@pytest.fixture(scope="module")
def one_process(ade, tmp_path_factory):
    """The reference: one process, the same global batch by accumulation."""
    run = tmp_path_factory.mktemp("one") / "run"
    train(ade, run, 1, **{"train.log_every": 1})
    return run


def test_two_processes_equal_one_process(ade, one_process, tmp_path):
    run = tmp_path / "two"
    train(ade, run, 2, **{"train.log_every": 1})
    assert (run / "checkpoint" / "state.pth").is_file() and not (run / "checkpoint.pth").exists()
    assert losses(run) == pytest.approx(losses(one_process), rel=1e-4)
    assert_same_weights(run, one_process)
    assert load_file(run / "last.safetensors")["backbone.blocks.0.mlp.fc1.weight"].dtype == torch.float32


@pytest.mark.parametrize(("first", "second"), [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_resume_on_another_number_of_processes(ade, one_process, tmp_path, first, second):
    run = tmp_path / "run"
    kill_after_first_checkpoint(ade, run, first)
    resumed = train(ade, run, second)
    assert "resumed from" in resumed.stderr
    assert_same_weights(run, one_process)


def test_cpu_offload_equals_the_reference(ade, one_process, tmp_path):
    run = tmp_path / "offload"
    train(ade, run, 1, **{"train.cpu_offload": "true"})
    assert_same_weights(run, one_process)


def test_bf16_mixed_precision_trains_with_hybrid_sharding(ade, tmp_path):
    """bf16 compute on a 2-D mesh (1 node x 2 processes: replicate x shard)."""
    run = tmp_path / "bf16"
    extra = {"backbone.precision": "bf16", "train.iters": 8, "train.log_every": 1, "train.lr": 0.01}
    extra |= {"train.hybrid_shard": "true"}
    train(ade, run, 2, **extra)
    steps = losses(run)
    assert len(steps) == 8 and sum(steps[-2:]) < sum(steps[:2]), steps
    tuned = load_file(run / "last.safetensors")
    assert tuned["backbone.blocks.0.attn.qkv.weight"].dtype == torch.float32  # fp32 master weights


def test_exported_segmentor_equals_the_sharded_state_and_scores_the_same(ade, one_process, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    data, checkpoint = ade
    run = tmp_path / "two"
    train(ade, run, 2)
    dcp_to_torch_save(run / "checkpoint", tmp_path / "gathered.pth")
    gathered = torch.load(tmp_path / "gathered.pth", weights_only=True)["model"]
    exported = load_file(run / "last.safetensors")
    fpn_free = {k: v for k, v in gathered.items() if not k.startswith("fpn.")}
    assert exported.keys() == fpn_free.keys()
    assert all(torch.equal(exported[k], fpn_free[k]) for k in exported)
    # on request, from the sharded checkpoint alone: one process, no model built
    export = subprocess.run(
        [sys.executable, "-m", "internvit.cli", "seg", "export", str(run), "--out", str(tmp_path / "x.safetensors")],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert export.returncode == 0, export.stderr[-3000:]
    again = load_file(tmp_path / "x.safetensors")
    assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in exported)
    history = json.loads((run / "train_history.json").read_text())
    args = [*small(data, checkpoint, tmp_path / "eval", **EXACT), f"head.checkpoint={run / 'last.safetensors'}"]
    result = subprocess.run(
        [sys.executable, "-m", "internvit.cli", "seg", "eval", *args], env=ENV, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads((tmp_path / "eval" / "eval_results.json").read_text())[0]
    assert row["mIoU"] == history[-1]["mIoU"]


PLAN_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from internvit.engine.distributed import init_distributed
    from internvit.engine.memory import plan_memory
    from internvit.engine.optim import build_adamw
    from internvit.engine.parallelize import FSDPSettings, parallelize
    from internvit.model import build_model, get_config
    from internvit.segmentation.build import build_segmentor
    from internvit.segmentation.config import SegBackboneConfig, SegHeadConfig
    from internvit.segmentation.recipe import LossForward

    dist = init_distributed("cpu", process_group=True)
    backbone_cfg, head_cfg = SegBackboneConfig(frozen=False, out_indices=[3]), SegHeadConfig(channels=16)
    def segmentor(device):
        backbone = build_model(get_config("debug").replace(img_size=112), device=device, init=device != "meta")
        with torch.device(device):
            return build_segmentor(backbone, backbone_cfg, head_cfg)
    meta = segmentor("meta")
    plan = plan_memory(meta, blocks=meta.backbone.blocks, world_size=dist.world_size, rank=dist.rank,
                       parallel="fsdp", batch_size=1, tokens=65, activation_checkpointing=True)
    def groups(module):
        optimizer = build_adamw(module, base_lr=1e-3, weight_decay=0.05, layer_decay=0.9, num_blocks=4)
        return {n: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for n in g["param_names"]}
    plain = groups(segmentor("cpu"))
    real = segmentor("cpu")
    model = parallelize(LossForward(real), dist=dist, backbone=real.backbone, activation_checkpointing=True,
                        fsdp=FSDPSettings(root=real, root_methods=("loss",)))
    assert groups(real) == plain and len(plain) == sum(1 for _ in real.parameters())
    params = sum(p.to_local().numel() * p.to_local().element_size() for p in real.parameters())
    opt = torch.optim.AdamW(real.parameters(), lr=1e-3)
    out = model(torch.randn(1, 3, 112, 112), torch.randint(0, 150, (1, 112, 112)))
    out["loss"].backward()
    opt.step()
    states = sum(t.to_local().numel() * t.to_local().element_size()
                 for s in opt.state.values() for k, t in s.items() if k != "step")
    json.dump({"plan": plan.components, "params": params, "optimizer": states},
              open(sys.argv[1] + f"/rank{dist.rank}.json", "w"))
    """
)


def test_memory_plan_matches_the_shards_and_optimizer_groups_match_ddp(tmp_path):
    """On each rank: the plan's bytes equal the real shards'; AdamW's layer-decay groups give every parameter the
    same lr and weight decay as on an unsharded model (checked inside the script)."""
    script = tmp_path / "plan.py"
    script.write_text(PLAN_SCRIPT)
    result = subprocess.run(
        [*LAUNCH, "--nproc_per_node=2", str(script), str(tmp_path)], env=ENV, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["plan"]["parameters"] == got["params"] and got["plan"]["gradients"] == got["params"]
        assert got["plan"]["optimizer"] == got["optimizer"]


def test_plan_command_without_starting_a_run(capsys):
    from internvit.cli import main

    config = str(Path(__file__).parents[1] / "configs" / "segmentation" / "upernet_full_504.yaml")
    plans = {}
    for parallel, nproc in (("ddp", 1), ("fsdp", 1), ("fsdp", 8)):
        assert main(["plan", "--config", config, f"train.parallel={parallel}", "--nproc", str(nproc), "--json"]) == 0
        plans[parallel, nproc] = json.loads(capsys.readouterr().out)
    ddp, one, eight = plans["ddp", 1]["bytes"], plans["fsdp", 1]["bytes"], plans["fsdp", 8]["bytes"]
    assert ddp["parameters"] == one["parameters"] > 4 * 5.9e9  # fp32 master weights of the 6B backbone + heads
    assert ddp["optimizer"] == 2 * ddp["parameters"] and eight["optimizer"] == 2 * eight["parameters"]
    # rank 0's dim-0 chunks are the largest (a tensor of one row, such as pos_embed, stays whole on it)
    assert one["parameters"] <= 8 * eight["parameters"] < 1.01 * one["parameters"]
    assert eight["unsharded blocks"] > 0 and ddp["unsharded blocks"] == 0
    assert main(["plan", "--config", config, "backbone.checkpoint=/no/such.pth", "--json"]) == 2
    assert "backbone.preset=" in capsys.readouterr().err


def test_a_plan_that_does_not_fit_stops_before_loading_and_names_the_switches(monkeypatch):
    from internvit.engine.config import load_config
    from internvit.engine.memory import check_fits
    from internvit.errors import InternViTError
    from internvit.segmentation.build import plan_training
    from internvit.segmentation.config import SegmentationConfig

    cfg = load_config(SegmentationConfig, overrides=["backbone.frozen=false"])
    plan = plan_training(cfg.backbone, cfg.head, cfg.train, world_size=1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (80 * 2**30, 80 * 2**30))
    with pytest.raises(InternViTError, match=r"needs 8\d\.\d GiB per GPU, 80\.0 GiB are free") as e:
        check_fits(plan, torch.device("cuda", 0))
    assert "more processes" in e.value.fix and "train.cpu_offload=true" in e.value.fix
    check_fits(plan_training(cfg.backbone, cfg.head, cfg.train, world_size=8), torch.device("cuda", 0))  # fits
