"""InternViT layers and backbone: pure, single-device, no I/O."""

from internvit.model.config import PRESETS, InternViTConfig, get_config
from internvit.model.flops import count_flops
from internvit.model.vit import InternViT, build_model, count_params, resize_pos_embed

__all__ = [
    "PRESETS",
    "InternViT",
    "InternViTConfig",
    "build_model",
    "count_flops",
    "count_params",
    "get_config",
    "resize_pos_embed",
]
