"""Key maps between our layout and every foreign checkpoint layout (docs/protocol.md §1.8, §1.10), in one place.

Our layout is the original InternVL `.pth` layout (`cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.{i}.*`).
Foreign layouts:
  hf_internvit  the HF remote-code `InternVisionModel` (`embeddings.class_embedding`, `encoder.layers.{i}.ls1`, ...)
  transformers  transformers' native `InternVLVisionModel` (`encoder.layer.{i}.attention.q_proj`, `lambda_1`, ...)
Each rule is a pair of templates, ours and theirs, so that one table serves both directions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from internvit.errors import InternViTError

LAYOUTS = ("internvit", "hf_internvit", "transformers")
WRAPPER_KEYS = ("state_dict", "module", "model")  # dict wrappers seen in .pth files (DDP, mmseg, timm, InternVL)
# Prefixes under which a vision tower sits inside a bigger model (InternVL chat / transformers -hf checkpoints).
VISION_PREFIXES = ("model.vision_tower.", "vision_tower.", "model.vision_model.", "vision_model.")
SET_ASIDE = {
    "clip_projector.": "InternVL-C clip_projector, not part of the backbone (kept for the clip_projector head)"
}

_BLOCK_PARTS = ["norm1", "norm2", "attn.q_norm", "attn.k_norm", "attn.proj", "mlp.fc1", "mlp.fc2"]

_RULES: dict[str, list[tuple[str, str]]] = {
    "hf_internvit": [
        ("cls_token", "embeddings.class_embedding"),
        ("pos_embed", "embeddings.position_embedding"),
        ("patch_embed.proj.{p}", "embeddings.patch_embedding.{p}"),
        ("blocks.{i}.ls1.gamma", "encoder.layers.{i}.ls1"),
        ("blocks.{i}.ls2.gamma", "encoder.layers.{i}.ls2"),
        ("blocks.{i}.attn.qkv.{p}", "encoder.layers.{i}.attn.qkv.{p}"),
        *[(f"blocks.{{i}}.{part}.{{p}}", f"encoder.layers.{{i}}.{part}.{{p}}") for part in _BLOCK_PARTS],
    ],
    "transformers": [
        ("cls_token", "embeddings.cls_token"),
        ("pos_embed", "embeddings.position_embeddings"),
        ("patch_embed.proj.{p}", "embeddings.patch_embeddings.projection.{p}"),
        ("blocks.{i}.ls1.gamma", "encoder.layer.{i}.lambda_1"),
        ("blocks.{i}.ls2.gamma", "encoder.layer.{i}.lambda_2"),
        ("blocks.{i}.norm1.{p}", "encoder.layer.{i}.layernorm_before.{p}"),
        ("blocks.{i}.norm2.{p}", "encoder.layer.{i}.layernorm_after.{p}"),
        ("blocks.{i}.attn.q_norm.{p}", "encoder.layer.{i}.attention.q_norm.{p}"),
        ("blocks.{i}.attn.k_norm.{p}", "encoder.layer.{i}.attention.k_norm.{p}"),
        ("blocks.{i}.attn.proj.{p}", "encoder.layer.{i}.attention.projection_layer.{p}"),
        ("blocks.{i}.mlp.fc1.{p}", "encoder.layer.{i}.mlp.fc1.{p}"),
        ("blocks.{i}.mlp.fc2.{p}", "encoder.layer.{i}.mlp.fc2.{p}"),
        # packed qkv <-> split q/k/v: rows [0, C) are q, [C, 2C) k, [2C, 3C) v (§1.10)
        ("blocks.{i}.attn.qkv.{p}", "encoder.layer.{i}.attention.{qkv}_proj.{p}"),
    ],
}


def _compile(template: str) -> re.Pattern[str]:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pattern.replace(r"\{qkv\}", r"(?P<qkv>[qkv])") + "$")


def _fill(template: str, groups: Mapping[str, str]) -> str:
    for name, value in groups.items():
        template = template.replace("{" + name + "}", value)
    return template


_COMPILED = {
    layout: [(ours, theirs, _compile(ours), _compile(theirs)) for ours, theirs in rules]
    for layout, rules in _RULES.items()
}


@dataclass
class NativeState:
    """A checkpoint brought into our layout, with what was set aside on purpose and why."""

    state: dict[str, torch.Tensor]
    layout: str
    set_aside: dict[str, str] = field(default_factory=dict)  # key -> reason
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # set-aside tensors still useful (clip_projector)


def unwrap(obj: object) -> dict[str, torch.Tensor]:
    """Peel `state_dict` / `module` / `model` wrappers and a DDP `module.` prefix off a loaded checkpoint."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise InternViTError(
            f"checkpoint holds a {type(obj).__name__}, not a state dict", fix="save the model's state_dict()"
        )
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise InternViTError("checkpoint holds no tensors", fix="pass a file that contains the model's state_dict()")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def detect_layout(keys: list[str]) -> str:
    """Which of LAYOUTS a set of (prefix-free) keys is in, or a clear error showing a few keys."""
    if any(k.startswith(("encoder.layer.", "embeddings.cls_token", "embeddings.patch_embeddings.")) for k in keys):
        return "transformers"
    if any(
        k.startswith(("encoder.layers.", "embeddings.class_embedding", "embeddings.patch_embedding.")) for k in keys
    ):
        return "hf_internvit"
    if any(k.startswith(("blocks.", "patch_embed.")) or k in ("pos_embed", "cls_token") for k in keys):
        return "internvit"
    sample = ", ".join(sorted(keys)[:5])
    raise InternViTError(
        f"unrecognised checkpoint layout (first keys: {sample})",
        fix="pass an InternVL .pth, an HF InternViT repo/folder, or a transformers InternVLVisionModel checkpoint",
    )


def _split_vision_tower(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    for prefix in VISION_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            # a clip_projector beside the tower (InternVL-C chat checkpoints) stays with it, to be set aside by name
            keep = (prefix, *SET_ASIDE)
            inside = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(keep)}
            outside = {k: f"outside the vision tower ({prefix}*)" for k in state if not k.startswith(keep)}
            return inside, outside
    return state, {}


def to_native(raw: Mapping[str, torch.Tensor], layout: str | None = None) -> NativeState:
    """Map an unwrapped state dict (any layout, any known prefix) into our layout. Unknown keys pass through

    unchanged so that the strict loader reports them as unexpected.
    """
    state, set_aside = _split_vision_tower(dict(raw))
    layout = layout or detect_layout(list(state))
    extras: dict[str, torch.Tensor] = {}
    for key in list(state):
        for prefix, reason in SET_ASIDE.items():
            if key.startswith(prefix):
                extras[key] = state.pop(key)
                set_aside[key] = reason
    if layout == "internvit":
        return NativeState(state, layout, set_aside, extras)
    if layout not in _COMPILED:
        raise InternViTError(f"unknown layout {layout!r}", fix=f"use one of {', '.join(LAYOUTS)}")
    out: dict[str, torch.Tensor] = {}
    split_parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        for ours, _, _, theirs_re in _COMPILED[layout]:
            m = theirs_re.match(key)
            if m:
                groups = {k: v for k, v in m.groupdict().items() if k != "qkv"}
                if "qkv" in m.groupdict():
                    split_parts.setdefault(_fill(ours, groups), {})[m["qkv"]] = tensor
                else:
                    out[_fill(ours, groups)] = tensor
                break
        else:
            out[key] = tensor
    for key, parts in split_parts.items():
        if set(parts) != {"q", "k", "v"}:
            raise InternViTError(
                f"checkpoint has only the {'/'.join(sorted(parts))} projection(s) for {key}",
                fix="the file is incomplete: re-download or re-export it",
            )
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return NativeState(out, layout, set_aside, extras)


def from_native(state: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Map our layout to a foreign one (for exports and round-trip tests)."""
    if layout == "internvit":
        return dict(state)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        for _, theirs, ours_re, _ in _COMPILED[layout]:
            m = ours_re.match(key)
            if m:
                if "{qkv}" in theirs:
                    for name, chunk in zip("qkv", tensor.chunk(3, dim=0), strict=True):
                        out[_fill(theirs, {**m.groupdict(), "qkv": name})] = chunk.clone()
                else:
                    out[_fill(theirs, m.groupdict())] = tensor
                break
        else:
            out[key] = tensor
    return out
