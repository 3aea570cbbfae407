"""Encoder-decoder segmentor on InternViT taps and mmseg's sliding-window inference (docs/protocol.md §5.3, 5.5, 5.6).

Module names follow the released mmseg checkpoints (`backbone.*`, `decode_head.*`, `auxiliary_head.*`), except the
FPN adapter: the original builds it inside the backbone (`backbone.up1.*`, `backbone.up2.*`); here it is
`fpn.up1.*`, `fpn.up2.*`, so that the backbone stays pure. A checkpoint key map therefore renames
`backbone.up{1,2}.` -> `fpn.up{1,2}.`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from internvit.errors import InternViTError
from internvit.segmentation.heads import IGNORE_INDEX, FPNAdapter, seg_cross_entropy

CROP = 504  # test_cfg mode 'slide' (§5.3)
STRIDE = 322


class Segmentor(nn.Module):
    """Backbone taps (patch tokens as NCHW maps) -> optional FPN adapter -> decode head (+ auxiliary head for the loss).

    `decode_head` receives the list of fp32 maps (one per entry of `out_indices`, FPN levels if `fpn` is given);
    `aux_head` receives the single map `maps[aux_index]` (FPN level 1 for head tuning, 2 for full tuning, §5.6).
    """

    def __init__(
        self,
        backbone: nn.Module,
        decode_head: nn.Module,
        *,
        out_indices: Sequence[int],
        fpn: FPNAdapter | None = None,
        aux_head: nn.Module | None = None,
        aux_index: int | None = None,
        aux_weight: float = 0.4,
    ) -> None:
        super().__init__()
        self.out_indices = [int(i) for i in out_indices]
        if not self.out_indices:
            raise InternViTError("out_indices is empty", fix="tap at least one block, e.g. [44] or [11, 23, 35, 47]")
        if fpn is not None and len(self.out_indices) != 4:
            raise InternViTError(
                f"the FPN adapter needs 4 tapped blocks, got out_indices {self.out_indices}",
                fix="use 4 out_indices (e.g. [11, 23, 35, 47]) or no fpn",
            )
        if (aux_head is None) != (aux_index is None):
            raise InternViTError("aux_head and aux_index go together", fix="give both (e.g. aux_index=1) or neither")
        num_maps = len(self.out_indices)
        if aux_index is not None and not -num_maps <= aux_index < num_maps:
            raise InternViTError(
                f"aux_index {aux_index} is out of range for {num_maps} feature map(s)",
                fix=f"use an index in [0, {num_maps})",
            )
        self.backbone = backbone
        self.fpn = fpn
        self.decode_head = decode_head
        self.auxiliary_head = aux_head
        self.aux_index = aux_index
        self.aux_weight = aux_weight
        # mmseg's default loss normalisation (docs/protocol.md §5.6); True = mean over the valid pixels
        self.avg_non_ignore = False
        self.ignore_index = IGNORE_INDEX  # the label value left out of the loss and the pixel accuracy
        self.backbone_autocast: torch.dtype | None = None  # set for a fine-tuned fp32 backbone run in bf16

    def extract_features(self, x_BCHW: torch.Tensor) -> list[torch.Tensor]:
        """The tapped patch-token maps (cls dropped), through the FPN if any, as contiguous fp32 tensors."""
        dtype = self.backbone_autocast
        with torch.autocast(x_BCHW.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            taps = self.backbone.get_intermediate_layers(x_BCHW, self.out_indices, output="nchw")
        maps = [feature_map for _cls, feature_map in taps]
        if self.fpn is not None:
            maps = self.fpn(maps)
        return [m.float().contiguous() for m in maps]

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Decode-head logits at the head's own resolution (e.g. 36x36 linear, 144x144 UperNet for a 504 crop)."""
        return self.decode_head(self.extract_features(x_BCHW))

    def loss(self, x_BCHW: torch.Tensor, label_BHW: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training losses (§5.6) plus the decode head's pixel accuracy, as a dict of scalars.

        Keys: "loss" = decode + aux_weight * aux, "decode", "aux" (only with an aux head), "acc_seg" (% of
        non-ignored pixels the decode head gets right, as mmseg logs it; detached).
        """
        if label_BHW.ndim == 4 and label_BHW.shape[1] == 1:
            label_BHW = label_BHW[:, 0]
        maps = self.extract_features(x_BCHW)
        logits = self.decode_head(maps)
        logits = F.interpolate(logits.float(), size=label_BHW.shape[-2:], mode="bilinear", align_corners=False)
        label_BHW = label_BHW.long()
        decode = seg_cross_entropy(
            logits, label_BHW, ignore_index=self.ignore_index, avg_non_ignore=self.avg_non_ignore
        )
        out = {"loss": decode, "decode": decode}
        if self.auxiliary_head is not None:
            aux = seg_cross_entropy(
                self.auxiliary_head(maps[self.aux_index]),
                label_BHW,
                ignore_index=self.ignore_index,
                avg_non_ignore=self.avg_non_ignore,
            )
            out["aux"] = aux
            out["loss"] = decode + self.aux_weight * aux
        with torch.no_grad():
            valid = label_BHW != self.ignore_index
            hits = (logits.argmax(1) == label_BHW) & valid
            out["acc_seg"] = 100.0 * hits.sum() / valid.sum().clamp_min(1)
        return out


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (int(value), int(value)) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be a positive int or an (h, w) pair, got {value!r}")
    return pair  # type: ignore[return-value]


def window_grid(
    h: int, w: int, crop: int | Sequence[int] = CROP, stride: int | Sequence[int] = STRIDE
) -> list[tuple[int, int, int, int]]:
    """Sliding windows (y1, y2, x1, x2), row-major, exactly as mmseg's slide_inference (§5.3).

    n = max(H - crop + stride - 1, 0) // stride + 1 per side; window i starts at i*stride, is clipped to the image and
    shifted back to a full crop where it would overhang. A side shorter than the crop gets one window of that side.
    """
    (crop_h, crop_w), (stride_h, stride_w) = _pair(crop, "crop"), _pair(stride, "stride")
    if stride_h > crop_h or stride_w > crop_w:
        raise ValueError(f"stride {stride} larger than crop {crop} would leave pixels no window covers")
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {h}x{w}")

    def spans(size: int, crop_len: int, step: int) -> list[tuple[int, int]]:
        out = []
        for i in range(max(size - crop_len + step - 1, 0) // step + 1):
            end = min(i * step + crop_len, size)
            out.append((max(end - crop_len, 0), end))
        return out

    return [(y1, y2, x1, x2) for y1, y2 in spans(h, crop_h, stride_h) for x1, x2 in spans(w, crop_w, stride_w)]


@torch.no_grad()
def slide_inference(
    segmentor: Callable[[torch.Tensor], torch.Tensor],
    img_BCHW: torch.Tensor,
    *,
    num_classes: int,
    crop: int | Sequence[int] = CROP,
    stride: int | Sequence[int] = STRIDE,
) -> torch.Tensor:
    """Logits (B, num_classes, H, W) in fp32 at the input size, averaged over overlapping windows (§5.3).

    Each window's logits are bilinearly upsampled (align_corners False) to the window size, summed into a canvas and
    divided by the per-pixel window count. An image side shorter than the crop is covered by one window of its actual
    size (as mmseg, which does not pad at test time); InternViT runs it on its smaller grid with resized position
    embeddings, so the side must still be a multiple of 14. Put the segmentor in eval mode first.
    """
    if img_BCHW.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(img_BCHW.shape)}")
    batch, _, h, w = img_BCHW.shape
    logits_sum = torch.zeros(batch, num_classes, h, w, dtype=torch.float32, device=img_BCHW.device)
    count = torch.zeros(1, 1, h, w, dtype=torch.float32, device=img_BCHW.device)
    for y1, y2, x1, x2 in window_grid(h, w, crop, stride):
        out = segmentor(img_BCHW[:, :, y1:y2, x1:x2])
        if out.ndim != 4 or tuple(out.shape[:2]) != (batch, num_classes):
            raise ValueError(f"segmentor returned {tuple(out.shape)}, expected ({batch}, {num_classes}, h, w)")
        out = F.interpolate(out.float(), size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)
        logits_sum[:, :, y1:y2, x1:x2] += out
        count[:, :, y1:y2, x1:x2] += 1
    return logits_sum / count


@torch.no_grad()
def predict_probs(
    segmentor: Callable[[torch.Tensor], torch.Tensor],
    img: torch.Tensor | Sequence[torch.Tensor],
    ori_size: Sequence[int],
    *,
    num_classes: int,
    crop: int | Sequence[int] = CROP,
    stride: int | Sequence[int] = STRIDE,
    flip: bool = False,
) -> torch.Tensor:
    """Class probabilities (1, K, H0, W0) for one test image, averaged over its test views (mmseg's aug_test).

    `img` is one normalised image, or one per test scale: each scale, and its horizontal flip with `flip`, gives
    slide logits bilinearly resized to ori_size and a softmax (a flipped view's flipped back); the sum is divided by
    the number of views. One view without flip is mmseg's simple_test.
    """
    images = [img] if isinstance(img, torch.Tensor) else list(img)
    if not images:
        raise ValueError("predict needs at least one image")
    h0, w0 = _pair(tuple(ori_size), "ori_size")
    probs = None
    for image in images:
        if image.ndim == 3:
            image = image.unsqueeze(0)
        if image.ndim != 4 or image.shape[0] != 1:
            raise ValueError(f"predict takes one image, (C, H, W) or (1, C, H, W), got {tuple(image.shape)}")
        for flipped in (False, True) if flip else (False,):
            view = image.flip(-1) if flipped else image
            logits = slide_inference(segmentor, view, num_classes=num_classes, crop=crop, stride=stride)
            logits = F.interpolate(logits, size=(h0, w0), mode="bilinear", align_corners=False)
            view_probs = logits.softmax(dim=1)
            view_probs = view_probs.flip(-1) if flipped else view_probs
            probs = view_probs if probs is None else probs + view_probs
    return probs / (len(images) * (2 if flip else 1))


@torch.no_grad()
def predict(
    segmentor: Callable[[torch.Tensor], torch.Tensor],
    img: torch.Tensor | Sequence[torch.Tensor],
    ori_size: Sequence[int],
    *,
    num_classes: int,
    crop: int | Sequence[int] = CROP,
    stride: int | Sequence[int] = STRIDE,
    flip: bool = False,
) -> torch.Tensor:
    """Class map (H0, W0) int64 for one test image: the arg-max of `predict_probs`.

    The softmax can change the arg-max of a single view only where rounding ties; kept for exact mmseg parity.
    """
    probs = predict_probs(segmentor, img, ori_size, num_classes=num_classes, crop=crop, stride=stride, flip=flip)
    return probs[0].argmax(dim=0)
