"""Classification heads on the frozen backbone's last-block tokens (docs/protocol.md §2); their files: checkpoints.py.

Every head maps (B, 1+N, C) tokens, cls first, to (B, num_classes) logits as `head(norm(pool(tokens)))`. Parameter
names follow the original InternVL classifier (`attn_pooling.*`, `clip_projector.*`, `norm.*`, `head.*`), so the
released `intern_vit_6b_224px_head.pth` and the original full-model training checkpoints load directly. `norm` is a
plain BatchNorm1d; the engine converts it to SyncBatchNorm for distributed training (same keys, same numerics).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from internvit.errors import InternViTError

log = logging.getLogger(__name__)

BN_EPS = 1e-6  # head SyncBatchNorm eps (§2); momentum is PyTorch's default 0.1
POOL_LN_EPS = 1e-5  # LayerNorms of the attention-pooling block (§2)
HEAD_INIT_STD = 0.01


class CrossAttention(nn.Module):
    """Multi-head attention of queries over keys/values; bias-free q/k/v Linears plus separate q/k/v bias vectors."""

    def __init__(self, dim: int, num_heads: int, out_dim: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.k_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, out_dim)

    def reset_parameters(self) -> None:
        """PyTorch default Linear init; the separate biases start at zero (§2)."""
        for linear in (self.q, self.k, self.v, self.proj):
            linear.reset_parameters()
        for bias in (self.q_bias, self.k_bias, self.v_bias):
            nn.init.zeros_(bias)

    def _split(self, x_BLC: torch.Tensor, linear: nn.Linear, bias: torch.Tensor) -> torch.Tensor:
        B, L, _ = x_BLC.shape
        return nn.functional.linear(x_BLC, linear.weight, bias).reshape(B, L, self.num_heads, -1).transpose(1, 2)

    def forward(self, q_BQC: torch.Tensor, k_BNC: torch.Tensor, v_BNC: torch.Tensor) -> torch.Tensor:
        q = self._split(q_BQC, self.q, self.q_bias) * self.scale  # q is scaled before the product, as the original
        k = self._split(k_BNC, self.k, self.k_bias)
        v = self._split(v_BNC, self.v, self.v_bias)
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, Q, N): softmax over the keys
        out = (attn @ v).transpose(1, 2).flatten(2)
        return self.proj(out)


class AttentionPoolingBlock(nn.Module):
    """One query (the mean of all 1+N tokens) attends over all tokens; no residual, no MLP (§2)."""

    def __init__(self, dim: int, num_heads: int, out_dim: int) -> None:
        super().__init__()
        self.norm1_q = nn.LayerNorm(dim, eps=POOL_LN_EPS)
        self.norm1_k = nn.LayerNorm(dim, eps=POOL_LN_EPS)
        self.norm1_v = nn.LayerNorm(dim, eps=POOL_LN_EPS)
        self.cross_attn = CrossAttention(dim, num_heads, out_dim)

    def reset_parameters(self) -> None:
        """PyTorch default init (LayerNorm ones/zeros, Linear kaiming-uniform), zero q/k/v biases."""
        for norm in (self.norm1_q, self.norm1_k, self.norm1_v):
            norm.reset_parameters()
        self.cross_attn.reset_parameters()

    def forward(self, x_BNC: torch.Tensor) -> torch.Tensor:
        query = x_BNC.mean(dim=1, keepdim=True)  # cls token included in the mean
        out = self.cross_attn(self.norm1_q(query), self.norm1_k(x_BNC), self.norm1_v(x_BNC))
        return out.squeeze(1)


class _ProbeHead(nn.Module):
    """Shared tail of every head: BatchNorm1d(feature_dim, eps 1e-6) then Linear(feature_dim -> num_classes)."""

    kind = ""

    def __init__(self, embed_dim: int, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_features = feature_dim
        self.num_classes = num_classes
        self.norm = nn.BatchNorm1d(feature_dim, eps=BN_EPS, momentum=0.1)
        self.head = nn.Linear(feature_dim, num_classes)

    @torch.no_grad()
    def init_weights(self) -> None:
        """§2 init: BN defaults; Linear weight ~ N(0, 0.01), bias 0 (also materialises a meta-built head)."""
        self.norm.reset_parameters()
        nn.init.normal_(self.head.weight, mean=0.0, std=HEAD_INIT_STD)
        nn.init.zeros_(self.head.bias)

    def pool(self, x_BNC: torch.Tensor) -> torch.Tensor:
        """The (B, num_features) feature that enters `norm`."""
        raise NotImplementedError

    def forward(self, x_BNC: torch.Tensor) -> torch.Tensor:
        if x_BNC.ndim != 3 or x_BNC.shape[-1] != self.embed_dim or x_BNC.shape[1] < 2:
            raise ValueError(f"expected tokens of shape (B, 1+N, {self.embed_dim}), got {tuple(x_BNC.shape)}")
        return self.head(self.norm(self.pool(x_BNC)))


def cls_patch_concat(x_BNC: torch.Tensor) -> torch.Tensor:
    """The paper's probe input: cat(cls token, mean of the N patch tokens), (B, 2C)."""
    return torch.cat([x_BNC[:, 0], x_BNC[:, 1:].mean(dim=1)], dim=-1)


class ClsPatchConcatHead(_ProbeHead):
    """Linear probe on cat(cls token, mean of the N patch tokens): the paper's IN-1K probe and the released head."""

    kind = "cls_patch_concat"

    def __init__(self, embed_dim: int, num_classes: int = 1000) -> None:
        super().__init__(embed_dim, 2 * embed_dim, num_classes)
        self.init_weights()

    def pool(self, x_BNC: torch.Tensor) -> torch.Tensor:
        return cls_patch_concat(x_BNC)


class AttentionPoolingHead(_ProbeHead):
    """A new, trainable attention-pooling block (out_dim = C) followed by BN + Linear (attn_pooling_probing)."""

    kind = "attention_pooling"

    def __init__(self, embed_dim: int, num_heads: int, num_classes: int = 1000) -> None:
        super().__init__(embed_dim, embed_dim, num_classes)
        self.attn_pooling = AttentionPoolingBlock(embed_dim, num_heads, out_dim=embed_dim)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        super().init_weights()
        self.attn_pooling.reset_parameters()

    def pool(self, x_BNC: torch.Tensor) -> torch.Tensor:
        return self.attn_pooling(x_BNC)


class ClipProjectorHead(_ProbeHead):
    """The pretrained InternVL-C clip_projector (frozen, always in eval mode) -> 768-d, then BN + Linear.

    The projector's weights come from the backbone checkpoint via `load_clip_projector` (or a saved head file).
    """

    kind = "clip_projector"

    def __init__(self, embed_dim: int, num_classes: int = 1000, clip_dim: int = 768, clip_heads: int = 16) -> None:
        super().__init__(embed_dim, clip_dim, num_classes)
        self.clip_projector = AttentionPoolingBlock(embed_dim, clip_heads, out_dim=clip_dim)
        self.clip_projector.requires_grad_(False)
        self.init_weights()
        self.train()

    def train(self, mode: bool = True) -> ClipProjectorHead:
        """Train BN + Linear only; the frozen clip_projector stays in eval mode."""
        super().train(mode)
        self.clip_projector.eval()
        return self

    def pool(self, x_BNC: torch.Tensor) -> torch.Tensor:
        return self.clip_projector(x_BNC)

    @torch.no_grad()
    def load_clip_projector(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy the pretrained `clip_projector.*` tensors (the backbone LoadReport.extras) in, strictly."""
        prefix = "clip_projector."
        given = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        own = self.clip_projector.state_dict()
        fix = "load the original InternVL .pth (tag internvit-6b-224px.internvl), which holds the clip_projector"
        if not given:
            raise InternViTError("no clip_projector.* tensors were given", fix=fix)
        problems = [f"missing {prefix}{k}" for k in sorted(set(own) - set(given))]
        problems += [f"unexpected {prefix}{k}" for k in sorted(set(given) - set(own))]
        problems += [
            f"mismatched {prefix}{k}: checkpoint {tuple(v.shape)} vs head {tuple(own[k].shape)}"
            for k, v in sorted(given.items())
            if k in own and v.shape != own[k].shape
        ]
        if problems:
            raise InternViTError(
                "clip_projector tensors do not fit the head (embed_dim "
                f"{self.embed_dim}, out dim {self.num_features}): " + "; ".join(problems),
                fix=f"{fix}; build the head with the backbone's embed_dim",
            )
        self.clip_projector.load_state_dict(given)


HEADS: dict[str, type[_ProbeHead]] = {
    "cls_patch_concat": ClsPatchConcatHead,
    "attention_pooling": AttentionPoolingHead,
    "clip_projector": ClipProjectorHead,
}


def build_head(kind: str, *, embed_dim: int, num_heads: int, num_classes: int) -> nn.Module:
    """Build the head of a CLS_TARGET kind; `num_heads` is the backbone's (used by attention_pooling only)."""
    if kind == "cls_patch_concat":
        return ClsPatchConcatHead(embed_dim, num_classes)
    if kind == "attention_pooling":
        return AttentionPoolingHead(embed_dim, num_heads, num_classes)
    if kind == "clip_projector":
        return ClipProjectorHead(embed_dim, num_classes)
    raise InternViTError(f"unknown head kind {kind!r}", fix=f"use one of {', '.join(HEADS)}")
