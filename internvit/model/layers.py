"""InternViT building blocks (docs/protocol.md §1.3): RMSNorm, full-width QK-norm attention, MLP, LayerScale,
DropPath."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from internvit.model.config import InternViTConfig


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: the autocast dtype when autocast is on for x's device, else x's own dtype."""
    if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class RMSNorm(nn.Module):
    """RMSNorm with apex FusedRMSNorm semantics: fp32 statistics, output in the compute dtype (§1.3)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = compute_dtype(x)
        x32 = x.to(out_dtype).float()  # apex casts the input to the autocast dtype before its fp32 statistics
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # apex casts the weight to the compute dtype and multiplies with fp32 accumulation
        return (x32 * self.weight.to(out_dtype)).to(out_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def build_norm(config: InternViTConfig, dim: int) -> nn.Module:
    if config.norm_type == "rms_norm":
        return RMSNorm(dim, eps=config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps)


class Attention(nn.Module):
    """Multi-head self-attention with a packed [q | k | v] projection and QK-norm over the full width of a token."""

    def __init__(self, config: InternViTConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=config.qkv_bias)
        # q_norm / k_norm see all heads of a token at once (a 3200-long weight), not each head separately
        self.q_norm = build_norm(config, dim) if config.qk_norm else nn.Identity()
        self.k_norm = build_norm(config, dim) if config.qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        B, T, C = x_BTC.shape
        q, k, v = self.qkv(x_BTC).view(B, T, 3, C).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        dtype = v.dtype  # fused SDPA kernels need q, k, v in one (the compute) dtype
        q, k, v = (t.to(dtype).view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.proj(out.transpose(1, 2).reshape(B, T, C))


class Mlp(nn.Module):
    def __init__(self, config: InternViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.embed_dim, config.mlp_hidden_dim)
        self.act = nn.GELU()  # exact erf GELU
        self.fc2 = nn.Linear(config.mlp_hidden_dim, config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel gamma. With fp32 gamma under autocast the product (and so the residual stream) stays fp32 (§1.3)."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.empty(dim))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: per-sample Bernoulli keep mask, survivors scaled by 1/keep (timm semantics)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(LS1(Attn(Norm1(x)))), then x + DropPath(LS2(MLP(Norm2(x))))."""

    def __init__(self, config: InternViTConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = build_norm(config, config.embed_dim)
        self.attn = Attention(config)
        self.ls1 = LayerScale(config.embed_dim, config.layer_scale_init)
        self.norm2 = build_norm(config, config.embed_dim)
        self.mlp = Mlp(config)
        self.ls2 = LayerScale(config.embed_dim, config.layer_scale_init)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class PatchEmbed(nn.Module):
    """Non-overlapping patch convolution (with bias) -> row-major (h, w) tokens."""

    def __init__(self, config: InternViTConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        p = config.patch_size
        self.proj = nn.Conv2d(config.in_chans, config.embed_dim, kernel_size=p, stride=p)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.proj(x_BCHW.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)
