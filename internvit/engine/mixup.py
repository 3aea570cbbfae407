"""Batch-mode Mixup/CutMix with label smoothing (timm `Mixup(mode="batch")` semantics) and the soft-target loss.

The original probing recipe inherits these defaults (docs/protocol.md §4.1, §7.1). Randomness comes from a private
NumPy RandomState seeded explicitly: it makes exactly timm's draws (rand, rand, beta, randint, randint, in that
order), so a `Mixup(seed=s)` reproduces timm after `np.random.seed(s)`, and its state is saved and restored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["MixParams", "Mixup", "rand_bbox", "smoothed_one_hot", "soft_target_cross_entropy"]


@dataclass(frozen=True)
class MixParams:
    """One batch's mixing decision: final weight `lam` of the batch itself (1.0 = untouched; for CutMix already
    corrected to the box area when correct_lam) and, for CutMix, the pasted box (yl, yh, xl, xh)."""

    lam: float
    use_cutmix: bool = False
    box: tuple[int, int, int, int] | None = None


def rand_bbox(rng: np.random.RandomState, height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """timm 0.9.12's CutMix box (the version the original pins): side sqrt(1 - lam) of the image, centre uniform over
    pixels, half-sides `cut // 2` on both sides, clipped to the image. (Later timm versions give the high side
    `(cut + 1) // 2`, a box one pixel larger where a side is odd.)"""
    ratio = np.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy = rng.randint(0, height)
    cx = rng.randint(0, width)
    yl = int(np.clip(cy - cut_h // 2, 0, height))
    yh = int(np.clip(cy + cut_h // 2, 0, height))
    xl = int(np.clip(cx - cut_w // 2, 0, width))
    xh = int(np.clip(cx + cut_w // 2, 0, width))
    return yl, yh, xl, xh


def smoothed_one_hot(target: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """fp32 one-hot rows with off = smoothing / num_classes and on = 1 - smoothing + off (timm `one_hot`)."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    out = torch.full((target.shape[0], num_classes), off, dtype=torch.float32, device=target.device)
    return out.scatter_(1, target.long().view(-1, 1), on)


def soft_target_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of sum_c -t_c log_softmax(logits)_c, computed in fp32 (timm SoftTargetCrossEntropy)."""
    if logits.shape != soft_targets.shape or logits.ndim != 2:
        raise ValueError(
            f"logits and soft_targets must both be (batch, classes); got {tuple(logits.shape)} "
            f"and {tuple(soft_targets.shape)}"
        )
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return torch.sum(-soft_targets.float() * log_probs, dim=-1).mean()


class Mixup:
    """One Mixup-or-CutMix draw per batch, partner = the batch reversed, targets smoothed then mixed with the same lam.

    With probability `prob` the batch is mixed; if both alphas are > 0, CutMix is chosen with `switch_prob`, else the
    active one. lam ~ Beta(alpha, alpha). CutMix pastes the reversed batch into a `rand_bbox` box and, with
    `correct_lam`, sets lam = 1 - box area / image area (the clipped box). Returns new tensors; inputs are untouched.
    Seed each data-parallel rank differently (e.g. seed + rank): timm's batch mode draws one lam per per-GPU batch.
    """

    def __init__(
        self,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: str = "batch",
        correct_lam: bool = True,
        label_smoothing: float = 0.1,
        num_classes: int = 1000,
        *,
        seed: int = 0,
    ) -> None:
        if mode != "batch":
            raise ValueError(f"mode: only 'batch' (one lam per batch, the original recipe) is supported, got {mode!r}")
        if mixup_alpha < 0 or cutmix_alpha < 0 or (mixup_alpha == 0 and cutmix_alpha == 0):
            raise ValueError(f"need mixup_alpha > 0 or cutmix_alpha > 0 (both >= 0); got {mixup_alpha}, {cutmix_alpha}")
        for name, value in (("prob", prob), ("switch_prob", switch_prob), ("label_smoothing", label_smoothing)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.prob = prob
        self.switch_prob = switch_prob
        self.mode = mode
        self.correct_lam = correct_lam
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes
        self.rng = np.random.RandomState(seed)

    def sample_params(self, height: int, width: int) -> MixParams:
        """Draw one batch's parameters in timm's order (`_params_per_batch`, then `cutmix_bbox_and_lam`)."""
        if not self.rng.rand() < self.prob:
            return MixParams(lam=1.0)
        use_cutmix = False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(self.rng.rand() < self.switch_prob)
            alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        elif self.mixup_alpha > 0:
            alpha = self.mixup_alpha
        else:
            use_cutmix, alpha = True, self.cutmix_alpha
        lam = float(self.rng.beta(alpha, alpha))
        if not use_cutmix or lam == 1.0:  # timm leaves a lam == 1 batch alone and draws no box
            return MixParams(lam=lam)
        box = rand_bbox(self.rng, height, width, lam)
        if self.correct_lam:
            yl, yh, xl, xh = box
            lam = 1.0 - (yh - yl) * (xh - xl) / float(height * width)
        return MixParams(lam=lam, use_cutmix=True, box=box)

    def apply(self, x: torch.Tensor, target: torch.Tensor, params: MixParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix images (B, C, H, W) and integer labels (B,) with given params -> (mixed images, fp32 soft targets)."""
        self._check_batch(x, target)
        if params.lam != 1.0:
            if params.use_cutmix:
                if params.box is None:
                    raise ValueError("MixParams with use_cutmix=True needs a box")
                yl, yh, xl, xh = params.box
                x = x.clone()
                x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
            else:
                x = x * params.lam + x.flip(0) * (1.0 - params.lam)
        y1 = smoothed_one_hot(target.to(x.device), self.num_classes, self.label_smoothing)  # on x's device, as timm
        return x, y1 * params.lam + y1.flip(0) * (1.0 - params.lam)

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw this batch's parameters and mix -> (mixed images, fp32 soft targets (B, num_classes))."""
        self._check_batch(x, target)
        return self.apply(x, target, self.sample_params(x.shape[-2], x.shape[-1]))

    @staticmethod
    def _check_batch(x: torch.Tensor, target: torch.Tensor) -> None:
        """Raise ValueError unless x is (B, C, H, W) with even B and target is (B,) integer labels."""
        if x.ndim != 4:
            raise ValueError(f"Mixup expects images (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[0] % 2 != 0:
            raise ValueError(f"Mixup needs an even batch size (partner = batch reversed), got {x.shape[0]}")
        if target.shape != (x.shape[0],) or target.is_floating_point() or target.is_complex():
            raise ValueError(
                f"Mixup expects integer class labels of shape ({x.shape[0]},), got {target.dtype} {tuple(target.shape)}"
            )

    def state_dict(self) -> dict[str, Any]:
        """The RandomState position as plain tensors/ints, loadable with torch.load(weights_only=True)."""
        _, key, pos, has_gauss, gauss = self.rng.get_state(legacy=True)
        return {
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the RandomState saved by `state_dict`, so a resumed run draws the same sequence."""
        key = np.asarray(state["key"].cpu().numpy() if torch.is_tensor(state["key"]) else state["key"])
        if key.shape != (624,):
            raise ValueError(f"Mixup state 'key' must have 624 entries (MT19937), got shape {key.shape}")
        self.rng.set_state(
            ("MT19937", key.astype(np.uint32), int(state["pos"]), int(state["has_gauss"]), float(state["gauss"]))
        )
