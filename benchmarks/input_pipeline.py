"""The input side: can the loaders keep the GPU fed? Classification and segmentation loaders (`--parts cls seg`).

Classification (`cls`):
1. Loader rate: JPEG decode + the classification eval transform (PIL bicubic resize, center crop), in DataLoader
   workers, for several worker counts, with normalisation in the workers ("float", the protocol's transform) or on
   the device ("uint8": workers stop at uint8 tensors, `internvit.data.normalize_images` finishes on the GPU,
   bit-identical).
2. End to end: files on disk -> pooled features [cls, mean(patches)] with the fast backbone (compiled blocks, bf16),
   against the pure forward rate on random tensors at the same batch size, measured in the same run.

Images: an ImageNet val folder (`--data ROOT`, any layout `internvit cls eval` reads), or generated ImageNet-like
JPEGs (500x375, quality 90, textured; about 70 KB each, real IN-1K val averages about 110 KB at about 400x350).

Segmentation (`seg`), the ADE20K pipelines of mmseg (train: ratio resize, cat-max crop 504, flip, photometric
distortion, pad; test: SETR resize, short side 504, to a multiple of 14), two paths in the same run:
- "old": the numpy re-implementation of OpenCV's arithmetic (tests/seg_numpy_reference.py), PIL decoding to RGB,
  int64 labels, float32 normalisation in the worker;
- "new": `internvit.data.seg_transforms` on OpenCV (cv2.imdecode to BGR, the cv2 calls mmcv makes), uint8 out of
  the worker, `normalize_images` on the device: its cost is the "normalize_images" rows (single-threaded on a CPU;
  on a GPU the DataLoader rows also include the copy to the device and the normalisation).
Rows: (a) per core: one process, cv2 and torch at one thread, files -> tensors (JPEG + PNG decoding included);
(b) per core, the pipeline alone on pre-decoded arrays; (c) a DataLoader for each `--seg-workers` count (train
batches of `--seg-batch` as training collates them, test items one at a time as evaluation loads them), timed over
a whole epoch after a warm-up epoch of one batch per worker (persistent workers: start-up reported apart). On a CPU
device the per-core rows also give "new+normalize" (the same core normalising too). `new_over_old` is the new/old
img/s ratio of the same row. Old and new outputs are compared bit for bit on `--seg-check-images` images (decoding,
each pipeline on the same pixels, and the datasets' items from the files) and the result is in the JSON
(`seg_bit_identical`); the run exits with status 1 if a pipeline differs.

Images: an ADEChallengeData2016 folder (`--seg-data ROOT`: training for the train rows, validation for the test
rows) or generated ADE20K-sized data: 683x512 JPEGs (quality 90, textured as the classification ones plus a colour
per labelled region; about 115 KB each) with PNG labels (a background class, 3 to 5 shapes of other classes, a
strip of raw 0), in the ADE20K layout (validation hard-links the training files).

  python benchmarks/input_pipeline.py --out input_pipeline.json                            # on the GPU host
  python benchmarks/input_pipeline.py --device cpu --preset debug --img-size 56 --num-images 64 --batch-size 16 \\
      --workers 0 2 --seg-images 8 --seg-workers 0 2                                          # CPU smoke test
  python benchmarks/input_pipeline.py --device cpu --parts seg --seg-images 128 --seg-workers 0 1 2
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import torch
from _bench import ResultLog, environment, rounded, synchronize, time_calls
from PIL import Image, ImageDraw

from internvit.classification.heads import cls_patch_concat
from internvit.data import build_dataset, build_eval_transform, normalize_images
from internvit.data import seg_transforms as T
from internvit.data.ade20k import ADE20K, LAYOUT_DIR
from internvit.data.imagenet import collate_skip_none
from internvit.data.images import load_image
from internvit.data.segmentation import reduce_labels
from internvit.demo.imagenet import SYNSETS
from internvit.engine.data import init_worker
from internvit.engine.distributed import resolve_device
from internvit.engine.parallelize import optimize_for_inference
from internvit.engine.results import format_table
from internvit.model import build_model, get_config

TABLE = ["stage", "transform", "workers", "batch", "img_s", "img_s_per_worker", "startup_s", "pct_of_forward"]
SEG_TABLE = ["stage", "pipeline", "path", "workers", "batch", "img_s", "img_s_per_worker", "new_over_old", "startup_s"]
SEG_SIZE = (683, 512)  # (width, height): ADE20K's most common image size
SEG_CROP = 504
NUMPY_REFERENCE = Path(__file__).resolve().parent.parent / "tests" / "seg_numpy_reference.py"


# ----------------------------------------------------------------------------------------------- classification


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


def run_classification(args: argparse.Namespace, device: torch.device, log: ResultLog, tmp: Path) -> None:
    root = Path(args.data) if args.data else write_images(tmp / "in1k", args.num_images)
    datasets = {
        kind: build_dataset("in1k", root, transform=build_eval_transform(args.img_size, normalize=kind == "float"))
        for kind in ("float", "uint8")
    }
    if args.data:
        keep = list(range(min(args.num_images, len(datasets["float"]))))
        datasets = {k: torch.utils.data.Subset(d, keep) for k, d in datasets.items()}
    for kind, dataset in datasets.items():
        for workers in args.workers:
            rate = loader_rate(dataset, batch_size=args.batch_size, workers=workers, device=device)
            row = {"part": "cls", "stage": "decode+transform", "transform": kind, "workers": workers}
            log.add(row | {"batch": args.batch_size} | rate | {"img_s_per_worker": rate["img_s"] / max(workers, 1)})
            logging.info("loader %s x%d: %.0f img/s", kind, workers, rate["img_s"])

    config = get_config(args.preset).replace(img_size=args.img_size)
    model = optimize_for_inference(build_model(config, device=device), compile=device.type == "cuda")
    x = [torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device) for _ in range(2)]

    def forward(i: int) -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            cls_patch_concat(model(x[i % 2]))

    timing = time_calls(forward, device=device, warmup=2, iters=args.iters)  # also pays the compilation
    pure = args.batch_size / timing["median_s"]
    log.add({"part": "cls", "stage": "forward only (random tensors)", "batch": args.batch_size, "img_s": pure})
    workers = args.e2e_workers or os.cpu_count() or 1
    for kind, dataset in datasets.items():
        rate = end_to_end(model, dataset, batch_size=args.batch_size, workers=workers, device=device)
        row = {"part": "cls", "stage": "files -> features", "transform": kind, "workers": workers}
        pct = 100 * rate["img_s"] / pure
        log.add(row | {"batch": args.batch_size} | rate | {"pct_of_forward": pct})
        logging.info("end to end %s x%d: %.1f img/s (%.0f%% of forward)", kind, workers, rate["img_s"], pct)


# ----------------------------------------------------------------------------------------------- segmentation


def numpy_reference() -> ModuleType:
    """tests/seg_numpy_reference.py, the numpy pipeline the OpenCV one replaced (kept as a reference, not packaged)."""
    spec = importlib.util.spec_from_file_location("seg_numpy_reference", NUMPY_REFERENCE)
    if spec is None or spec.loader is None or not NUMPY_REFERENCE.is_file():
        raise SystemExit(f"the segmentation benchmark needs {NUMPY_REFERENCE} (run it from a repository checkout)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_ade20k(root: Path, num_images: int, seed: int = 0) -> Path:
    """ADE20K-sized data in the ADEChallengeData2016 layout: 683x512 JPEGs (quality 90), textured as `write_images`
    plus a colour offset per labelled region, and raw 0..150 PNG labels (a background class, 3 to 5 ellipses,
    rectangles or polygons of other classes, a strip of raw 0). images/validation hard-links the training files."""
    rng = np.random.default_rng(seed)
    width, height = SEG_SIZE
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    folder = root / LAYOUT_DIR
    for kind in ("images", "annotations"):
        for split in ("training", "validation"):
            (folder / kind / split).mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        classes = [int(c) for c in rng.choice(np.arange(1, 151), size=6, replace=False)]
        label = Image.new("L", SEG_SIZE, classes[0])
        draw = ImageDraw.Draw(label)
        for cls in classes[1 : 1 + int(rng.integers(3, 6))]:
            w, h = int(rng.integers(width // 6, width // 2)), int(rng.integers(height // 6, height // 2))
            x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            shape = int(rng.integers(3))
            if shape == 2:
                points = [(x + int(rng.integers(0, w)), y + int(rng.integers(0, h))) for _ in range(5)]
                draw.polygon(points, fill=cls)
            else:
                (draw.ellipse if shape == 0 else draw.rectangle)([x, y, x + w, y + h], fill=cls)
        band = int(rng.integers(8, height // 8))
        top = int(rng.integers(0, height - band))
        draw.rectangle([0, top, int(rng.integers(width // 4, width)), top + band], fill=0)
        raw = np.asarray(label)
        tint = rng.uniform(-60, 60, size=(256, 3)).astype(np.float32)
        f = rng.uniform(5, 40, size=3)
        base = np.stack([xx * 0.4 + 60 * np.sin(yy / f[0]), yy * 0.5 + 50 * np.cos(xx / f[1]), (xx + yy) / f[2]], -1)
        noise = rng.standard_normal(base.shape, dtype=np.float32) * 12
        pixels = np.clip(base + rng.uniform(0, 120, 3) + tint[raw] + noise, 0, 255).astype(np.uint8)
        for split, prefix in (("training", "train"), ("validation", "val")):
            image_path = folder / "images" / split / f"ADE_{prefix}_{i + 1:08d}.jpg"
            label_path = folder / "annotations" / split / f"ADE_{prefix}_{i + 1:08d}.png"
            if split == "training":
                Image.fromarray(pixels).save(image_path, quality=90)
                label.save(label_path)
                first = (image_path, label_path)
                continue
            for source, target in zip(first, (image_path, label_path), strict=True):
                try:
                    os.link(source, target)
                except OSError:
                    shutil.copyfile(source, target)
    return folder


def old_reduce_zero_label(raw: np.ndarray) -> np.ndarray:
    """The old loader's label reduction: raw 0 -> 255 (ignored), 1..150 -> 0..149, as int64."""
    label = raw.astype(np.int64) - 1
    label[raw == 0] = T.IGNORE_INDEX
    return label


def label_of(path: str, raw: np.ndarray) -> np.ndarray:
    """The label a path's pipeline gets: int64 for the old one, the dataset's uint8 for the new one."""
    return old_reduce_zero_label(raw) if path == "old" else reduce_labels(raw, True)


class NumpyPathADE20K(ADE20K):
    """The old loading path, as the dataset was before the move to OpenCV: PIL decoding to RGB, int64 labels, the
    numpy pipeline (float32 normalised image out of the worker, int64 label)."""

    def load_raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image = np.array(load_image(self.images[index]))
        return image, self.load_label(index, image.shape[:2])

    def __getitem__(self, index: int) -> dict[str, object]:
        image, raw = self.load_raw(index)
        label = old_reduce_zero_label(raw)
        ori_size = (int(image.shape[0]), int(image.shape[1]))
        image, label = self.pipeline(image, label, index)
        return {
            "img": image.float(),
            "label": label.long(),
            "index": index,
            "ori_size": ori_size,
            "path": str(self.images[index]),
        }


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """cv2 and torch at one thread in this process (as in DataLoader workers), so a per-core rate is one core's."""
    cv2_threads, torch_threads = cv2.getNumThreads(), torch.get_num_threads()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(cv2_threads)
        torch.set_num_threads(torch_threads)


def per_core_rate(fn: Callable[[int], object], count: int) -> dict[str, float]:
    """fn(i) for i in 0..count-1 in this process, after one untimed call (first-call set-up)."""
    fn(0)
    start = time.perf_counter()
    for i in range(count):
        fn(i)
    elapsed = time.perf_counter() - start
    return {"img_s": count / elapsed, "images": count}


class CountSampler(torch.utils.data.Sampler[int]):
    """0..count-1 in order; `count` may change between epochs (a short warm-up epoch, then the timed one)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.count))

    def __len__(self) -> int:
        return self.count


def first_item(batch: list[dict]) -> dict:
    """Collate for batches of one item (segmentation evaluation's loader): the item itself."""
    return batch[0]


def consume(loader, *, device: torch.device, batch_size: int, new: bool) -> int:
    """Every batch of one epoch; on a GPU, copied to the device (and, new path, normalised there as training does)."""
    count = 0
    for batch in loader:
        images = batch["img"][None] if batch_size == 1 else batch["img"]
        count += len(images)
        if device.type == "cuda":
            images = images.to(device, non_blocking=True)
            if new:
                valid = batch.get("valid_size")
                T.normalize_images(images, None if valid is None else valid.reshape(-1, 2))
    synchronize(device)
    return count


def seg_loader_rate(dataset, *, batch_size: int, workers: int, device: torch.device, new: bool) -> dict[str, float]:
    """Images per second over one whole epoch of a DataLoader whose workers are already running: a warm-up epoch of
    one batch per worker first (its time is `startup_s`), then all images, timed from the call to the last batch."""
    sampler = CountSampler(min(len(dataset), max(workers, 1) * batch_size))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        collate_fn=first_item if batch_size == 1 else None,
        worker_init_fn=init_worker if workers else None,
        persistent_workers=workers > 0,
    )
    start = time.perf_counter()
    consume(loader, device=device, batch_size=batch_size, new=new)
    startup = time.perf_counter() - start
    sampler.count = len(dataset)
    start = time.perf_counter()
    count = consume(loader, device=device, batch_size=batch_size, new=new)
    elapsed = time.perf_counter() - start
    del loader  # ends the persistent workers
    return {"img_s": count / elapsed, "startup_s": startup, "images": count}


def normalize_rate(shape: tuple[int, ...], *, device: torch.device, valid: bool) -> dict[str, float]:
    """img/s of `normalize_images` on a uint8 batch already on the device (one thread on a CPU)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).to(device)
    sizes = torch.tensor([[shape[-2] - 40, shape[-1] - 20]] * shape[0]) if valid else None
    timing = time_calls(lambda i: T.normalize_images(images, sizes), device=device, warmup=2, iters=10)
    return {"img_s": shape[0] / timing["median_s"], "images": shape[0]}


def check_bit_identical(pipes: dict, sets: dict, count: int, device: torch.device) -> dict[str, object]:
    """Old against new on `count` images: decoding (cv2 BGR vs PIL RGB), each pipeline on the same (PIL) pixels, and
    the datasets' items from the files; the new images are normalised on `device`."""

    def norm(img: torch.Tensor, valid=None) -> torch.Tensor:
        sizes = None if valid is None else torch.as_tensor(valid).reshape(1, 2)
        return T.normalize_images(img[None].to(device), sizes)[0].cpu()

    same = dict.fromkeys(("decode", "train_pipeline", "test_pipeline", "train_from_files", "test_from_files"), True)
    for i in range(count):
        bgr, raw = sets["new", "train"].load_raw(i)
        rgb, _ = sets["old", "train"].load_raw(i)
        same["decode"] &= bool(np.array_equal(bgr[..., ::-1], rgb))
        label = reduce_labels(raw, True)
        img, lab, valid = pipes["new", "train"](rgb[..., ::-1].copy(), label, i)
        ref_img, ref_lab = pipes["old", "train"](rgb, old_reduce_zero_label(raw), i)
        same["train_pipeline"] &= torch.equal(norm(img, valid), ref_img) and torch.equal(lab.long(), ref_lab)
        img, lab = pipes["new", "test"](rgb[..., ::-1].copy(), label)
        ref_img, ref_lab = pipes["old", "test"](rgb, old_reduce_zero_label(raw))
        same["test_pipeline"] &= torch.equal(norm(img), ref_img) and torch.equal(lab.long(), ref_lab)
        for split in ("train", "test"):
            item, ref = sets["new", split][i], sets["old", split][i]
            img, lab = norm(item["img"], item.get("valid_size")), item["label"].long()
            same[f"{split}_from_files"] &= torch.equal(img, ref["img"]) and torch.equal(lab, ref["label"])
    return {"images": count, "normalized_on": str(device), **same, "all": all(same.values())}


def run_segmentation(args: argparse.Namespace, device: torch.device, log: ResultLog, tmp: Path) -> dict[str, object]:
    R = numpy_reference()
    root = Path(args.seg_data) if args.seg_data else write_ade20k(tmp / "ade20k", args.seg_images)
    splits = {"train": "training", "test": "validation"}
    pipes = {
        ("old", "train"): R.TrainPipeline(SEG_CROP, args.seg_seed),
        ("new", "train"): T.TrainPipeline(SEG_CROP, args.seg_seed),
        ("old", "test"): R.TestPipeline("setr", short=SEG_CROP),
        ("new", "test"): T.TestPipeline("setr", short=SEG_CROP),
    }
    sets = {
        (path, kind): (NumpyPathADE20K if path == "old" else ADE20K)(root, splits[kind], pipeline=pipe)
        for (path, kind), pipe in pipes.items()
    }
    count = min(args.seg_images, *(len(s) for s in sets.values()))
    files = sets["new", "train"].images[:count] + sets["new", "test"].images[:count]
    data = {
        "source": args.seg_data or f"generated {SEG_SIZE[0]}x{SEG_SIZE[1]} JPEGs (quality 90) + PNG labels",
        "images": count,
        "mean_jpeg_kb": float(np.mean([p.stat().st_size for p in files]) / 1e3),
        "opencv": cv2.__version__,
        "numpy": np.__version__,
    }
    log.context["seg_data"] = data
    test_shape = pipes["new", "test"].resize(sets["new", "test"].load_raw(0)[0]).shape[:2]  # the first image's
    rows: dict[tuple, dict] = {}

    def add(row: dict, rate: dict) -> None:
        full = {"part": "seg", **row, **rate}
        if "workers" in row:
            full["img_s_per_worker"] = rate["img_s"] / max(row["workers"], 1)
        old = rows.get((row["stage"], row["pipeline"], "old", row.get("workers")))
        if row["path"] != "old" and old is not None:
            full["new_over_old"] = full["img_s"] / old["img_s"]
        rows[row["stage"], row["pipeline"], row["path"], row.get("workers")] = full
        log.add(full)
        logging.info("seg %s | %s | %s | %s: %.1f img/s", *list(row.values())[:4], full["img_s"])

    with one_thread():
        check = check_bit_identical(pipes, sets, min(args.seg_check_images, count), device)
        log.context["seg_bit_identical"] = check
        logging.info("seg bit-identical old vs new: %s", check)
        normalize = {
            "train": normalize_rate((args.seg_batch, 3, SEG_CROP, SEG_CROP), device=device, valid=True),
            "test": normalize_rate((1, 3, *test_shape), device=device, valid=False),
        }
        for kind in splits:
            for path in ("old", "new"):
                ds, pipe = sets[path, kind], pipes[path, kind]
                base = {"pipeline": kind, "path": path, "workers": 0, "batch": 1}
                add({"stage": "per core: files", **base}, per_core_rate(ds.__getitem__, count))
                arrays = [(img, label_of(path, raw)) for img, raw in map(ds.load_raw, range(count))]  # pre-decoded
                rate = per_core_rate(lambda i, a=arrays, p=pipe: p(*a[i], i), count)
                add({"stage": "per core: arrays", **base}, rate)
                del arrays
            if device.type == "cpu":  # the same core also normalises: the honest per-core figure on a CPU host
                for stage in ("per core: files", "per core: arrays"):
                    alone = rows[stage, kind, "new", 0]["img_s"]
                    rate = {"img_s": 1 / (1 / alone + 1 / normalize[kind]["img_s"]), "images": count}
                    add({"stage": stage, "pipeline": kind, "path": "new+normalize", "workers": 0, "batch": 1}, rate)
            batch = args.seg_batch if kind == "train" else 1
            row = {"stage": f"normalize_images ({device.type})", "pipeline": kind, "path": "new", "batch": batch}
            add(row, normalize[kind])
        for kind in splits:
            batch = args.seg_batch if kind == "train" else 1
            for workers in args.seg_workers:
                for path in ("old", "new"):
                    on = {"batch_size": batch, "workers": workers, "device": device, "new": path == "new"}
                    rate = seg_loader_rate(sets[path, kind], **on)
                    row = {"stage": "DataLoader", "pipeline": kind, "path": path, "workers": workers, "batch": batch}
                    add(row | {"on_device": device.type == "cuda"}, rate)
    return check


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--parts", nargs="+", choices=["cls", "seg"], default=["cls", "seg"], help="what to measure")
    p.add_argument("--preset", default="internvit-6b-224px")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--data", default="", help="an ImageNet root with val/ (default: generate images)")
    p.add_argument("--num-images", type=int, default=6144, help="images to generate (or to use from --data)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", nargs="+", type=int, default=[1, 4, 8, 16], help="loader-rate worker counts")
    p.add_argument("--e2e-workers", type=int, default=0, help="workers for the end-to-end run (0: the host's cores)")
    p.add_argument("--iters", type=int, default=10, help="timed calls of the pure forward")
    p.add_argument("--seg-data", default="", help="an ADEChallengeData2016 root (default: generate images)")
    p.add_argument("--seg-images", type=int, default=128, help="segmentation images per row (generated or used)")
    p.add_argument("--seg-workers", nargs="+", type=int, default=[1, 4, 8, 16], help="segmentation DataLoader workers")
    p.add_argument("--seg-batch", type=int, default=2, help="training batch per process (the recipe's 2)")
    p.add_argument("--seg-check-images", type=int, default=4, help="images compared bit for bit, old against new")
    p.add_argument("--seg-seed", type=int, default=0, help="the training pipelines' seed")
    p.add_argument("--out", default="input_pipeline.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    device = resolve_device(args.device)
    env = environment(device)
    log = ResultLog(args.out, environment=env, args=vars(args))
    check = None
    with tempfile.TemporaryDirectory(prefix="internvit-input-") as tmp:
        if "cls" in args.parts:
            run_classification(args, device, log, Path(tmp))
        if "seg" in args.parts:
            check = run_segmentation(args, device, log, Path(tmp))
    log.finish()
    print(
        f"\n{env['device_name']} ({env['device']}), {env['host_cpus']} host cores, torch {env['torch']}, {env['date']}"
    )
    if "cls" in args.parts:
        print(f"{args.preset} at {args.img_size} px, images: {args.data or 'generated 500x375 JPEGs'}\n")
        rows = [r for r in log.rows if r["part"] == "cls"]
        print(format_table([rounded({c: row.get(c) for c in TABLE}) for row in rows]) + "\n")
    if check is not None:
        data = log.context["seg_data"]
        what = f"{data['images']} images, {data['source']}, mean JPEG {data['mean_jpeg_kb']:.0f} KB"
        print(f"segmentation: {what}; train crop {SEG_CROP}, test setr short {SEG_CROP}; cv2 {cv2.__version__}")
        print(f"old == new bit for bit on {check['images']} images: {check['all']} ({check})\n")
        rows = [r for r in log.rows if r["part"] == "seg"]
        print(format_table([rounded({c: row.get(c) for c in SEG_TABLE}, {"new_over_old": 2}) for row in rows]))
    print(f"\nwrote {args.out}")
    if check is not None and not (check["train_pipeline"] and check["test_pipeline"]):
        logging.error("the OpenCV pipelines differ from the numpy ones on the same pixels")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
