"""Assembling a segmentor (backbone taps, optional FPN, decode and auxiliary heads) from typed settings."""

from __future__ import annotations

import logging

import torch

from internvit.engine.parallelize import optimize_for_inference, resolve_compile
from internvit.engine.precision import autocast_dtype, resolve_dtype
from internvit.errors import InternViTError
from internvit.segmentation.config import SegBackboneConfig, SegHeadConfig
from internvit.segmentation.heads import FCNAuxHead, FPNAdapter, LinearHead, UPerHead
from internvit.segmentation.segmentor import Segmentor
from internvit.weights.loading import load_or_init_model

log = logging.getLogger(__name__)


def build_seg_backbone(cfg: SegBackboneConfig, device: torch.device, seed: int = 0):
    """The backbone at cfg.img_size (pos_embed resized once), frozen (stored in its precision) or trainable (fp32
    master weights; activation checkpointing is applied by the engine's parallelize)."""
    backbone, _ = load_or_init_model(
        cfg.checkpoint,
        preset=cfg.preset,
        img_size=cfg.img_size,
        device=device,
        seed=seed,
        drop_path_rate=cfg.drop_path_rate,
    )
    if cfg.frozen:  # a frozen backbone lives in bf16, as in the original's segmentation configs
        backbone = backbone.to(resolve_dtype(cfg.precision)).eval().requires_grad_(False)
    # fine-tuned: fp32 master weights under bf16 autocast (the DeepSpeed-bf16 setup); bf16 AdamW steps would vanish
    return backbone


def optimize_frozen_backbone(segmentor: Segmentor, cfg: SegBackboneConfig, device: torch.device) -> None:
    """The fast inference path (compiled blocks, optional fp8) for a frozen backbone, once its weights are final."""
    if not cfg.frozen:
        if cfg.fp8:
            raise InternViTError(
                "fp8 is for a frozen backbone only", fix="set backbone.fp8=false or backbone.frozen=true"
            )
        return
    compile = resolve_compile(cfg.compile, device)
    optimize_for_inference(segmentor.backbone, amp_dtype=None, compile=compile, fp8=cfg.fp8)


def build_segmentor(backbone, backbone_cfg: SegBackboneConfig, head: SegHeadConfig) -> Segmentor:
    """Decode head (linear or UperNet), FPN adapter and auxiliary FCN head around the backbone's taps."""
    dim, taps = backbone.embed_dim, list(backbone_cfg.out_indices)
    if head.fpn and len(taps) != 4:
        raise InternViTError(f"the FPN adapter needs four taps, got out_indices={taps}", fix="e.g. [11, 23, 35, 47]")
    if head.kind == "upernet":
        decode = UPerHead(in_channels=(dim,) * len(taps), channels=head.channels, num_classes=head.num_classes)
    else:
        decode = LinearHead(dim, num_classes=head.num_classes)
    aux = FCNAuxHead(dim, channels=head.channels, num_classes=head.num_classes) if head.aux else None
    segmentor = Segmentor(
        backbone,
        decode,
        out_indices=taps,
        fpn=FPNAdapter(dim) if head.fpn else None,
        aux_head=aux,
        aux_index=head.aux_index if aux is not None else None,
        aux_weight=head.aux_weight,
    )
    if not backbone_cfg.frozen:
        segmentor.backbone_autocast = autocast_dtype(backbone_cfg.precision)
    return segmentor
