"""InternViT architecture settings and the named presets (variants are data, docs/protocol.md §1.1, §1.6)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from internvit.errors import InternViTError

NormType = Literal["rms_norm", "layer_norm"]


@dataclass(frozen=True)
class InternViTConfig:
    """Architecture of one InternViT backbone; `img_size` is the native resolution (grid of the stored pos_embed)."""

    embed_dim: int = 3200
    depth: int = 48
    num_heads: int = 25
    mlp_hidden_dim: int = 12800
    patch_size: int = 14
    img_size: int = 224
    in_chans: int = 3
    norm_type: NormType = "rms_norm"
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = True
    layer_scale_init: float = 0.1
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
        if self.norm_type not in ("rms_norm", "layer_norm"):
            raise ValueError(f"norm_type must be 'rms_norm' or 'layer_norm', got {self.norm_type!r}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def grid_size(self) -> int:
        """Side of the native patch grid (16 for 224 px, 32 for 448 px)."""
        return self.img_size // self.patch_size

    def replace(self, **changes: object) -> InternViTConfig:
        return dataclasses.replace(self, **changes)


_6B_448 = InternViTConfig(depth=45, img_size=448)  # the 448px releases drop the last 3 blocks (§1.1)

PRESETS: dict[str, InternViTConfig] = {
    "internvit-6b-224px": InternViTConfig(),
    "internvit-6b-448px-v1.0": _6B_448,
    "internvit-6b-448px-v1.2": _6B_448,
    "internvit-6b-448px-v1.5": _6B_448,
    "internvit-6b-448px-v2.5": _6B_448,
    "internvit-300m-448px": InternViTConfig(
        embed_dim=1024,
        depth=24,
        num_heads=16,
        mlp_hidden_dim=4096,
        img_size=448,
        norm_type="layer_norm",
        qkv_bias=True,
        qk_norm=False,
        layer_scale_init=1.0,
    ),
    # Tiny 6B-type model (RMSNorm, full-width QK-norm, no qkv bias) for tests and the CPU demo.
    "debug": InternViTConfig(embed_dim=64, depth=4, num_heads=4, mlp_hidden_dim=256, img_size=56),
}


def get_config(name: str) -> InternViTConfig:
    """Look a preset up by name, with an error that lists the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise InternViTError(
            f"unknown preset {name!r}", fix=f"use one of: {', '.join(PRESETS)} (see `internvit models`)"
        ) from None
