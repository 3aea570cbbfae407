"""Fine-tuning step of the segmentor (backbone trained): FSDP2 beside the DDP path, in one run.

For each variant: forward + backward + AdamW step at --resolution with activation checkpointing, bf16 compute
(fp32 master weights, gradients and optimizer states), the linear head on the last block; random weights, random
images and labels, nothing downloaded. Reports the median step time, img/s per process, peak device memory and the
memory plan's figure for the same settings (engine/memory.py), and writes JSON after every row.

    python benchmarks/finetune.py --preset internvit-6b-224px --resolution 504 --batch 2        # one GPU
    torchrun --nproc_per_node 8 benchmarks/finetune.py --variants fsdp                          # eight GPUs
    python benchmarks/finetune.py --device cpu --preset debug --resolution 112 --batch 2 --iters 2   # smoke
"""

from __future__ import annotations

import argparse

import torch
from _bench import ResultLog, environment, guarded, peak_memory_gib, reset_peak_memory, rounded, time_calls

from internvit.engine.distributed import DistInfo, init_distributed
from internvit.engine.optim import build_adamw
from internvit.engine.parallelize import FSDPSettings, parallelize
from internvit.engine.precision import autocast_dtype
from internvit.engine.results import format_table
from internvit.model import build_model, get_config
from internvit.segmentation.build import build_segmentor, plan_training
from internvit.segmentation.config import SegBackboneConfig, SegHeadConfig, SegTrainConfig
from internvit.segmentation.recipe import LossForward

VARIANTS = ("ddp", "fsdp")


def measure(args: argparse.Namespace, variant: str, dist: DistInfo) -> dict[str, object]:
    """One variant's row: step time, img/s, peak memory, and the plan for the same settings."""
    config = get_config(args.preset).replace(img_size=args.resolution)
    backbone_cfg = SegBackboneConfig(
        preset=args.preset, frozen=False, img_size=args.resolution, out_indices=[config.depth - 1]
    )
    head_cfg = SegHeadConfig(num_classes=150)
    reset_peak_memory(dist.device)
    torch.manual_seed(0)
    segmentor = build_segmentor(build_model(config, device=dist.device), backbone_cfg, head_cfg).to(dist.device)
    segmentor.backbone_autocast = autocast_dtype(backbone_cfg.precision)
    fsdp = FSDPSettings(root=segmentor, param_dtype=torch.bfloat16, root_methods=("loss",))
    model = parallelize(
        LossForward(segmentor),
        dist=dist,
        backbone=segmentor.backbone,
        activation_checkpointing=True,
        fsdp=fsdp if variant == "fsdp" else None,
    )
    optimizer = build_adamw(segmentor, base_lr=4e-5, weight_decay=0.05, layer_decay=0.95, num_blocks=config.depth)
    images = torch.randn(args.batch, 3, args.resolution, args.resolution, device=dist.device)
    labels = torch.randint(0, 150, (args.batch, args.resolution, args.resolution), device=dist.device)

    def step(_: int) -> None:
        model(images, labels)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timing = time_calls(step, device=dist.device, warmup=args.warmup, iters=args.iters)
    train = SegTrainConfig(batch_size=args.batch, parallel=variant)
    plan = plan_training(backbone_cfg, head_cfg, train, world_size=dist.world_size, rank=dist.rank)
    row = {
        "step_s": timing["median_s"],
        "img_s": args.batch / timing["median_s"],
        "peak_gib": peak_memory_gib(dist.device),
        "plan_gib": plan.total / 2**30,
        "setup_s": timing["first_s"],
    }
    return row | {"timing": timing}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--preset", default="internvit-6b-224px")
    p.add_argument("--resolution", type=int, default=504)
    p.add_argument("--batch", type=int, default=2, help="images per process")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", default="finetune.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dist = init_distributed(args.device, process_group=True)  # FSDP2 needs a process group, also on one device
    log = ResultLog(args.out, environment=environment(dist.device), settings=vars(args), world_size=dist.world_size)
    for variant in args.variants:
        log.add(
            {"variant": variant, "res": args.resolution, "batch": args.batch} | guarded(measure, args, variant, dist)
        )
    log.finish()
    if dist.is_main:
        table = [rounded({k: v for k, v in row.items() if k != "timing"}) for row in log.rows]
        print(format_table(table))
    return 1 if any("error" in row for row in log.rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
