"""FLOPs of one backbone forward, counted as 2 x multiply-accumulates of the matmuls and the patch convolution.

Norms, softmax, GELU and residual adds are left out (well under 1% for the 6B model). Per block with T tokens,
width C and MLP width M: qkv 2*T*C*3C, proj 2*T*C*C, fc1 + fc2 2*2*T*C*M, and attention scores plus the
weighted sum of values 2*2*T*T*C.
"""

from __future__ import annotations

from internvit.model.config import InternViTConfig


def count_flops(config: InternViTConfig, img_size: int | tuple[int, int] | None = None) -> int:
    """Forward FLOPs for one image at `img_size` (default: the preset's native resolution)."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else (img_size or (config.img_size, config.img_size))
    n = (h // config.patch_size) * (w // config.patch_size)
    t, c, m = n + 1, config.embed_dim, config.mlp_hidden_dim
    patch = 2 * n * c * config.in_chans * config.patch_size**2
    linear = 2 * t * c * (3 * c + c + 2 * m)
    attention = 2 * 2 * t * t * c
    return patch + config.depth * (linear + attention)
