"""Entry points of the segmentation protocols: run_train, run_eval, run_segment (they assemble engine pieces).

Start-up order: everything cheap is checked first (dataset layouts, the few-shot subset, the accumulation, the
resume settings), `config.yaml` is written once those pass, and only then does the backbone load.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import torch

from internvit.atomic import atomic_path, write_json
from internvit.data.images import expand_image_inputs, read_image_bgr
from internvit.data.seg_transforms import TrainPipeline
from internvit.data.segmentation import default_palette, split_hash
from internvit.engine.checkpoint import ShardedBackend, full_state_dict, open_run
from internvit.engine.config import config_from_dict
from internvit.engine.data import TrainBatches
from internvit.engine.distributed import (
    DistInfo,
    agree,
    broadcast_object,
    cleanup_distributed,
    resolve_device,
    save_config,
    start_run,
)
from internvit.engine.loop import LoopSettings, train
from internvit.engine.memory import check_fits
from internvit.engine.optim import build_adamw
from internvit.engine.parallelize import FSDPSettings, broadcast_buffers, gathered, parallelize
from internvit.engine.plots import plot_per_class
from internvit.engine.precision import autocast_dtype, needs_grad_scaler
from internvit.engine.results import log_done, save_results
from internvit.engine.run_folder import claim_run_folder
from internvit.engine.schedule import StepScheduler, poly_lr
from internvit.errors import InternViTError
from internvit.segmentation.build import (
    build_seg_backbone,
    build_segmentor,
    optimize_frozen_backbone,
    plan_training,
)
from internvit.segmentation.checkpoints import (
    load_segmentation_checkpoint,
    load_segmentor_weights,
    save_segmentor,
    with_saved_settings,
)
from internvit.segmentation.config import SegmentationConfig
from internvit.segmentation.data import (
    build_seg_dataset,
    build_val_set,
    dataset_classes,
    test_pipeline,
    with_dataset_classes,
)
from internvit.segmentation.evaluate import device_views, evaluate_segmentor, result_rows
from internvit.segmentation.metrics import PAPER_MIOU
from internvit.segmentation.recipe import (
    LossForward,
    SegmentationRecipe,
    run_signature,
    training_subset,
    write_subset,
)
from internvit.segmentation.segmentor import Segmentor, predict
from internvit.weights.files import checkpoint_identity

log = logging.getLogger(__name__)
COMPILE_MIN_IMAGES = 8  # `segment` compiles (on CUDA) only for this many images: each one is several 504 windows


def _segmentor(cfg: SegmentationConfig, device: torch.device) -> Segmentor:
    """The backbone (loaded, frozen or trainable), the heads around it, the head checkpoint, the fast path."""
    backbone = build_seg_backbone(cfg.backbone, device, seed=cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    segmentor = build_segmentor(backbone, cfg.backbone, cfg.head).to(device)
    segmentor.avg_non_ignore = cfg.head.avg_non_ignore
    segmentor.ignore_index = cfg.data.ignore_index
    if cfg.head.checkpoint:
        load_segmentor_weights(segmentor, cfg.head.checkpoint)
    optimize_frozen_backbone(segmentor, cfg.backbone, device)
    return segmentor


def _report(cfg: SegmentationConfig, acc, out_dir: Path, extra: dict) -> list[dict]:
    names, _ = dataset_classes(cfg.data)
    paper = PAPER_MIOU.get(cfg.setting) if not cfg.data.classes else None  # the paper's rows are ADE20K's
    rows, per_class = result_rows(acc, class_names=names, setting=cfg.setting, paper=paper, extra=extra)
    save_results(rows, out_dir, "eval_results")
    save_results(per_class, out_dir, "eval_per_class")
    plot_per_class(per_class, out_dir / "eval_per_class.png", metric="IoU", title=f"{cfg.setting}: IoU per class")
    log_done("seg eval", f"mIoU {rows[0]['mIoU']} ({cfg.setting})", out_dir)
    return rows


def _classes_metadata(cfg: SegmentationConfig) -> str:
    """The dataset's class names and palette, saved with the weights so `segment` needs no dataset."""
    names, palette = dataset_classes(cfg.data)
    return json.dumps({"names": names, "palette": [list(c) for c in palette]})


def _train_data(cfg: SegmentationConfig, dist: DistInfo, run_dir: Path):
    """The (few-shot) training set, its pipeline and batches, and the accumulation steps (checked, no backbone)."""
    t, d = cfg.train, cfg.data
    per_step = t.batch_size * dist.world_size
    if t.global_batch % per_step:
        raise InternViTError(
            f"train.global_batch={t.global_batch} is not a multiple of batch_size x processes = {per_step}",
            fix="choose train.batch_size to divide train.global_batch",
        )
    subset = (None, None)
    if dist.is_main:
        subset = training_subset(d, run_dir=run_dir)
    split_file, names = broadcast_object(subset)
    pipeline = TrainPipeline(d.crop, t.seed, img_scale=tuple(d.img_scale), ignore_index=d.ignore_index)
    train_set = build_seg_dataset(d, d.train_split, pipeline)
    if names is not None:
        train_set.restrict(names, split_file)
    batches = TrainBatches(
        train_set,
        batch_size=t.batch_size,
        dist=dist,
        seed=t.seed,
        num_workers=d.num_workers,
        # its own generator: creating the iterator must not consume the global stream (a resumed run creates one
        # mid-epoch, where the uninterrupted run did not)
        generator_seed=lambda epoch: t.seed + epoch,
    )
    if batches.per_epoch < 1:
        raise InternViTError(
            f"{len(train_set)} training images are fewer than one batch per process", fix="lower train.batch_size"
        )
    return pipeline, batches, t.global_batch // per_step, (split_file, names)


def _memory_plan(cfg: SegmentationConfig, dist: DistInfo) -> None:
    """Log the memory plan (rank 0); on a GPU, stop here when it does not fit."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
    plan = plan_training(
        cfg.backbone, cfg.head, cfg.train, world_size=dist.world_size, rank=dist.rank, local_world_size=local
    )
    if plan is None:
        log.info("memory plan: set backbone.preset to see it before the backbone loads")
        return
    summary = ", ".join(f"{row['component']} {row['GiB']}" for row in plan.rows())
    log.info("memory plan per GPU (GiB, %s over %d process(es)): %s", cfg.train.parallel, dist.world_size, summary)
    agree(lambda: check_fits(plan, dist.device))


def _recipe(cfg: SegmentationConfig, dist: DistInfo, run_dir: Path, *, pipeline, batches, accum, val_set, hash_):
    """The segmentor, data parallelism, AdamW with layer decay and the poly schedule: the recipe for the loop."""
    t = cfg.train
    segmentor = _segmentor(cfg, dist.device)
    sharded = t.parallel == "fsdp"
    fsdp = FSDPSettings(
        root=segmentor,
        param_dtype=autocast_dtype(cfg.backbone.precision),
        root_methods=("loss",),
        hybrid=t.hybrid_shard,
        cpu_offload=t.cpu_offload,
    )
    model = parallelize(
        LossForward(segmentor),
        dist=dist,
        backbone=None if cfg.backbone.frozen else segmentor.backbone,
        activation_checkpointing=cfg.backbone.grad_checkpointing,
        compile=cfg.backbone.compile is True,  # a trained backbone compiles only when asked to
        fsdp=fsdp if sharded else None,
    )
    optimizer = build_adamw(
        segmentor,
        base_lr=t.lr,
        weight_decay=t.weight_decay,
        layer_decay=t.layer_decay,
        num_blocks=len(segmentor.backbone.blocks),
        quirk_decay_pos_embed=t.decay_pos_embed,
    )
    schedule = functools.partial(poly_lr, base_lr=t.lr, total_steps=t.iters, warmup_steps=t.warmup_iters)
    log.info(
        "global batch %d = %d per process x %d process(es) x %d accumulation step(s); lr %g",
        *(t.global_batch, t.batch_size, dist.world_size, accum, t.lr),
    )

    def evaluate() -> dict:
        if sharded:
            broadcast_buffers(segmentor)  # every rank scores with, and exports, rank 0's BatchNorm statistics
        with gathered(segmentor):  # sharded: parameters gathered once, as ranks score different numbers of windows
            acc = _evaluate(cfg, segmentor, val_set, dist)
        return acc.summary()

    classes = _classes_metadata(cfg)

    def save(names: list[str], done: int) -> None:
        state = full_state_dict(segmentor, sharded)  # sharded: a collective, gathered into rank 0's host memory
        if dist.is_main:
            for name in names:
                extra = {"iter": done, "classes": classes}
                save_segmentor(segmentor, cfg, run_dir / f"{name}.safetensors", extra=extra, state=state)

    return SegmentationRecipe(
        segmentor=segmentor,
        model=model,
        optimizer=optimizer,
        scheduler=StepScheduler(optimizer, schedule, lag_one_step=False),  # mmcv: f(t) before iter t
        batches=batches,
        pipeline_epoch=pipeline.set_epoch,
        accum=accum,
        seed=t.seed,
        backbone_frozen=cfg.backbone.frozen,
        total_steps=t.iters,
        log_every=t.log_every,
        evaluate=evaluate,
        save=save,
        split_hash=hash_,
        dist=dist,
    )


def _evaluate(cfg: SegmentationConfig, segmentor: Segmentor, val_set, dist: DistInfo):
    return evaluate_segmentor(
        segmentor,
        val_set,
        settings=cfg.eval,
        num_classes=cfg.head.num_classes,
        dist=dist,
        num_workers=cfg.data.num_workers,
    )


def run_train(cfg: SegmentationConfig) -> dict:
    """Train with the paper's recipe (iterations, AdamW + layer decay, poly), evaluating and keeping the best."""
    cfg = with_dataset_classes(cfg)
    t = cfg.train
    dist, run_dir = start_run(cfg.output_dir, cfg.device, process_group=t.parallel == "fsdp")
    try:
        claim_run_folder(run_dir, dist)
        pipeline, batches, accum, (split_file, names) = _train_data(cfg, dist, run_dir)
        hash_ = split_hash(names) if names is not None else None
        val_set = build_val_set(cfg.data, cfg.eval)
        signature = run_signature(
            train=t,
            head=cfg.head,
            backbone=cfg.backbone,
            data=cfg.data,
            # sharded checkpoints reshard: an FSDP run resumes on any number of processes
            world_size=dist.world_size if t.parallel == "ddp" else None,
            split_hash=hash_,
            backbone_identity=checkpoint_identity(cfg.backbone.checkpoint),
        )
        _memory_plan(cfg, dist)
        backend = ShardedBackend(run_dir) if t.parallel == "fsdp" else None
        checkpointer, resume = open_run(cfg, run_dir=run_dir, dist=dist, signature=signature, backend=backend)
        if dist.is_main:
            write_subset(split_file, names, reused=bool(cfg.data.split_file))
        recipe = _recipe(
            cfg, dist, run_dir, pipeline=pipeline, batches=batches, accum=accum, val_set=val_set, hash_=hash_
        )
        settings = LoopSettings(
            total_steps=t.iters,
            accum_steps=accum,
            eval_every=t.eval_every,
            save_every=t.save_every,
            grad_scaler=needs_grad_scaler(cfg.backbone.precision) and not cfg.backbone.frozen,
            tensorboard=cfg.tensorboard,
        )
        history = train(recipe, settings=settings, checkpointer=checkpointer, resume=resume)
        if dist.is_main:
            save_results(history, run_dir, "train_history")
            best = recipe.best or {}
            log_done(
                "seg train", f"best mIoU {best.get('mIoU')} at iter {best.get('iter')} (best.safetensors)", run_dir
            )
        return {"history": history, "best": recipe.best if dist.is_main else None, "split_hash": hash_}
    finally:
        cleanup_distributed()


def run_eval(cfg: SegmentationConfig) -> list[dict]:
    """Slide-window evaluation on the validation split (every image once across ranks): mIoU, mAcc, aAcc, per class.

    The settings go to `output_dir/eval_config.yaml` (a training run's config.yaml in that folder stays as it is)."""
    cfg = with_dataset_classes(with_saved_settings(cfg))
    dist, run_dir = start_run(cfg.output_dir, cfg.device)
    try:
        val_set = build_val_set(cfg.data, cfg.eval)
        save_config(cfg, run_dir, dist, name="eval_config.yaml")
        segmentor = _segmentor(cfg, dist.device)
        acc = _evaluate(cfg, segmentor, val_set, dist)
        extra = {"checkpoint": cfg.head.checkpoint, "scales": list(cfg.eval.scales), "flip": cfg.eval.flip}
        return _report(cfg, acc, run_dir, extra) if dist.is_main else []
    finally:
        cleanup_distributed()


def output_stems(paths: list[Path]) -> list[str]:
    """One output name per input: the file stem, numbered (`name-2`, ...) where several inputs share it."""
    counts: dict[str, int] = {}
    stems = []
    for path in paths:
        counts[path.stem] = counts.get(path.stem, 0) + 1
        stems.append(path.stem if counts[path.stem] == 1 else f"{path.stem}-{counts[path.stem]}")
    return stems


def _write_png(path: Path, image: np.ndarray) -> None:
    """A (BGR or single-channel) PNG, written atomically."""
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise InternViTError(f"cannot encode {path} as PNG", fix="report this: the array is not an image")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.tobytes())


def legend_image(rows: list[dict], palette: np.ndarray, width: int = 360, row_height: int = 22) -> np.ndarray:
    """A BGR legend: one row per class present (colour swatch, name, share of the pixels), largest first."""
    legend = np.full((row_height * max(1, len(rows)) + 8, width, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        top = 4 + i * row_height
        colour = tuple(int(c) for c in palette[row["index"]][::-1])
        cv2.rectangle(legend, (6, top + 3), (26, top + row_height - 3), colour, thickness=-1)
        cv2.rectangle(legend, (6, top + 3), (26, top + row_height - 3), (0, 0, 0), thickness=1)
        text = f"{row['class']}  {100 * row['share']:.1f}%"
        cv2.putText(legend, text, (34, top + row_height - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return legend


def _segment_classes(cfg: SegmentationConfig, metadata: dict) -> tuple[list[str], np.ndarray]:
    """Class names and RGB palette for `segment`: saved with the weights, else the settings' dataset, else numbers."""
    if "classes" in metadata:
        saved = json.loads(metadata["classes"])
        names, palette = saved["names"], saved["palette"]
    elif not cfg.data.classes or Path(cfg.data.classes).is_file():
        names, palette = dataset_classes(cfg.data)
    else:
        names, palette = [str(i) for i in range(cfg.head.num_classes)], default_palette(cfg.head.num_classes)
    return list(names), np.asarray(palette, dtype=np.uint8).reshape(-1, 3)


@torch.no_grad()
def run_segment(
    images: list[str], *, checkpoint: str, backbone: str | None = None, out_dir: str = "segment", device: str = "auto"
) -> list[dict]:
    """For each image (files or folders): colour mask, overlay, label-index PNG (class id per pixel), legend PNG and
    the classes present with their pixel share, from a saved segmentor. Unreadable images are reported in the
    results (`error`) and the others still processed."""
    paths = expand_image_inputs(images)
    _, report = load_segmentation_checkpoint(checkpoint)
    if "config" not in report.metadata:
        raise InternViTError(
            f"{checkpoint} carries no run settings", fix="pass a best.safetensors written by seg train"
        )
    saved = json.loads(report.metadata["config"])
    saved["device"] = device  # the training machine's device need not exist here
    cfg = config_from_dict(SegmentationConfig, saved)
    dev = resolve_device(device)
    compile = cfg.backbone.compile
    if compile is None:  # compiling pays back its cost only over many images
        compile = dev.type == "cuda" and len(paths) >= COMPILE_MIN_IMAGES
    backbone_cfg = dataclasses.replace(cfg.backbone, checkpoint=backbone or cfg.backbone.checkpoint, compile=compile)
    cfg = dataclasses.replace(cfg, backbone=backbone_cfg, head=dataclasses.replace(cfg.head, checkpoint=checkpoint))
    names, palette = _segment_classes(cfg, report.metadata)
    segmentor = _segmentor(cfg, dev)
    segmentor.eval()
    pipeline = test_pipeline(cfg.data, cfg.eval)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for path, stem in zip(paths, output_stems(paths), strict=True):
        try:
            bgr = read_image_bgr(path)  # EXIF orientation applied, as mmcv's loader
        except InternViTError as e:
            log.error("%s", e.message)
            results.append({"image": str(path), "error": e.message})
            continue
        views, _ = pipeline(bgr, np.zeros(bgr.shape[:2], dtype=np.uint8))
        pred = predict(
            segmentor,
            device_views(views, dev),
            bgr.shape[:2],
            num_classes=cfg.head.num_classes,
            crop=cfg.eval.crop,
            stride=cfg.eval.stride,
            flip=cfg.eval.flip,
        )
        pred = pred.cpu().numpy()
        ids, counts = np.unique(pred, return_counts=True)
        present = [
            {"class": names[i], "index": int(i), "share": round(c / pred.size, 4), "colour": palette[i].tolist()}
            for i, c in sorted(zip(ids.tolist(), counts.tolist(), strict=True), key=lambda t: -t[1])
        ]
        mask_rgb = palette[pred]
        files = {kind: out / f"{stem}_{kind}.png" for kind in ("mask", "overlay", "labels", "legend")}
        _write_png(files["mask"], mask_rgb[..., ::-1])
        _write_png(files["overlay"], (0.5 * bgr + 0.5 * mask_rgb[..., ::-1]).astype(np.uint8))
        _write_png(files["labels"], pred.astype(np.uint8 if cfg.head.num_classes <= 256 else np.uint16))
        _write_png(files["legend"], legend_image(present, palette))
        results.append({"image": str(path), **{k: str(v) for k, v in files.items()}, "classes": present})
    write_json(out / "segment_results.json", results)
    return results
