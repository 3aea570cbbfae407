"""Segmentation decode heads, the FPN adapter and the mmseg loss (docs/protocol.md §5.5, §5.6).

Every head maps fp32 feature maps to (B, num_classes, h, w) logits at the resolution of its input (the loss and the
sliding-window inference upsample them). BatchNorm layers are plain BatchNorm2d; the engine converts them to
SyncBatchNorm for distributed training (same keys, same numerics), as the original trains with SyncBN.

Parameter names follow mmseg 0.30 and the original InternVL code, so that released checkpoints (a bare state dict
with `backbone.*`, `decode_head.*`, `auxiliary_head.*` keys, §5.9) map by prefix only (the map itself belongs in
`internvit.weights`; see `Segmentor` for the prefixes):

    decode_head.conv_seg.{weight,bias}        -> LinearHead / UPerHead conv_seg.*    (mmseg BaseDecodeHead: certain)
    decode_head.norm.{weight,bias,running_*}  -> LinearHead.norm.*  (the original custom FCNHead registers
                                                 `self.norm = nn.SyncBatchNorm(channels)` when with_norm=True;
                                                 ASSUMED to reach the released files unchanged: confirm with one)
    decode_head.{psp_modules,bottleneck,lateral_convs,fpn_convs,fpn_bottleneck}.* -> UPerHead, unchanged
    auxiliary_head.{convs.0.conv,convs.0.bn,conv_seg}.*                           -> FCNAuxHead, unchanged
    backbone.up1.{0,1,3}.*, backbone.up2.0.*  -> FPNAdapter up1.{0,1,3}.*, up2.0.* (nn.Sequential indices kept)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-5  # SyncBatchNorm / mmcv defaults (§5.6); momentum is PyTorch's default 0.1
FPN_LN_EPS = 1e-6  # channels-first LayerNorm of the FPN adapter (§5.5)
SEG_INIT_STD = 0.01  # conv_seg ~ N(0, 0.01), bias 0 (mmseg BaseDecodeHead)
IGNORE_INDEX = 255


def _check_maps(maps: Sequence[torch.Tensor], channels: Sequence[int], who: str) -> None:
    """Raise unless `maps` are len(channels) NCHW tensors with those channel counts."""
    if len(maps) != len(channels):
        raise ValueError(f"{who} expects {len(channels)} feature maps, got {len(maps)}")
    for i, (m, c) in enumerate(zip(maps, channels, strict=True)):
        if m.ndim != 4 or m.shape[1] != c:
            raise ValueError(f"{who}: feature map {i} must have shape (B, {c}, h, w), got {tuple(m.shape)}")


def _init_unless_meta(module: nn.Module) -> None:
    """Initialise a new module, except on the meta device: there, call init_weights() after to_empty()."""
    # besides being useless, random init of meta tensors costs seconds (it imports torch's reference kernels)
    if not any(p.is_meta for p in module.parameters()):
        module.init_weights()


class ConvModule(nn.Module):
    """mmcv ConvModule as configured in §5.6: Conv2d without bias -> BatchNorm2d -> ReLU (keys conv.*, bn.*)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=0.1)
        self.act = nn.ReLU()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mmcv kaiming_init (normal, fan_out, relu) for the conv; BN weight 1, bias 0, fresh running stats."""
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        self.bn.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class _DecodeHead(nn.Module):
    """Shared tail of the decode heads (mmseg BaseDecodeHead.cls_seg): Dropout2d then a 1x1 `conv_seg` with bias."""

    def __init__(self, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        if num_classes < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"need num_classes >= 1 and 0 <= dropout < 1, got {num_classes} and {dropout}")
        self.channels = channels
        self.num_classes = num_classes
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)

    @torch.no_grad()
    def init_weights(self) -> None:
        """§5.6 init: ConvModules Kaiming (fan_out, relu), BN ones/zeros, conv_seg N(0, 0.01) with zero bias."""
        for module in self.modules():
            if isinstance(module, (ConvModule, nn.BatchNorm2d)):
                module.reset_parameters()
        nn.init.normal_(self.conv_seg.weight, mean=0.0, std=SEG_INIT_STD)
        nn.init.zeros_(self.conv_seg.bias)

    def cls_seg(self, feat: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(feat))


class LinearHead(_DecodeHead):
    """The "linear" head (custom FCNHead, num_convs 0, with_norm): BatchNorm2d -> 1x1 conv_seg, per-patch logits.

    Takes the last of the maps it is given (mmseg in_index -1), or a single map.
    """

    def __init__(self, in_channels: int, num_classes: int = 150) -> None:
        super().__init__(in_channels, num_classes, dropout=0.0)
        self.norm = nn.BatchNorm2d(in_channels, eps=BN_EPS, momentum=0.1)
        _init_unless_meta(self)

    def forward(self, inputs: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        x = inputs if isinstance(inputs, torch.Tensor) else inputs[-1]
        _check_maps([x], [self.channels], type(self).__name__)
        return self.cls_seg(self.norm(x))


class FCNAuxHead(_DecodeHead):
    """Auxiliary head (custom FCNHead, num_convs 1, no norm): 3x3 ConvModule -> Dropout2d -> conv_seg (§5.6)."""

    def __init__(self, in_channels: int, channels: int = 1536, num_classes: int = 150, dropout: float = 0.1) -> None:
        super().__init__(channels, num_classes, dropout)
        self.in_channels = in_channels
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3, padding=1))
        _init_unless_meta(self)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        _check_maps([x_BChw], [self.in_channels], type(self).__name__)
        return self.cls_seg(self.convs(x_BChw))


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize with align_corners=False (mmseg `resize` as configured everywhere here)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UPerHead(_DecodeHead):
    """mmseg UPerHead (§5.6): PPM on the last map, FPN laterals with top-down adds, fpn convs, fused at level 0."""

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int = 1536,
        num_classes: int = 150,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__(channels, num_classes, dropout)
        self.in_channels = tuple(int(c) for c in in_channels)
        if len(self.in_channels) < 2:
            raise ValueError(f"UPerHead needs at least 2 input levels, got in_channels {self.in_channels}")
        top = self.in_channels[-1]
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(top, channels, 1)) for scale in pool_scales
        )
        self.bottleneck = ConvModule(top + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in self.in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in self.in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(self.in_channels) * channels, channels, 3, padding=1)
        _init_unless_meta(self)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pyramid pooling: [x, upsampled pooled convs] concatenated, then the 3x3 bottleneck."""
        pooled = [_resize(ppm(x), x.shape[2:]) for ppm in self.psp_modules]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        _check_maps(inputs, self.in_channels, type(self).__name__)
        laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(inputs[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: each level adds the (already summed) level above
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(laterals[i]) for i, conv in enumerate(self.fpn_convs)]
        outs.append(laterals[-1])  # the PPM output is used as-is at the top level
        size = outs[0].shape[2:]
        outs = [outs[0]] + [_resize(o, size) for o in outs[1:]]
        return self.cls_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over dim 1 of NCHW maps, computed in fp32 and cast back to the input dtype (§5.5)."""

    def __init__(self, num_channels: int, eps: float = FPN_LN_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        x = x_BChw.float()
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)  # biased variance, as the original
        x = (x - mean) / torch.sqrt(var + self.eps)
        x = self.weight.float()[:, None, None] * x + self.bias.float()[:, None, None]
        return x.to(x_BChw.dtype)


class FPNAdapter(nn.Module):
    """Turns four same-size ViT maps into a x4 / x2 / x1 / x0.5 pyramid (§5.5, with_final_norm=False).

    Outputs stay in the adapter's dtype (the original keeps it in bf16); `Segmentor` casts them to fp32.
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.up1 = nn.Sequential(
            nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2),
            ChannelsFirstLayerNorm(embed_dim),
            nn.GELU(),
            nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2),
        )
        self.up2 = nn.Sequential(nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2))
        self.up3 = nn.Identity()
        self.up4 = nn.MaxPool2d(kernel_size=2, stride=2)
        _init_unless_meta(self)

    @torch.no_grad()
    def init_weights(self) -> None:
        """ConvTranspose ~ N(0, sqrt(2 / fan_out)) with fan_out = kh * kw * out_channels, bias 0; LN ones/zeros."""
        for module in self.modules():
            if isinstance(module, nn.ConvTranspose2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
                nn.init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
                nn.init.zeros_(module.bias)
            elif isinstance(module, ChannelsFirstLayerNorm):
                module.reset_parameters()

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        _check_maps(maps, [self.embed_dim] * 4, type(self).__name__)
        dtype = self.up2[0].weight.dtype
        return [up(m.to(dtype)) for up, m in zip((self.up1, self.up2, self.up3, self.up4), maps, strict=True)]


def seg_cross_entropy(
    logits: torch.Tensor, label: torch.Tensor, *, ignore_index: int = IGNORE_INDEX, avg_non_ignore: bool = False
) -> torch.Tensor:
    """mmseg CrossEntropyLoss on logits upsampled to the label size, in fp32 (§5.6).

    The per-pixel CE is summed over valid pixels and divided by ALL B*H*W pixels (mmseg's default), or by the valid
    pixels when avg_non_ignore=True (plus fp32 eps, as mmseg, so an all-ignored batch gives 0, not NaN).
    """
    if label.ndim == 4 and label.shape[1] == 1:
        label = label[:, 0]
    if logits.ndim != 4 or label.ndim != 3 or logits.shape[0] != label.shape[0]:
        raise ValueError(
            f"need logits (B, K, h, w) and labels (B, H, W), got {tuple(logits.shape)} and {tuple(label.shape)}"
        )
    logits = logits.float()
    if logits.shape[-2:] != label.shape[-2:]:
        logits = _resize(logits, label.shape[-2:])
    label = label.long()
    per_pixel = F.cross_entropy(logits, label, ignore_index=ignore_index, reduction="none")  # ignored pixels: 0
    if not avg_non_ignore:
        return per_pixel.mean()
    num_valid = (label != ignore_index).sum()
    return per_pixel.sum() / (num_valid + torch.finfo(torch.float32).eps)
