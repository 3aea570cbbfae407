"""Entry points of the ADE20K protocols: run_train, run_eval, run_segment (they assemble engine pieces)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from internvit.data import load_image
from internvit.data.ade20k import ADE20K_CLASS_NAMES, ADE20K_PALETTE
from internvit.data.seg_transforms import TestPipeline
from internvit.engine.config import to_dict
from internvit.engine.distributed import cleanup_distributed, resolve_device, start_run
from internvit.engine.results import save_results
from internvit.errors import InternViTError
from internvit.segmentation.build import (
    build_seg_backbone,
    build_segmentor,
    optimize_frozen_backbone,
    trainable_state,
)
from internvit.segmentation.checkpoints import save_segmentation_checkpoint, split_segmentor_state
from internvit.segmentation.config import SegmentationConfig
from internvit.segmentation.evaluate import build_val_set, evaluate_segmentor, result_rows
from internvit.segmentation.metrics import PAPER_MIOU
from internvit.segmentation.segmentor import Segmentor, predict

log = logging.getLogger(__name__)
COMPILE_MIN_IMAGES = 8  # `segment` compiles (on CUDA) only for this many images: each one is several 504 windows


def save_segmentor(segmentor: Segmentor, cfg: SegmentationConfig, path: Path, extra: dict | None = None) -> None:
    """Trainable weights (mmseg key layout) plus the run's settings in the metadata, so `segment` can rebuild it."""
    state = trainable_state(segmentor, cfg.backbone.frozen)
    # mmseg keeps the FPN adapter inside the backbone (backbone.up1.*): save in that layout, as the released files
    parts = split_segmentor_state({("backbone." + k[4:] if k.startswith("fpn.") else k): v for k, v in state.items()})
    meta = {"config": json.dumps(to_dict(cfg)), **{k: str(v) for k, v in (extra or {}).items()}}
    save_segmentation_checkpoint(parts, path, metadata=meta)


def load_segmentor_weights(segmentor: Segmentor, source: str) -> None:
    """Load a released mmseg checkpoint or one of ours: heads, FPN and (when present) the fine-tuned backbone."""
    from internvit.segmentation.checkpoints import join_segmentor_state, load_segmentation_checkpoint

    parts, report = load_segmentation_checkpoint(source)
    fpn = {f"fpn.{k}": v for k, v in parts.pop("fpn", {}).items()}  # mmseg keeps the adapter under backbone.up*
    state = join_segmentor_state(parts) | fpn
    own = segmentor.state_dict()
    missing = [k for k in own if k not in state and not k.startswith("backbone.")]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise InternViTError(
            f"{source} does not fit this segmentor: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"mismatched {mismatched[:3]}",
            fix="use the head / fpn / out_indices settings the checkpoint was trained with",
        )
    segmentor.load_state_dict(state, strict=False)
    log.info("loaded %d tensors from %s", len(state), source)


def _start(cfg: SegmentationConfig):
    dist, run_dir = start_run(cfg, cfg.output_dir, cfg.device)
    backbone = build_seg_backbone(cfg.backbone, dist.device, seed=cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    segmentor = build_segmentor(backbone, cfg.backbone, cfg.head).to(dist.device)
    segmentor.avg_non_ignore = cfg.head.avg_non_ignore
    if cfg.head.checkpoint:
        load_segmentor_weights(segmentor, cfg.head.checkpoint)
    optimize_frozen_backbone(segmentor, cfg.backbone, dist.device)
    return dist, run_dir, segmentor


def _report(cfg: SegmentationConfig, acc, run_dir: Path, extra: dict) -> list[dict]:
    rows, per_class = result_rows(acc, setting=cfg.setting, paper=PAPER_MIOU.get(cfg.setting), extra=extra)
    save_results(rows, run_dir, "eval_results")
    save_results(per_class, run_dir, "eval_per_class")
    return rows


def run_train(cfg: SegmentationConfig) -> dict:
    """Train with the paper's recipe (iterations, AdamW + layer decay, poly), evaluating and keeping the best."""
    from internvit.segmentation.training import SegTrainer

    dist, run_dir, segmentor = _start(cfg)
    try:
        trainer = SegTrainer(cfg, segmentor=segmentor, dist=dist, run_dir=run_dir)
        summary = trainer.fit()
        if dist.is_main:
            save_results(summary["history"], run_dir, "train_history")
        return summary
    finally:
        cleanup_distributed()


def run_eval(cfg: SegmentationConfig) -> list[dict]:
    """Slide-window evaluation on ADE20K val (every image once across ranks): mIoU, mAcc, aAcc, per-class table."""
    dist, run_dir, segmentor = _start(cfg)
    try:
        acc = evaluate_segmentor(
            segmentor, build_val_set(cfg.data), settings=cfg.eval, num_classes=cfg.head.num_classes, dist=dist
        )
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
    from internvit.engine.config import _merge
    from internvit.segmentation.checkpoints import load_segmentation_checkpoint

    _, report = load_segmentation_checkpoint(checkpoint)
    if "config" not in report.metadata:
        raise InternViTError(
            f"{checkpoint} carries no run settings", fix="pass a best.safetensors written by seg train"
        )
    cfg = _merge(SegmentationConfig, json.loads(report.metadata["config"]))
    if backbone:
        cfg.backbone.checkpoint = backbone
    cfg.head.checkpoint, cfg.device = checkpoint, device
    dev = resolve_device(device)
    segmentor = build_segmentor(build_seg_backbone(cfg.backbone, dev), cfg.backbone, cfg.head).to(dev)
    load_segmentor_weights(segmentor, checkpoint)
    if cfg.backbone.compile is None:  # compiling pays back its cost only over many images
        cfg.backbone.compile = dev.type == "cuda" and len(images) >= COMPILE_MIN_IMAGES
    optimize_frozen_backbone(segmentor, cfg.backbone, dev)
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
