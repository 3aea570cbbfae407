"""Entry points of the linear-probe protocol: run_train, run_eval, run_classify (they assemble engine pieces)."""

from __future__ import annotations

import json
import logging

import torch
from torch import nn

from internvit.classification.config import ClassificationConfig
from internvit.classification.evaluate import evaluate_sets
from internvit.classification.heads import build_head, load_head_state, save_head
from internvit.classification.training import Trainer
from internvit.data import build_eval_transform, load_image
from internvit.engine.distributed import DistInfo, cleanup_distributed, resolve_device, seed_everything, start_run
from internvit.engine.loop import AMP_DTYPES, autocast
from internvit.engine.parallelize import optimize_for_inference, resolve_compile
from internvit.engine.results import save_results
from internvit.errors import InternViTError
from internvit.model import InternViT
from internvit.weights.loading import load_or_init_model

log = logging.getLogger(__name__)
COMPILE_MIN_IMAGES = 32  # `classify` compiles the backbone (on CUDA) only for at least this many images


def build_backbone(
    checkpoint: str,
    *,
    preset: str | None,
    img_size: int,
    device: torch.device,
    seed: int = 0,
    amp: str = "none",
    compile: bool | None = None,
    fp8: bool = False,
):
    """The frozen backbone, loaded from `checkpoint` ("random": random init), on the fast inference path.

    It will run under `amp` autocast: its matmul weights are stored in that dtype (the same values autocast would
    cast to), and its blocks are compiled when `compile` resolves to on (see engine/parallelize.py).
    """
    model, source = load_or_init_model(checkpoint, preset=preset, img_size=img_size, device=device, seed=seed)
    optimize_for_inference(model, amp_dtype=AMP_DTYPES[amp], compile=resolve_compile(compile, device), fp8=fp8)
    return model, source


def head_metadata(head_kind: str, backbone: InternViT, num_classes: int, class_names: list[str], checkpoint: str):
    cfg = backbone.config
    return {
        "kind": head_kind,
        "num_classes": str(num_classes),
        "embed_dim": str(cfg.embed_dim),
        "num_heads": str(cfg.num_heads),
        "img_size": str(cfg.img_size),
        "backbone": checkpoint,
        "class_names": json.dumps(class_names),
    }


def new_head(cfg: ClassificationConfig, backbone: InternViT, extras: dict | None, device: torch.device) -> nn.Module:
    head = build_head(
        cfg.head.kind,
        embed_dim=backbone.embed_dim,
        num_heads=backbone.config.num_heads,
        num_classes=cfg.head.num_classes,
    )
    if cfg.head.kind == "clip_projector":
        if not extras:
            raise InternViTError(
                "the clip_projector head needs the backbone checkpoint's clip_projector.* tensors",
                fix="use the original InternVL .pth (tag internvit-6b-224px.internvl)",
            )
        head.load_clip_projector(extras)
    if cfg.head.checkpoint:
        load_head_state(cfg.head.checkpoint, head, use_ema=cfg.head.use_ema)
    return head.to(device)


def _backbone_and_extras(cfg: ClassificationConfig, dist: DistInfo):
    backbone, source = build_backbone(
        cfg.backbone.checkpoint,
        preset=cfg.backbone.preset,
        img_size=cfg.backbone.img_size,
        device=dist.device,
        seed=cfg.train.seed,
        amp=cfg.train.amp,
        compile=cfg.backbone.compile,
        fp8=cfg.backbone.fp8,
    )
    extras = getattr(source, "extras", None)
    log.info("backbone: %s (%s, %d px)", cfg.backbone.checkpoint, backbone.config.depth, backbone.config.img_size)
    return backbone, extras


def run_train(cfg: ClassificationConfig) -> dict[str, object]:
    """Train a head on frozen features with the paper recipe; resumes from the run folder; saves the heads."""
    dist, run_dir = start_run(cfg, cfg.output_dir, cfg.device)
    try:
        seed_everything(cfg.train.seed + dist.rank)
        backbone, extras = _backbone_and_extras(cfg, dist)
        head = new_head(cfg, backbone, extras, dist.device)
        trainer = Trainer(cfg, backbone=backbone, head=head, dist=dist, run_dir=run_dir)
        summary = trainer.fit()
        if dist.is_main:
            meta = head_metadata(
                cfg.head.kind, backbone, cfg.head.num_classes, trainer.class_names, cfg.backbone.checkpoint
            )
            save_head(trainer.head, run_dir / "head.safetensors", metadata=meta)
            if trainer.ema is not None:
                save_head(trainer.ema.module, run_dir / "head_ema.safetensors", metadata=meta)
            save_results(summary["history"], run_dir, "train_history")
        return summary
    finally:
        cleanup_distributed()


def run_eval(cfg: ClassificationConfig) -> list[dict[str, object]]:
    """Score the head (cfg.head.checkpoint) on any subset of the six test sets with one backbone load."""
    dist, run_dir = start_run(cfg, cfg.output_dir, cfg.device)
    try:
        if not cfg.head.checkpoint:
            raise InternViTError("no head to evaluate", fix="set head.checkpoint=PATH (e.g. a run's head.safetensors)")
        backbone, extras = _backbone_and_extras(cfg, dist)
        head = new_head(cfg, backbone, extras, dist.device)
        rows = evaluate_sets(
            backbone=backbone,
            heads={"head": head},
            sets=list(cfg.eval.sets),
            data=cfg.data,
            transform=build_eval_transform(backbone.config.img_size),
            dist=dist,
            batch_size=cfg.eval.batch_size,
            amp=cfg.train.amp,
        )
        if dist.is_main:
            paths = save_results(rows, run_dir, "eval_results")
            log.info("saved %s", ", ".join(str(p) for p in paths))
        return rows
    finally:
        cleanup_distributed()


@torch.no_grad()
def run_classify(
    images: list[str], *, backbone: str, head: str, preset: str | None = None, topk: int = 5, device: str = "auto"
) -> list[dict[str, object]]:
    """Top-k class names with probabilities for each image, from a backbone and a saved head."""
    from internvit.classification.heads import read_head_file

    dev = resolve_device(device)
    head_info = read_head_file(head)
    img_size = int(head_info.metadata.get("img_size", 224))
    amp = "bf16" if dev.type == "cuda" else "none"  # the protocol's eval numerics on GPUs; plain fp32 on the CPU
    # compiling pays back its cost only over many images
    compile = dev.type == "cuda" and len(images) >= COMPILE_MIN_IMAGES
    model, _ = build_backbone(backbone, preset=preset, img_size=img_size, device=dev, amp=amp, compile=compile)
    probe = build_head(
        head_info.kind, embed_dim=model.embed_dim, num_heads=model.config.num_heads, num_classes=head_info.num_classes
    )
    load_head_state(head, probe)
    probe.to(dev).eval()
    transform = build_eval_transform(img_size)
    names = head_info.class_names
    results = []
    for path in images:
        x = transform(load_image(path)).unsqueeze(0).to(dev)
        with autocast(dev, amp):
            probs = probe(model.forward_features(x)).float().softmax(-1)[0]
        values, idx = probs.topk(min(topk, probs.numel()))
        results.append(
            {
                "image": str(path),
                "top": [
                    {"class": names[i], "index": i, "prob": round(v, 4)}
                    for v, i in zip(values.tolist(), idx.tolist(), strict=True)
                ],
            }
        )
    return results
