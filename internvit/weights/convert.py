"""`convert` (any layout -> our safetensors, with a metadata header) and `inspect` (what a checkpoint is)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from internvit.atomic import atomic_path
from internvit.errors import InternViTError
from internvit.model import InternViTConfig
from internvit.weights.integrity import content_sha256, non_finite_tensors
from internvit.weights.loading import infer_architecture, match_presets, read_native, resolve_preset

FORMAT = "internvit"
FORMAT_VERSION = "1"


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    preset: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> dict[str, str]:
    """Convert any supported checkpoint to one safetensors file in our layout; returns the metadata written.

    Set-aside tensors that stay useful (the clip_projector) are kept under their own names.
    """
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise InternViTError(
            f"destination {dst} must end in .safetensors", fix=f"use {dst.with_suffix('.safetensors')}"
        )
    if dst.exists() and not overwrite:
        raise InternViTError(f"{dst} already exists", fix="pass --force to overwrite it, or choose another name")
    native, raw = read_native(src, preset=preset)
    name = resolve_preset(native, preset, raw)
    tensors = {**native.state, **native.extras}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "preset": name,
        "source": str(src),
        "source_layout": native.layout,
        "content_sha256": content_sha256(tensors),
        "set_aside": json.dumps(sorted(k for k in native.set_aside if k not in native.extras)),
    }
    with atomic_path(dst) as tmp:  # an interrupted run never leaves a partial file behind
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    return metadata


def inspect_checkpoint(source: str | Path) -> dict[str, object]:
    """Layout, matching presets, dtypes, sizes and integrity of a checkpoint: reported, never refused.

    `non_finite_tensors` lists the floating tensors holding NaN / Inf (which loading refuses); our files also get
    `sha256_ok` (their content_sha256, which loading verifies); a header preset that does not fit the shapes gives
    `preset` None and the reason in `preset_error`.
    """
    native, raw = read_native(source, verify_hash=False, header_check=False)  # report problems, do not refuse
    arch = infer_architecture(native.state)
    tensors = {**native.state, **native.extras}
    try:
        preset = resolve_preset(native, None, raw) if match_presets(arch) or "preset" in raw.metadata else None
        preset_error = None
    except InternViTError as e:
        preset, preset_error = None, e.message
    info: dict[str, object] = {
        "source": str(source),
        "files": [str(f) for f in raw.files],
        "bytes_on_disk": raw.num_bytes,
        "layout": native.layout,
        "preset": preset,
        "presets_matching": match_presets(arch),
        "architecture": arch,
        "num_tensors": len(tensors),
        "num_backbone_params": sum(t.numel() for t in native.state.values()),
        "dtypes": dict(Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values())),
        "set_aside": sorted(native.set_aside),
        "non_finite_tensors": non_finite_tensors(tensors),
    }
    if preset_error is not None:
        info["preset_error"] = preset_error
    if raw.metadata.get("format") == FORMAT:
        info["metadata"] = raw.metadata
        info["sha256_ok"] = content_sha256(tensors) == raw.metadata.get("content_sha256")
    return info


def build_transformers_model(config: InternViTConfig, *, attn_implementation: str = "sdpa", device: str = "meta"):
    """transformers' InternVLVisionModel with our config's architecture (weights uninitialised on "meta").

    Fill it with `model.load_state_dict(from_native(state, "transformers"), assign=True)`. Needs transformers.
    """
    import transformers

    hf_config = transformers.InternVLVisionConfig(
        hidden_size=config.embed_dim,
        num_attention_heads=config.num_heads,
        intermediate_size=config.mlp_hidden_dim,
        num_hidden_layers=config.depth,
        attention_bias=config.qkv_bias,
        use_qk_norm=config.qk_norm,
        norm_type=config.norm_type,
        layer_norm_eps=config.norm_eps,
        layer_scale_init_value=config.layer_scale_init,
        image_size=config.img_size,
        patch_size=config.patch_size,
        use_mean_pooling=True,
        attn_implementation=attn_implementation,
    )
    with torch.device(device):
        return transformers.InternVLVisionModel(hf_config)
