"""Strict loading into our model with a readable report, and preset matching from tensor shapes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from internvit.errors import InternViTError
from internvit.model import PRESETS, InternViT, InternViTConfig, build_model, get_config, resize_pos_embed
from internvit.weights.files import RawCheckpoint, locate_checkpoint, read_checkpoint, read_header
from internvit.weights.integrity import check_finite
from internvit.weights.keymaps import NativeState, to_native, unwrap

log = logging.getLogger(__name__)
# Shape-revealed fields a checkpoint must share with its preset; resolution and patch size are resized instead (§1.7).
_INFERABLE = ("embed_dim", "depth", "mlp_hidden_dim", "in_chans", "norm_type", "qkv_bias", "qk_norm")
# An explicit config is built exactly as given: only the position grid is resized to it, so the patch size must match.
_CONFIG_FIELDS = (*_INFERABLE, "patch_size")


@dataclass
class LoadReport:
    """What happened to every key: loaded, missing, unexpected, shape-mismatched, resized or set aside on purpose."""

    source: str
    layout: str
    preset: str | None = None
    num_loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    resized: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    set_aside: dict[str, str] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"loaded {self.num_loaded} tensors from {self.source} (layout: {self.layout}, preset: {self.preset})"]
        for key, old, new in self.resized:
            lines.append(f"  resized     {key}: {tuple(old)} -> {tuple(new)} (bicubic)")
        for key, ckpt, model in self.mismatched:
            lines.append(f"  mismatched  {key}: checkpoint {tuple(ckpt)} vs model {tuple(model)}")
        lines += [f"  missing     {key}" for key in self.missing]
        lines += [f"  unexpected  {key}" for key in self.unexpected]
        reasons: dict[str, list[str]] = {}
        for key, reason in self.set_aside.items():
            reasons.setdefault(reason, []).append(key)
        lines += [f"  set aside   {len(keys)} key(s): {reason}" for reason, keys in reasons.items()]
        return "\n".join(lines)


def infer_architecture(state: dict[str, torch.Tensor]) -> dict[str, object]:
    """The architecture fields that tensor shapes reveal (heads and LayerScale init cannot be read from shapes)."""
    try:
        patch = state["patch_embed.proj.weight"]
        grid = state["pos_embed"].shape[1] - 1
        return {
            "embed_dim": patch.shape[0],
            "depth": 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks.")),
            "mlp_hidden_dim": state["blocks.0.mlp.fc1.weight"].shape[0],
            "patch_size": patch.shape[-1],
            "in_chans": patch.shape[1],
            "norm_type": "layer_norm" if "blocks.0.norm1.bias" in state else "rms_norm",
            "qkv_bias": "blocks.0.attn.qkv.bias" in state,
            "qk_norm": "blocks.0.attn.q_norm.weight" in state,
            "grid_size": round(grid**0.5),
            "img_size": round(grid**0.5) * patch.shape[-1],
        }
    except (KeyError, ValueError, IndexError) as e:
        raise InternViTError(
            f"checkpoint lacks a core backbone tensor ({e})", fix="pass a complete InternViT backbone checkpoint"
        ) from e


def match_presets(arch: dict[str, object]) -> list[str]:
    """Presets whose architecture fits; those at the checkpoint's native resolution come first."""
    fits = [n for n, c in PRESETS.items() if all(getattr(c, f) == arch[f] for f in _INFERABLE)]
    return sorted(fits, key=lambda n: PRESETS[n].img_size != arch["img_size"])


def _first_tensor_mismatch(state: dict[str, torch.Tensor], config: InternViTConfig, label: str) -> str:
    """`; e.g. KEY: checkpoint SHAPE vs LABEL SHAPE` for the first tensor whose shape differs from `config`'s model
    (built on the meta device: no memory), else the first block tensor only one of them has; the position embedding
    (and for a preset the patch kernel) is resized on load, so not compared."""
    with torch.device("meta"):
        own = InternViT(config).state_dict()
    resized = ("pos_embed", "patch_embed.proj.weight") if label == "preset" else ("pos_embed",)
    for key, want in own.items():
        have = state.get(key)
        if key not in resized and have is not None and have.shape != want.shape:
            return f"; e.g. {key}: checkpoint {tuple(have.shape)} vs {label} {tuple(want.shape)}"
    extra = next((k for k in state if k.startswith("blocks.") and k not in own), None)
    if extra is not None:
        return f"; e.g. {extra}: in the checkpoint, not in the {label}"
    lacking = next((k for k in own if k not in state), None)
    return f"; e.g. {lacking}: in the {label}, not in the checkpoint" if lacking else ""


def _fit_problems(
    arch: dict[str, object],
    config: InternViTConfig,
    state: dict[str, torch.Tensor] | None,
    *,
    label: str = "preset",
    fields: tuple[str, ...] = _INFERABLE,
) -> str | None:
    diffs = [f"{f} {arch[f]} vs {getattr(config, f)}" for f in fields if getattr(config, f) != arch[f]]
    if not diffs:
        return None
    shape = _first_tensor_mismatch(state, config, label) if state is not None else ""
    return f"{'; '.join(diffs)} (checkpoint vs {label}){shape}"


def _fit_hint(arch: dict[str, object]) -> str:
    fits = match_presets(arch)
    return f"use preset {fits[0]!r}" if fits else "pass the preset this checkpoint was trained with"


def check_fits(arch: dict[str, object], preset: str, state: dict[str, torch.Tensor] | None = None) -> None:
    """Raise a clear error if a checkpoint cannot be loaded into `preset` (resolution differences are fine); with
    the checkpoint's (native-layout) `state`, the error also shows the first tensor of the wrong shape."""
    problems = _fit_problems(arch, get_config(preset), state)
    if problems:
        raise InternViTError(
            f"checkpoint does not fit preset {preset!r}: {problems}",
            fix=f"{_fit_hint(arch)}, or omit the preset to detect it",
        )


def check_config_fits(
    arch: dict[str, object], config: InternViTConfig, state: dict[str, torch.Tensor] | None = None
) -> None:
    """Raise a clear error naming what differs if a checkpoint cannot be loaded into the model of `config` (only
    its resolution may differ); with the checkpoint's (native-layout) `state`, also the first tensor that differs."""
    problems = _fit_problems(arch, config, state, label="config", fields=_CONFIG_FIELDS)
    if problems:
        wanted = ", ".join(f"{f}={arch[f]!r}" for f in _CONFIG_FIELDS if getattr(config, f) != arch[f])
        fits = match_presets(arch)
        preset = f", or load it as preset {fits[0]!r} instead of a config" if fits else ""
        raise InternViTError(
            f"checkpoint does not fit the given config: {problems}",
            fix=f"build the InternViTConfig with {wanted} (and the num_heads it was trained with){preset}",
        )


def _check_named_preset(path: Path, named: str, arch: dict[str, object], state: dict[str, torch.Tensor]) -> None:
    """Raise a clear error if the preset a file's header names does not fit its tensor shapes."""
    problems = _fit_problems(arch, get_config(named), state)
    if problems:
        raise InternViTError(
            f"{path}: its header names preset {named!r}, but its tensors do not fit it: {problems}",
            fix=f"the header is wrong: {_fit_hint(arch)} (pass it as the preset), or convert the original checkpoint "
            "again",
        )


def check_header(path: Path, preset: str | None = None, config: InternViTConfig | None = None) -> None:
    """Check the architecture to build against the tensor shapes in a safetensors header (no tensor data is read),
    so a wrong one fails at once instead of after reading the weights and building the model. It is `config`, else
    `preset` (asked for, or a tag's), else the preset our files name in their metadata; pickles have no header."""
    header = read_header(path)
    if header is None:
        return
    metadata, shapes = header
    named = metadata.get("preset") if metadata.get("preset") in PRESETS else None
    if (config or preset or named) is None:
        return
    try:
        state = to_native(unwrap(shapes)).state
        arch = infer_architecture(state)
    except InternViTError:
        return  # not a backbone: reading it says so, with the same error
    if config is not None:
        check_config_fits(arch, config, state)
        return
    if preset is not None:
        check_fits(arch, preset, state)
        return
    _check_named_preset(path, named, arch, state)


def _adapt_shapes(state: dict[str, torch.Tensor], model: InternViT, report: LoadReport) -> dict[str, torch.Tensor]:
    """Resize pos_embed to the model grid and the patch kernel to the model patch size (§1.7 steps 2-3)."""
    state = dict(state)
    pos = state.get("pos_embed")
    if pos is not None and pos.ndim == 3 and pos.shape[2] == model.embed_dim and pos.shape != model.pos_embed.shape:
        side = model.config.grid_size
        state["pos_embed"] = resize_pos_embed(pos, (side, side))
        report.resized.append(("pos_embed", tuple(pos.shape), tuple(state["pos_embed"].shape)))
        if pos.shape[1] > model.pos_embed.shape[1]:
            log.warning("pos_embed is downsampled from %d to %d positions (lossy)", pos.shape[1] - 1, side * side)
    kernel = state.get("patch_embed.proj.weight")
    target = model.patch_embed.proj.weight.shape
    if kernel is not None and kernel.shape[:2] == target[:2] and kernel.shape != target:
        state["patch_embed.proj.weight"] = F.interpolate(
            kernel.float(), size=tuple(target[-2:]), mode="bicubic", align_corners=False
        ).to(kernel.dtype)
        report.resized.append(("patch_embed.proj.weight", tuple(kernel.shape), tuple(target)))
    return state


@torch.no_grad()
def load_state_into(model: nn.Module, native: NativeState, *, strict: bool = True, source: str = "") -> LoadReport:
    """Copy a native-layout state into `model`; strict (default) raises on any missing/unexpected/mismatched key."""
    report = LoadReport(source=source, layout=native.layout, set_aside=dict(native.set_aside), extras=native.extras)
    state = _adapt_shapes(native.state, model, report) if isinstance(model, InternViT) else dict(native.state)
    own = model.state_dict()
    report.missing = sorted(set(own) - set(state))
    report.unexpected = sorted(set(state) - set(own))
    report.mismatched = [
        (k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape
    ]
    if strict and not report.ok:
        raise InternViTError(
            f"checkpoint does not match the model:\n{report}",
            fix="pick the preset the checkpoint was trained with, or load with strict=False",
        )
    loadable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(loadable, strict=False)
    report.num_loaded = len(loadable)
    return report


def read_native(
    source: str | Path,
    *,
    preset: str | None = None,
    config: InternViTConfig | None = None,
    verify_hash: bool = True,
    header_check: bool = True,
) -> tuple[NativeState, RawCheckpoint]:
    """Read any supported checkpoint and bring it into our layout; also returns what was read (files, metadata).

    With `header_check`, a safetensors checkpoint's shapes are first checked against `config`, else `preset` (else
    a tag's, else the preset in its header) from the header alone (`check_header`). `verify_hash`: see
    `read_checkpoint`.
    """
    path, tag = locate_checkpoint(source)
    if header_check:
        check_header(path, preset or (tag.preset if tag else None), config)
    raw = read_checkpoint(path, verify_hash=verify_hash)
    raw.tag = tag
    return to_native(unwrap(raw.tensors)), raw


def resolve_preset(native: NativeState, preset: str | None, raw: RawCheckpoint) -> str:
    """The preset to build: the one asked for (checked against the shapes), else the file's or tag's, else matched."""
    arch = infer_architecture(native.state)
    preset = preset or (raw.tag.preset if raw.tag else None)
    if preset is not None:
        check_fits(arch, preset, native.state)
        return preset
    named = raw.metadata.get("preset")
    if named in PRESETS:
        _check_named_preset(raw.files[0], named, arch, native.state)
        return named
    fits = match_presets(arch)
    if not fits:
        shown = ", ".join(f"{k}={v}" for k, v in arch.items())
        raise InternViTError(
            f"no preset has this checkpoint's architecture ({shown})",
            fix="build an InternViTConfig by hand and use load_state_into()",
        )
    same = [n for n in fits if PRESETS[n] == PRESETS[fits[0]]]
    if len(same) > 1:  # e.g. the four 448px releases share one architecture: the name is only a label
        log.warning(
            "checkpoint fits %d presets of one architecture (%s); naming it %s: pass a preset to record "
            "the exact release",
            len(same),
            ", ".join(same),
            fits[0],
        )
    return fits[0]


def load_model(
    source: str | Path,
    *,
    preset: str | None = None,
    config: InternViTConfig | None = None,
    img_size: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    strict: bool = True,
    drop_path_rate: float | None = None,
    verify_hash: bool = True,
) -> tuple[InternViT, LoadReport]:
    """Build the right preset, or exactly the architecture `config` describes, and load a checkpoint of any layout.

    Without `config` the preset is `preset`, else the file's or tag's, else the one the tensor shapes match; with
    `config` (a custom architecture: not both) there is no preset detection, and a checkpoint whose shapes do not
    fit it is refused naming what differs (`num_heads` cannot be read from shapes: it is taken as given).
    `img_size` defaults to the checkpoint's own resolution (the grid of its pos_embed), so nothing is resized
    unless asked for; a different size resizes the position embedding once, bicubically (docs/protocol.md §1.7).
    `drop_path_rate` replaces the config's or preset's (0 for every preset) when given.

    Checked before any model is built: the preset or config against a safetensors header's shapes (no data read),
    the `content_sha256` of our safetensors files (`verify_hash=False`, or INTERNVIT_SKIP_HASH_CHECK=1 in the
    environment, skips this pass over the bytes), and that no floating tensor holds NaN / Inf.
    """
    if preset is not None and config is not None:
        raise InternViTError(
            f"both a preset ({preset!r}) and a config were given",
            fix="pass one: a preset names a released architecture, a config builds exactly the one it describes",
        )
    native, raw = read_native(source, preset=preset, config=config, verify_hash=verify_hash)
    check_finite(native.state, raw.files[0])
    arch = infer_architecture(native.state)
    if config is None:
        preset = resolve_preset(native, preset, raw)
        config = get_config(preset)
    else:
        check_config_fits(arch, config, native.state)
    config = config.replace(img_size=img_size or int(arch["grid_size"]) * config.patch_size)
    if drop_path_rate is not None:
        config = config.replace(drop_path_rate=drop_path_rate)
    model = build_model(config, device=device, dtype=dtype, init=not strict)
    report = load_state_into(model, native, strict=strict, source=str(source))
    report.preset = preset
    log.info("%s", report)
    return model, report


def load_or_init_model(
    source: str,
    *,
    preset: str | None,
    img_size: int,
    device: torch.device | str = "cpu",
    seed: int = 0,
    drop_path_rate: float = 0.0,
) -> tuple[InternViT, LoadReport | None]:
    """`load_model`, or for source "random" a seeded random init of `preset` (default: debug), for tests and demos."""
    if source != "random":
        return load_model(source, preset=preset, img_size=img_size, device=device, drop_path_rate=drop_path_rate)
    torch.manual_seed(seed)
    config = get_config(preset or "debug").replace(img_size=img_size, drop_path_rate=drop_path_rate)
    return build_model(config, device=device), None
