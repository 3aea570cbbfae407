"""Assembling the probe's parts from settings: the frozen backbone on the fast inference path, and the head."""

from __future__ import annotations

import logging

import torch
from torch import nn

from internvit.classification.checkpoints import load_head_state
from internvit.classification.heads import build_head
from internvit.engine.parallelize import optimize_for_inference, resolve_compile
from internvit.engine.precision import autocast_dtype
from internvit.errors import InternViTError
from internvit.model import InternViT
from internvit.weights.loading import load_or_init_model

log = logging.getLogger(__name__)


def build_backbone(
    checkpoint: str,
    *,
    preset: str | None,
    img_size: int,
    device: torch.device,
    seed: int = 0,
    precision: str = "fp32",
    compile: bool | None = None,
    fp8: bool = False,
) -> tuple[InternViT, object]:
    """The frozen backbone, loaded from `checkpoint` ("random": random init), on the fast inference path.

    It will run under `precision`'s autocast: its matmul weights are stored in that dtype (the same values autocast
    would cast to), and its blocks are compiled when `compile` resolves to on (see engine/parallelize.py).
    """
    model, source = load_or_init_model(checkpoint, preset=preset, img_size=img_size, device=device, seed=seed)
    amp_dtype = autocast_dtype(precision)
    optimize_for_inference(model, amp_dtype=amp_dtype, compile=resolve_compile(compile, device), fp8=fp8)
    log.info("backbone: %s (%d blocks, %d px)", checkpoint, len(model.blocks), model.config.img_size)
    return model, source


def new_head(
    kind: str,
    *,
    backbone: InternViT,
    num_classes: int,
    extras: dict | None,
    checkpoint: str,
    use_ema: bool,
    device: torch.device,
) -> nn.Module:
    """A head of `kind` for `backbone`'s tokens, from the backbone file's clip_projector and/or a head checkpoint."""
    head = build_head(kind, embed_dim=backbone.embed_dim, num_heads=backbone.config.num_heads, num_classes=num_classes)
    if kind == "clip_projector":
        if not extras:
            raise InternViTError(
                "the clip_projector head needs the backbone checkpoint's clip_projector.* tensors",
                fix="use the original InternVL .pth (tag internvit-6b-224px.internvl)",
            )
        head.load_clip_projector(extras)
    if checkpoint:
        load_head_state(checkpoint, head, use_ema=use_ema)
    return head.to(device)
