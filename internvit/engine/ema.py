"""Exponential moving average of a model's whole state dict (timm ModelEma v1 semantics, docs/protocol.md §4.1)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["ModelEma", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The wrapped module of a DDP/DataParallel-style wrapper (anything with `.module`), else the model itself."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


class ModelEma:
    """A frozen deep copy (`.module`, always in eval mode) whose state dict tracks decay*ema + (1 - decay)*model.

    `update(model)` runs after every optimizer step and touches EVERY state-dict entry, as timm ModelEma v1: parameters
    (trainable or frozen) and floating buffers such as BN running stats become `ema * decay + (1 - decay) * model`
    (timm's exact expression and rounding, in each entry's own dtype). Integer buffers (BN num_batches_tracked) are
    copied; timm instead truncates the float blend back into the int, which freezes them near their initial value --
    they only matter for BN with momentum=None. Keys never carry a DDP 'module.' prefix; loading accepts either form.
    Note: even a frozen fp32 entry drifts by rounding (~1e-5 relative over thousands of updates), as in the original.
    """

    def __init__(self, model: nn.Module, decay: float = 0.998) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(unwrap_model(model))
        self.module.eval()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the current model (DDP-wrapped or not) into the average; call after each optimizer step."""
        model_sd = unwrap_model(model).state_dict()
        ema_sd = self.module.state_dict()
        if model_sd.keys() != ema_sd.keys():
            missing, extra = sorted(ema_sd.keys() - model_sd.keys()), sorted(model_sd.keys() - ema_sd.keys())
            raise ValueError(f"model and EMA state dicts differ: missing {missing[:5]}, unexpected {extra[:5]}")
        for key, ema_v in ema_sd.items():
            model_v = model_sd[key].detach()
            if ema_v.is_floating_point() or ema_v.is_complex():
                ema_v.copy_(ema_v * self.decay + (1.0 - self.decay) * model_v)
            else:
                ema_v.copy_(model_v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged model's state dict, without any 'module.' prefix (as the original saves `model_ema`)."""
        return self.module.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> Any:
        """Load an averaged state dict (a "module." prefix on every key is removed); returns missing/unexpected keys."""
        if state_dict and all(k.startswith("module.") for k in state_dict):
            state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
        result = self.module.load_state_dict(state_dict, strict=strict)
        self.module.eval()
        return result
