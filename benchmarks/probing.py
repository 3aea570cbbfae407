"""Paper mode against fast mode on the same data and backbone, in one run.

Rows: `cls train` (the paper's recipe: the backbone runs for every image of every epoch), then `cls extract` (once
per image) + `cls sweep` (a grid of heads on the cache) + `cls knn`, each with its wall time and backbone forwards;
and the pure forward rate of the same backbone on random tensors at the extraction batch size, beside the
extraction's end-to-end rate (files -> features on disk), so the loader's share shows.

  python benchmarks/probing.py --preset internvit-6b-224px --data /data/imagenet-1k --out probing.json   # a GPU host
  python benchmarks/probing.py --device cpu --preset debug --img-size 56 --out probing.json           # CPU smoke
Without --data, a generated mini ImageNet family (240 training and 60 validation images of 10 classes) is used.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from _bench import ResultLog, environment, rounded, synchronize, time_calls

from internvit.classification.build import build_backbone
from internvit.classification.config import ClassificationConfig
from internvit.classification.features import backbone_features
from internvit.classification.probing import run_extract, run_knn
from internvit.classification.run import run_train
from internvit.classification.sweep import run_sweep
from internvit.demo.imagenet import make_mini_imagenet
from internvit.engine.config import load_config
from internvit.engine.distributed import resolve_device
from internvit.engine.results import format_table

TABLE = ["stage", "wall_s", "backbone_forwards", "img_s", "heads", "note"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--preset", default="debug", help="backbone preset, random weights (default: debug)")
    p.add_argument("--checkpoint", default="random", help="backbone checkpoint (default: random init of --preset)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--data", help="an ImageNet root (train/, val/); default: a generated mini ImageNet")
    p.add_argument("--epochs", type=int, default=10, help="epochs of the paper mode and of the sweep")
    p.add_argument("--batch", type=int, default=64, help="extraction / evaluation batch")
    p.add_argument("--precision", default=None, help="backbone precision (default: bf16 on GPUs, fp32 on CPUs)")
    p.add_argument("--work", help="folder for the runs (default: a temporary one)")
    p.add_argument("--out", default="probing.json")
    return p.parse_args(argv)


def settings(args, data: Path, work: Path, num_classes: int, precision: str) -> list[str]:
    train_batch = 32 if not args.data else 128
    return [
        f"backbone.checkpoint={args.checkpoint}",
        f"backbone.preset={args.preset}",
        f"backbone.img_size={args.img_size}",
        f"backbone.precision={precision}",
        f"head.num_classes={num_classes}",
        f"data.imagenet={data}",
        f"train.epochs={args.epochs}",
        f"train.batch_size={train_batch}",
        f"train.global_batch={train_batch}",
        "train.eval_every=1000",  # the paper mode's cost without its per-epoch evaluations
        f"eval.batch_size={args.batch}",
        f"features.out={work / 'features'}",
        "features.sets=[train,in1k]",
        f"sweep.epochs={args.epochs}",
        f"sweep.batch_size={train_batch}",
        "sweep.variants=[cls,cls_mean,cls4,cls4_mean]",
        "sweep.batchnorm=[true]",  # 13 lrs x 4 variants = 52 heads
        f"sweep.holdout={20 if not args.data else 10000}",
        "knn.k=[10,20]",
    ]


def timed(fn, *a):
    start = time.perf_counter()
    out = fn(*a)
    return out, time.perf_counter() - start


def pure_forward_rate(args, device: torch.device, precision: str) -> float:
    """Images per second of the extraction's backbone call on random tensors (no loader, no disk)."""
    backbone, _ = build_backbone(
        args.checkpoint, preset=args.preset, img_size=args.img_size, device=device, precision=precision
    )
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    timing = time_calls(lambda i: backbone_features(backbone, x, precision), device=device, warmup=2, iters=5)
    synchronize(device)
    return args.batch / timing["median_s"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = resolve_device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    log = ResultLog(args.out, environment=environment(device), settings=vars(args))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        data = Path(args.data) if args.data else make_mini_imagenet(work / "data")["in1k"]
        num_classes = sum(1 for p in (data / "train").iterdir() if p.is_dir())
        base = settings(args, data, work, num_classes, precision) + [f"device={device.type}"]

        def cfg(out: str) -> ClassificationConfig:
            return load_config(ClassificationConfig, None, [*base, f"output_dir={work / out}"])

        _, paper_s = timed(run_train, cfg("paper"))
        train_images = int(json.loads((work / "paper" / "train_history.json").read_text())[0]["train_images"])
        paper_forwards = train_images * args.epochs
        log.add(
            {
                "stage": "paper mode: cls train",
                "wall_s": paper_s,
                "backbone_forwards": paper_forwards,
                "img_s": paper_forwards / paper_s,
                "heads": 1,
                "note": f"{args.epochs} epochs x {train_images}",
            }
        )
        rows, extract_s = timed(run_extract, cfg("extract"))
        forwards = sum(r["backbone_forwards"] for r in rows)
        images = sum(r["images"] for r in rows)
        log.add(
            {
                "stage": "fast: cls extract",
                "wall_s": extract_s,
                "backbone_forwards": forwards,
                "img_s": images / extract_s,
                "heads": None,
                "note": "train + in1k val, once per image",
            }
        )
        out, sweep_s = timed(run_sweep, cfg("sweep"))
        log.add(
            {
                "stage": "fast: cls sweep",
                "wall_s": sweep_s,
                "backbone_forwards": 0,
                "img_s": None,
                "heads": len(out["grid"]),
                "note": f"{args.epochs} epochs on the cache",
            }
        )
        _, knn_s = timed(run_knn, cfg("knn"))
        log.add(
            {
                "stage": "fast: cls knn",
                "wall_s": knn_s,
                "backbone_forwards": 0,
                "img_s": None,
                "heads": None,
                "note": "k = 10, 20",
            }
        )
        forward_rate = pure_forward_rate(args, device, precision)
        log.add(
            {
                "stage": "pure forward (random tensors)",
                "wall_s": None,
                "backbone_forwards": None,
                "img_s": forward_rate,
                "heads": None,
                "note": f"batch {args.batch}",
            }
        )
        fast_s = extract_s + sweep_s + knn_s
        log.context["summary"] = {
            "paper_over_fast_wall": paper_s / fast_s,
            "sweep_knn_share_of_extract": (sweep_s + knn_s) / extract_s,
            "extract_rate_share_of_forward": images / extract_s / forward_rate,
            "forwards_paper": paper_forwards,
            "forwards_fast": forwards,
        }
        log.finish()
    print(format_table([rounded({k: row.get(k) for k in TABLE}) for row in log.rows]))
    print(format_table([rounded(log.context["summary"])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
