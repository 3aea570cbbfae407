"""Entry points of the ADE20K protocols: run_train, run_eval, run_segment (they assemble engine pieces).

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

import numpy as np
import torch
from PIL import Image

from internvit.data import load_image
from internvit.data.ade20k import ADE20K, ADE20K_CLASS_NAMES, ADE20K_PALETTE, split_hash
from internvit.data.images import check_image_paths
from internvit.data.seg_transforms import TestPipeline, TrainPipeline
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
from internvit.engine.precision import autocast_dtype, needs_grad_scaler
from internvit.engine.results import save_results
from internvit.engine.run_folder import claim_run_folder
from internvit.engine.schedule import StepScheduler, poly_lr
from internvit.errors import InternViTError
from internvit.segmentation.build import (
    build_seg_backbone,
    build_segmentor,
    optimize_frozen_backbone,
    plan_training,
)
from internvit.segmentation.checkpoints import load_segmentation_checkpoint, load_segmentor_weights, save_segmentor
from internvit.segmentation.config import SegmentationConfig
from internvit.segmentation.evaluate import build_val_set, evaluate_segmentor, result_rows
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
    if cfg.head.checkpoint:
        load_segmentor_weights(segmentor, cfg.head.checkpoint)
    optimize_frozen_backbone(segmentor, cfg.backbone, device)
    return segmentor


def _report(cfg: SegmentationConfig, acc, run_dir: Path, extra: dict) -> list[dict]:
    rows, per_class = result_rows(acc, setting=cfg.setting, paper=PAPER_MIOU.get(cfg.setting), extra=extra)
    save_results(rows, run_dir, "eval_results")
    save_results(per_class, run_dir, "eval_per_class")
    return rows


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
        subset = training_subset(
            d.root, fewshot=d.fewshot, fewshot_seed=d.fewshot_seed, split_file=d.split_file, run_dir=run_dir
        )
    split_file, names = broadcast_object(subset)
    pipeline = TrainPipeline(d.crop, t.seed, img_scale=tuple(d.img_scale))
    train_set = ADE20K(d.root, "training", pipeline=pipeline)
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
            acc = evaluate_segmentor(segmentor, val_set, settings=cfg.eval, num_classes=cfg.head.num_classes, dist=dist)
        return acc.summary()

    def save(names: list[str], done: int) -> None:
        state = full_state_dict(segmentor, sharded)  # sharded: a collective, gathered into rank 0's host memory
        if dist.is_main:
            for name in names:
                save_segmentor(segmentor, cfg, run_dir / f"{name}.safetensors", extra={"iter": done}, state=state)

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


def run_train(cfg: SegmentationConfig) -> dict:
    """Train with the paper's recipe (iterations, AdamW + layer decay, poly), evaluating and keeping the best."""
    t = cfg.train
    dist, run_dir = start_run(cfg.output_dir, cfg.device, process_group=t.parallel == "fsdp")
    try:
        claim_run_folder(run_dir, dist)
        pipeline, batches, accum, (split_file, names) = _train_data(cfg, dist, run_dir)
        hash_ = split_hash(names) if names is not None else None
        val_set = build_val_set(cfg.data)
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
        )
        history = train(recipe, settings=settings, checkpointer=checkpointer, resume=resume)
        if dist.is_main:
            save_results(history, run_dir, "train_history")
            log.info("best: %s; weights in %s", recipe.best, run_dir)
        return {"history": history, "best": recipe.best if dist.is_main else None, "split_hash": hash_}
    finally:
        cleanup_distributed()


def run_eval(cfg: SegmentationConfig) -> list[dict]:
    """Slide-window evaluation on ADE20K val (every image once across ranks): mIoU, mAcc, aAcc, per-class table."""
    dist, run_dir = start_run(cfg.output_dir, cfg.device)
    try:
        val_set = build_val_set(cfg.data)
        save_config(cfg, run_dir, dist)
        segmentor = _segmentor(cfg, dist.device)
        acc = evaluate_segmentor(segmentor, val_set, settings=cfg.eval, num_classes=cfg.head.num_classes, dist=dist)
        return _report(cfg, acc, run_dir, {"checkpoint": cfg.head.checkpoint}) if dist.is_main else []
    finally:
        cleanup_distributed()


def colorize(pred: np.ndarray) -> np.ndarray:
    palette = np.asarray(ADE20K_PALETTE, dtype=np.uint8)
    return palette[pred % len(palette)]


@torch.no_grad()
def run_segment(
    images: list[str], *, checkpoint: str, backbone: str | None = None, out_dir: str = "segment", device: str = "auto"
) -> list[dict]:
    """Colour mask PNG, overlay PNG and the classes present (pixel share) for each image, from a saved segmentor."""
    check_image_paths(images)
    _, report = load_segmentation_checkpoint(checkpoint)
    if "config" not in report.metadata:
        raise InternViTError(
            f"{checkpoint} carries no run settings", fix="pass a best.safetensors written by seg train"
        )
    cfg = config_from_dict(SegmentationConfig, json.loads(report.metadata["config"]))
    dev = resolve_device(device)
    compile = cfg.backbone.compile
    if compile is None:  # compiling pays back its cost only over many images
        compile = dev.type == "cuda" and len(images) >= COMPILE_MIN_IMAGES
    backbone_cfg = dataclasses.replace(cfg.backbone, checkpoint=backbone or cfg.backbone.checkpoint, compile=compile)
    cfg = dataclasses.replace(cfg, backbone=backbone_cfg, head=dataclasses.replace(cfg.head, checkpoint=checkpoint))
    segmentor = _segmentor(cfg, dev)
    segmentor.eval()
    pipeline = TestPipeline(cfg.data.test_resize, short=cfg.data.test_short, scale=tuple(cfg.data.img_scale))
    names = ADE20K_CLASS_NAMES if cfg.head.num_classes == len(ADE20K_CLASS_NAMES) else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for path in images:
        rgb = np.asarray(load_image(path))
        img, _ = pipeline(rgb, np.zeros(rgb.shape[:2], dtype=np.int64))
        pred = (
            predict(
                segmentor,
                img.unsqueeze(0).to(dev),
                rgb.shape[:2],
                num_classes=cfg.head.num_classes,
                crop=cfg.eval.crop,
                stride=cfg.eval.stride,
            )
            .cpu()
            .numpy()
        )
        mask = colorize(pred)
        stem = Path(path).stem
        Image.fromarray(mask).save(out / f"{stem}_mask.png")
        Image.fromarray((0.5 * rgb + 0.5 * mask).astype(np.uint8)).save(out / f"{stem}_overlay.png")
        ids, counts = np.unique(pred, return_counts=True)
        present = sorted(zip(ids.tolist(), counts.tolist(), strict=True), key=lambda t: -t[1])
        results.append(
            {
                "image": str(path),
                "mask": str(out / f"{stem}_mask.png"),
                "overlay": str(out / f"{stem}_overlay.png"),
                "classes": [
                    {"class": names[i] if names else str(i), "index": i, "share": round(c / pred.size, 4)}
                    for i, c in present
                ],
            }
        )
    return results
