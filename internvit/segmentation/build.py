"""Assembling a segmentor (backbone taps, optional FPN, decode and auxiliary heads) from typed settings."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open

from internvit.data.ade20k import NUM_CLASSES
from internvit.engine.memory import MemoryPlan, plan_memory
from internvit.engine.parallelize import optimize_for_inference, resolve_compile
from internvit.engine.precision import autocast_dtype, resolve_dtype
from internvit.errors import InternViTError
from internvit.model import InternViT, get_config
from internvit.segmentation.config import SegBackboneConfig, SegHeadConfig, SegTrainConfig
from internvit.segmentation.heads import FCNAuxHead, FPNAdapter, LinearHead, UPerHead
from internvit.segmentation.segmentor import Segmentor
from internvit.weights.loading import load_or_init_model
from internvit.weights.tags import resolve_tag

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
    num_classes = head.num_classes if head.num_classes is not None else NUM_CLASSES  # unset: ADE20K's 150
    if head.fpn and len(taps) != 4:
        raise InternViTError(f"the FPN adapter needs four taps, got out_indices={taps}", fix="e.g. [11, 23, 35, 47]")
    if head.kind == "upernet":
        decode = UPerHead(in_channels=(dim,) * len(taps), channels=head.channels, num_classes=num_classes)
    else:
        decode = LinearHead(dim, num_classes=num_classes)
    aux = FCNAuxHead(dim, channels=head.channels, num_classes=num_classes) if head.aux else None
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


def backbone_preset(cfg: SegBackboneConfig) -> str | None:
    """The backbone's preset without reading its weights: named, a tag's, the debug preset for "random", or the
    `preset` in the header of one of our safetensors files; None when only the weights would tell."""
    if cfg.preset:
        return cfg.preset
    tag = resolve_tag(cfg.checkpoint)
    if tag is not None:
        return tag.preset
    if cfg.checkpoint == "random":
        return "debug"
    path = Path(cfg.checkpoint).expanduser()
    if path.suffix == ".safetensors" and path.is_file():
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("preset")
    return None


def plan_training(
    backbone_cfg: SegBackboneConfig,
    head: SegHeadConfig,
    train: SegTrainConfig,
    *,
    world_size: int,
    rank: int = 0,
    local_world_size: int | None = None,
) -> MemoryPlan | None:
    """The memory plan of a segmentation run, from a segmentor built on the meta device (nothing is loaded); None
    when the preset is unknown before the weights are read (name it with backbone.preset)."""
    preset = backbone_preset(backbone_cfg)
    if preset is None:
        return None
    config = get_config(preset).replace(img_size=backbone_cfg.img_size)
    with torch.device("meta"):
        backbone = InternViT(config)
        if backbone_cfg.frozen:
            backbone = backbone.to(resolve_dtype(backbone_cfg.precision)).requires_grad_(False)
        segmentor = build_segmentor(backbone, backbone_cfg, head)
    trained = not backbone_cfg.frozen
    return plan_memory(
        segmentor,
        blocks=backbone.blocks,
        world_size=world_size,
        rank=rank,
        parallel=train.parallel or "ddp",
        shard_size=local_world_size if train.hybrid_shard else None,
        compute_bytes=resolve_dtype(backbone_cfg.precision).itemsize,
        batch_size=train.batch_size,
        tokens=1 + (backbone_cfg.img_size // config.patch_size) ** 2,
        activation_checkpointing=trained and backbone_cfg.grad_checkpointing,
        cpu_offload=train.cpu_offload,
        root_numel=sum(p.numel() for p in segmentor.parameters()) - sum(p.numel() for p in backbone.parameters()),
    )
