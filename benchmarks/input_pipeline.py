"""The input side of feature extraction: can the loaders keep the GPU fed?

1. Loader rate: JPEG decode + the classification eval transform (PIL bicubic resize, center crop), in DataLoader
   workers, for several worker counts, with normalisation in the workers ("float", the protocol's transform) or on
   the device ("uint8": workers stop at uint8 tensors, `internvit.data.normalize_images` finishes on the GPU,
   bit-identical).
2. End to end: files on disk -> pooled features [cls, mean(patches)] with the fast backbone (compiled blocks, bf16),
   against the pure forward rate on random tensors at the same batch size, measured in the same run.

Images: an ImageNet val folder (`--data ROOT`, any layout `internvit cls eval` reads), or generated ImageNet-like
JPEGs (500x375, quality 90, textured; about 70 KB each, real IN-1K val averages about 110 KB at about 400x350).

  python benchmarks/input_pipeline.py --out input_pipeline.json                            # on the GPU host
  python benchmarks/input_pipeline.py --device cpu --preset debug --img-size 56 --num-images 64 --batch-size 16 \\
      --workers 0 2                                                                            # CPU smoke test
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _bench import ResultLog, environment, rounded, synchronize, time_calls
from PIL import Image

from internvit.classification.heads import cls_patch_concat
from internvit.data import build_dataset, build_eval_transform, normalize_images
from internvit.data.imagenet import collate_skip_none
from internvit.demo.imagenet import SYNSETS
from internvit.engine.distributed import resolve_device
from internvit.engine.parallelize import optimize_for_inference
from internvit.engine.results import format_table
from internvit.model import build_model, get_config

TABLE = ["stage", "transform", "workers", "batch", "img_s", "img_s_per_worker", "startup_s", "pct_of_forward"]


def write_images(root: Path, num_images: int, seed: int = 0) -> Path:
    """ImageNet-like val JPEGs in class folders (val/<wnid>/*.JPEG): smooth colour fields plus sensor-like noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    for i in range(num_images):
        folder = root / "val" / SYNSETS[i % len(SYNSETS)][0]
        folder.mkdir(parents=True, exist_ok=True)
        f = rng.uniform(5, 40, size=3)
        base = np.stack([xx * 0.4 + 60 * np.sin(yy / f[0]), yy * 0.5 + 50 * np.cos(xx / f[1]), (xx + yy) / f[2]], -1)
        pixels = np.clip(base + rng.uniform(0, 120, 3) + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"ILSVRC2012_val_{i + 1:08d}.JPEG", quality=90)
    return root


def build_loader(dataset, *, batch_size: int, workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=True,  # one batch shape: no recompilation for a ragged last batch
        collate_fn=collate_skip_none,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )


def loader_rate(dataset, *, batch_size: int, workers: int, device: torch.device) -> dict[str, float]:
    """Images per second through the loader alone, timed from the first batch (worker start-up reported apart)."""
    start = time.perf_counter()
    loader = iter(build_loader(dataset, batch_size=batch_size, workers=workers, device=device))
    next(loader)
    first = time.perf_counter()
    count = sum(len(batch[1]) for batch in loader)
    elapsed = time.perf_counter() - first
    return {"img_s": count / elapsed if count else float("nan"), "startup_s": first - start, "images": count}


def to_model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return normalize_images(images) if images.dtype == torch.uint8 else images


def end_to_end(model, dataset, *, batch_size: int, workers: int, device: torch.device) -> dict[str, float]:
    """Files -> pooled features kept on the device (no per-batch sync), timed from the first batch to the last."""
    start = time.perf_counter()
    loader = iter(build_loader(dataset, batch_size=batch_size, workers=workers, device=device))
    batch = next(loader)
    first = time.perf_counter()
    features = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
        while batch is not None:
            features.append(cls_patch_concat(model(to_model_input(batch[0], device))))
            batch = next(loader, None)
        synchronize(device)
    elapsed = time.perf_counter() - first
    count = sum(len(f) for f in features)
    return {"img_s": count / elapsed, "startup_s": first - start, "images": count}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--preset", default="internvit-6b-224px")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--data", default="", help="an ImageNet root with val/ (default: generate images)")
    p.add_argument("--num-images", type=int, default=6144, help="images to generate (or to use from --data)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", nargs="+", type=int, default=[1, 4, 8, 16], help="loader-rate worker counts")
    p.add_argument("--e2e-workers", type=int, default=0, help="workers for the end-to-end run (0: the host's cores)")
    p.add_argument("--iters", type=int, default=10, help="timed calls of the pure forward")
    p.add_argument("--out", default="input_pipeline.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    device = resolve_device(args.device)
    env = environment(device)
    with tempfile.TemporaryDirectory(prefix="internvit-input-") as tmp:
        root = Path(args.data) if args.data else write_images(Path(tmp), args.num_images)
        datasets = {
            kind: build_dataset("in1k", root, transform=build_eval_transform(args.img_size, normalize=kind == "float"))
            for kind in ("float", "uint8")
        }
        if args.data:
            keep = list(range(min(args.num_images, len(datasets["float"]))))
            datasets = {k: torch.utils.data.Subset(d, keep) for k, d in datasets.items()}
        log = ResultLog(args.out, environment=env, args=vars(args))
        rows = log.rows
        for kind, dataset in datasets.items():
            for workers in args.workers:
                rate = loader_rate(dataset, batch_size=args.batch_size, workers=workers, device=device)
                row = {"stage": "decode+transform", "transform": kind, "workers": workers, "batch": args.batch_size}
                log.add(row | rate | {"img_s_per_worker": rate["img_s"] / max(workers, 1)})
                logging.info("loader %s x%d: %.0f img/s", kind, workers, rate["img_s"])

        config = get_config(args.preset).replace(img_size=args.img_size)
        model = optimize_for_inference(build_model(config, device=device), compile=device.type == "cuda")
        x = [torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device) for _ in range(2)]

        def forward(i: int) -> None:
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
                cls_patch_concat(model(x[i % 2]))

        timing = time_calls(forward, device=device, warmup=2, iters=args.iters)  # also pays the compilation
        pure = args.batch_size / timing["median_s"]
        log.add({"stage": "forward only (random tensors)", "batch": args.batch_size, "img_s": pure})
        workers = args.e2e_workers or os.cpu_count() or 1
        for kind, dataset in datasets.items():
            rate = end_to_end(model, dataset, batch_size=args.batch_size, workers=workers, device=device)
            row = {"stage": "files -> features", "transform": kind, "workers": workers, "batch": args.batch_size}
            log.add(row | rate | {"pct_of_forward": 100 * rate["img_s"] / pure})
            logging.info(
                "end to end %s x%d: %.1f img/s (%.0f%% of forward)",
                kind,
                workers,
                rate["img_s"],
                rows[-1]["pct_of_forward"],
            )
    log.finish()
    print(
        f"\n{env['device_name']} ({env['device']}), {env['host_cpus']} host cores, torch {env['torch']}, {env['date']}"
    )
    print(f"{args.preset} at {args.img_size} px, images: {args.data or 'generated 500x375 JPEGs'}\n")
    print(format_table([rounded({c: row.get(c) for c in TABLE}) for row in rows]))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
