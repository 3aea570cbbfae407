"""AdamW with BEiT-style layer-wise LR decay and weight-decay groups, as the original segmentation (docs/protocol.md
§5.7).

Parameter names are relative to a segmentor whose backbone sits at `backbone.` (the mmseg layout the original uses):
`backbone.cls_token`, `backbone.pos_embed`, `backbone.patch_embed.*` -> layer 0; `backbone.blocks.{i}.*` -> i + 1;
everything else (FPN adapters, decode/auxiliary heads) -> num_blocks + 1. A group's LR is scaled by
`layer_decay ** (num_blocks + 1 - layer_id)`, stored as `lr_scale`, so `StepScheduler` applies a schedule per group.

Schedule: `internvit.engine.schedule.poly_lr` already is mmcv's Poly with the multiplicative linear warmup of §5.7;
pair it with `StepScheduler(optimizer, partial(poly_lr, ...), lag_one_step=False)` (mmcv sets the LR before each
iteration, from the 0-based iteration index), which multiplies it by each group's `lr_scale`. This equals mmcv's
per-group `(initial_lr - min_lr) * coeff + min_lr` exactly when min_lr == 0, as in every shipped config.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

__all__ = ["build_adamw", "describe_groups", "layer_id", "param_groups"]

log = logging.getLogger(__name__)

_EMBEDDINGS = ("backbone.cls_token", "backbone.pos_embed")
_BLOCK = re.compile(r"^backbone\.blocks\.(\d+)(?:\.|$)")
# Name components inserted by wrappers applied from outside (torch.compile, activation checkpointing, FSDP1); they are
# not part of the parameter's identity, so they are dropped before the rules see a name.
_WRAPPER_PARTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})


def _clean_name(name: str) -> str:
    """Drop wrapper components and a leading DDP `module.` so the layer rules see segmentor-relative names."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_PARTS]
    if parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def layer_id(name: str, num_blocks: int) -> int:
    """BEiT layer index of a segmentor parameter: 0 embeddings, i + 1 for block i, num_blocks + 1 for the rest."""
    if name in _EMBEDDINGS or name.startswith("backbone.patch_embed"):
        return 0
    m = _BLOCK.match(name)
    if m:
        return int(m.group(1)) + 1
    return num_blocks + 1


def _is_no_decay(name: str, param: torch.Tensor, quirk_decay_pos_embed: bool) -> bool:
    """The original's rule: no weight decay for 1-D tensors and biases; pos_embed/cls_token only if the quirk is off."""
    if param.ndim == 1 or name.endswith(".bias"):
        return True
    # The original compares against the bare names, which never match segmentor-relative ones (§5.7, §7.8): so with
    # the quirk on, backbone.pos_embed / backbone.cls_token DO get weight decay.
    if name in ("pos_embed", "cls_token"):
        return True
    return not quirk_decay_pos_embed and name in _EMBEDDINGS


def _check_args(base_lr: float, weight_decay: float, layer_decay: float, num_blocks: int) -> None:
    """Raise ValueError naming the argument that makes no sense."""
    if base_lr <= 0:
        raise ValueError(f"base_lr must be > 0, got {base_lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if layer_decay <= 0:
        raise ValueError(f"layer_decay must be > 0, got {layer_decay}")
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")


def _check_blocks(names: list[str], num_blocks: int, layer_decay: float) -> None:
    """Catch a num_blocks that does not fit the model (it would silently shift every block's LR scale)."""
    indices = [int(m.group(1)) for m in map(_BLOCK.match, names) if m]
    if indices and max(indices) >= num_blocks:
        raise ValueError(f"num_blocks={num_blocks} but the model has backbone.blocks.{max(indices)}")
    if indices and max(indices) + 1 < num_blocks:
        log.warning("num_blocks=%d but the model has only %d backbone blocks", num_blocks, max(indices) + 1)
    if not indices and layer_decay != 1.0:
        log.warning("layer_decay=%s but no parameter is named backbone.blocks.*: every group gets scale 1", layer_decay)


def param_groups(
    model: nn.Module,
    *,
    base_lr: float,
    weight_decay: float,
    layer_decay: float = 1.0,
    num_blocks: int,
    quirk_decay_pos_embed: bool = True,
) -> list[dict[str, Any]]:
    """One optimizer param group per (layer_id, decay / no_decay) of the trainable parameters, in first-seen order.

    Each group: params, param_names, lr (= lr_scale * base_lr), lr_scale, weight_decay, layer_id, name
    (`layer_{id}_decay` / `layer_{id}_no_decay`, the original's group names). Frozen parameters are skipped.
    """
    _check_args(base_lr, weight_decay, layer_decay, num_blocks)
    named = [(_clean_name(n), p) for n, p in model.named_parameters()]
    _check_blocks([n for n, _ in named], num_blocks, layer_decay)
    groups: dict[str, dict[str, Any]] = {}
    for name, param in named:
        if not param.requires_grad:
            continue
        lid = layer_id(name, num_blocks)
        no_decay = _is_no_decay(name, param, quirk_decay_pos_embed)
        key = f"layer_{lid}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            scale = layer_decay ** (num_blocks + 1 - lid)
            groups[key] = {
                "params": [],
                "param_names": [],
                "lr": scale * base_lr,
                "lr_scale": scale,
                "weight_decay": 0.0 if no_decay else weight_decay,
                "layer_id": lid,
                "name": key,
            }
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def build_adamw(
    model: nn.Module,
    *,
    base_lr: float = 4e-5,
    weight_decay: float = 0.05,
    layer_decay: float = 1.0,
    num_blocks: int,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    quirk_decay_pos_embed: bool = True,
) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, ...)`: the segmentation optimizer of §5.7 (defaults: head/full tuning)."""
    groups = param_groups(
        model,
        base_lr=base_lr,
        weight_decay=weight_decay,
        layer_decay=layer_decay,
        num_blocks=num_blocks,
        quirk_decay_pos_embed=quirk_decay_pos_embed,
    )
    if not groups:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    optimizer = torch.optim.AdamW(groups, lr=base_lr, betas=betas, eps=eps, weight_decay=weight_decay)
    for row in describe_groups(optimizer.param_groups):
        log.debug("param group %s", row)
    return optimizer


def _group_decays(group: dict[str, Any]) -> bool:
    """Whether a group is a decay group: by its name (wd may be 0 for all, as in linear probing), else by its wd."""
    name = group.get("name")
    return not name.endswith("_no_decay") if isinstance(name, str) else group["weight_decay"] > 0


def describe_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One plain row per param group (for logs and tests): name, layer_id, decay, counts, lr_scale, lr, weight_decay."""
    return [
        {
            "name": g.get("name", ""),
            "layer_id": g.get("layer_id"),
            "decay": _group_decays(g),
            "num_tensors": len(g["params"]),
            "num_params": sum(p.numel() for p in g["params"]),
            "lr_scale": g.get("lr_scale", 1.0),
            "lr": g["lr"],
            "weight_decay": g["weight_decay"],
        }
        for g in groups
    ]
