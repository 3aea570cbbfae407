"""Assembling a segmentor (backbone taps, optional FPN, decode and auxiliary heads) from typed settings."""

from __future__ import annotations

import logging

import torch

from internvit.engine.parallelize import optimize_for_inference, resolve_compile
from internvit.errors import InternViTError
from internvit.segmentation.config import SegBackboneConfig, SegHeadConfig
from internvit.segmentation.heads import FCNAuxHead, FPNAdapter, LinearHead, UPerHead
from internvit.segmentation.segmentor import Segmentor
from internvit.weights.loading import load_or_init_model

log = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def build_seg_backbone(cfg: SegBackboneConfig, device: torch.device, seed: int = 0):
    """The backbone at cfg.img_size (pos_embed resized once), in its dtype, frozen or trainable; plus extras."""
    if cfg.dtype not in DTYPES:
        raise InternViTError(f"backbone.dtype must be one of {list(DTYPES)}", fix="use bf16 (the original) or fp32")
    backbone, _ = load_or_init_model(
        cfg.checkpoint,
        preset=cfg.preset,
        img_size=cfg.img_size,
        device=device,
        seed=seed,
        drop_path_rate=cfg.drop_path_rate,
    )
    if cfg.frozen:  # a frozen backbone lives in bf16, as in the original's segmentation configs
        backbone = backbone.to(DTYPES[cfg.dtype]).eval().requires_grad_(False)
    else:  # fine-tuned: fp32 master weights under bf16 autocast (the DeepSpeed-bf16 setup); bf16 AdamW steps vanish
        backbone.set_grad_checkpointing(cfg.grad_checkpointing)
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
    if not backbone_cfg.frozen and backbone_cfg.dtype != "fp32":
        segmentor.backbone_autocast = DTYPES[backbone_cfg.dtype]
    return segmentor


def trainable_state(segmentor: Segmentor, backbone_frozen: bool) -> dict[str, torch.Tensor]:
    """What a run saves: heads and FPN always; the backbone only when it was fine-tuned (it is 12 GB otherwise)."""
    state = segmentor.state_dict()
    return {k: v for k, v in state.items() if not (backbone_frozen and k.startswith("backbone."))}
