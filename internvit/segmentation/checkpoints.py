"""Reading and writing whole-segmentor checkpoints in the mmseg key layout of the original (docs/protocol.md §5.9).

The released files are bare state dicts taken from a DeepSpeed-style `module` entry (`release.py`); mmcv training
checkpoints wrap the same dict as `{"meta": ..., "state_dict": ..., "optimizer": ...}`. All are read safely
(torch.load with weights_only=True, through `internvit.weights.files.read_checkpoint`) and split into parts.

SEG_KEY_MAP: mmseg key (prefix) -> (part, key inside the part). Our segmentor uses the mmseg names unchanged; a part
holds them with the part's prefix removed (`decode_head.conv_seg.weight` -> part decode_head, `conv_seg.weight`):

| mmseg key                                | part           | key in the part / our module                      |
|------------------------------------------|----------------|---------------------------------------------------|
| backbone.cls_token, backbone.pos_embed   | backbone       | cls_token, pos_embed (our InternViT layout, §1.8) |
| backbone.patch_embed.proj.{weight,bias}  | backbone       | patch_embed.proj.{weight,bias}                    |
| backbone.blocks.{i}.*                    | backbone       | blocks.{i}.*                                      |
| backbone.up1.{0,1,3}.*, backbone.up2.0.* | fpn            | up1.{0,1,3}.*, up2.0.* (assumption 1)             |
| backbone.up1.4.*, backbone.up{2,3,4}.1.* | fpn            | only with with_final_norm=True (never shipped)    |
| decode_head.*                            | decode_head    | * (e.g. conv_seg.*, norm.*; see below)            |
| auxiliary_head.*                         | auxiliary_head | * (e.g. convs.0.conv.weight, conv_seg.*)          |
| anything else                            | other          | the key as is (reported, never loaded silently)   |

Inside the heads (mmseg 0.30 names, kept as our module names):
  Linear head (custom FCNHead, num_convs 0, with_norm): norm.{weight,bias,running_mean,running_var,num_batches_tracked},
    conv_seg.{weight,bias}. The original names its SyncBatchNorm `norm`; that our linear head also calls it `norm`
    is assumption 2.
  UPerHead: psp_modules.{j}.1.{conv,bn}.*, bottleneck.{conv,bn}.*, lateral_convs.{i}.{conv,bn}.*,
    fpn_convs.{i}.{conv,bn}.*, fpn_bottleneck.{conv,bn}.*, conv_seg.{weight,bias} (ConvModule: conv without bias,
    SyncBN named `bn`).
  Auxiliary FCNHead (num_convs 1): convs.0.{conv,bn}.*, conv_seg.{weight,bias}.

Assumptions (the released files are not available to check, §5.9 "exact format UNKNOWN"):
  1. The FPN adapters live inside the original backbone as `nn.Sequential`s (up1 = ConvT, LayerNorm2d, GELU, ConvT;
     up2 = ConvT; up3/up4 have no parameters), so their keys are `backbone.up{k}.{index}.*`; our FPN module is
     assumed to keep those Sequential indices (`up1.0`, `up1.1`, `up1.3`, `up2.0`), else a rename table is needed here.
  2. Head key names are mmseg's (`decode_head.conv_seg.*`, `decode_head.norm.*`, ...), used unchanged by our heads.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from internvit.atomic import atomic_path
from internvit.engine.checkpoint import read_run_state
from internvit.engine.config import config_from_dict, load_config, to_dict
from internvit.errors import InternViTError
from internvit.segmentation.config import SegmentationConfig
from internvit.segmentation.segmentor import Segmentor
from internvit.weights.files import read_checkpoint
from internvit.weights.integrity import check_finite
from internvit.weights.keymaps import WRAPPER_KEYS, detect_layout, unwrap

__all__ = [
    "PARTS",
    "SEG_KEY_MAP",
    "SegCheckpointReport",
    "load_segmentation_checkpoint",
    "export_segmentor",
    "load_segmentor_weights",
    "save_segmentation_checkpoint",
    "save_segmentor",
    "split_segmentor_state",
    "trainable_state",
]

log = logging.getLogger(__name__)
Tensors = dict[str, torch.Tensor]

PARTS = ("backbone", "fpn", "decode_head", "auxiliary_head", "other")
# mmseg prefix -> (part, prefix inside the part); the first match wins, so the FPN rules precede `backbone.`.
SEG_KEY_MAP: tuple[tuple[str, str, str], ...] = (
    *((f"backbone.up{k}.", "fpn", f"up{k}.") for k in range(1, 5)),
    ("backbone.", "backbone", ""),
    ("decode_head.", "decode_head", ""),
    ("auxiliary_head.", "auxiliary_head", ""),
)
_SCALAR_META = (str, int, float, bool)


@dataclass
class SegCheckpointReport:
    """What a segmentation checkpoint held: its wrappers, tensors per part, keys left over and its metadata."""

    source: str
    wrappers: list[str] = field(default_factory=list)  # e.g. ["state_dict"] or ["module"]; [] for a bare state dict
    num_tensors: dict[str, int] = field(default_factory=dict)
    other: list[str] = field(default_factory=list)  # keys outside backbone/decode_head/auxiliary_head
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors header
    meta: dict[str, object] = field(default_factory=dict)  # scalar entries of an mmcv `meta` dict (iter, epoch, ...)

    def __str__(self) -> str:
        wrapped = " > ".join(self.wrappers) or "bare state dict"
        counts = ", ".join(f"{part} {n}" for part, n in self.num_tensors.items() if n)
        lines = [f"read segmentation checkpoint {self.source} ({wrapped}): {counts}"]
        lines += [f"  other       {key}" for key in self.other]
        return "\n".join(lines)


def split_segmentor_state(state: Mapping[str, torch.Tensor]) -> dict[str, Tensors]:
    """Split an mmseg-layout state dict into the PARTS, prefixes stripped as in SEG_KEY_MAP (every part present)."""
    parts: dict[str, Tensors] = {part: {} for part in PARTS}
    for key, tensor in state.items():
        for prefix, part, inner in SEG_KEY_MAP:
            if key.startswith(prefix):
                parts[part][inner + key.removeprefix(prefix)] = tensor
                break
        else:
            parts["other"][key] = tensor
    return parts


def join_segmentor_state(parts: Mapping[str, Mapping[str, torch.Tensor]]) -> Tensors:
    """Inverse of split_segmentor_state: the mmseg-layout state dict of some PARTS (unknown part names raise)."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown checkpoint part(s) {unknown}; parts are {', '.join(PARTS)}")
    state: Tensors = {}
    for part, tensors in parts.items():
        for key, tensor in tensors.items():
            full = _join_key(part, key)
            if full in state:
                raise ValueError(f"key {full!r} comes from two parts (is an FPN key also in the backbone part?)")
            state[full] = tensor
    return state


def _join_key(part: str, key: str) -> str:
    """The mmseg key of `key` inside `part` (the first SEG_KEY_MAP rule of that part whose inner prefix matches)."""
    for prefix, rule_part, inner in SEG_KEY_MAP:
        if rule_part == part and key.startswith(inner):
            return prefix + key.removeprefix(inner)
    if part == "fpn":
        raise ValueError(f"fpn key {key!r} must start with up1. .. up4.")
    return key  # part "other": stored as is


def _wrappers(obj: object) -> list[str]:
    """The wrapper keys `unwrap` peels off, outermost first (for the report)."""
    found: list[str] = []
    while isinstance(obj, Mapping):
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        found.append(key)
        obj = obj[key]
    return found


def _scalar_meta(obj: object) -> dict[str, object]:
    """The plain scalar entries of an mmcv checkpoint's `meta` dict (iter, epoch, mmseg_version, ...)."""
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping):
        return {}
    return {str(k): v for k, v in meta.items() if isinstance(v, _SCALAR_META) and k != "config"}


def _no_segmentor_error(source: str, state: Mapping[str, torch.Tensor]) -> InternViTError:
    """The error for a file without backbone.* / decode_head.* keys, saying what it holds instead."""
    keys = sorted(state)
    shown = ", ".join(keys[:5]) + (f", ... ({len(keys)} keys)" if len(keys) > 5 else "")
    try:
        layout = detect_layout(keys)
    except InternViTError:
        layout = None
    if layout is not None:
        return InternViTError(
            f"{source}: holds a bare backbone ({layout} layout: {shown}), not a segmentor",
            fix="load it with internvit.weights.load_model (or as the segmentor's pretrained backbone)",
        )
    return InternViTError(
        f"{source}: not a segmentation checkpoint: no backbone.* or decode_head.* keys (found: {shown})",
        fix="pass an mmseg-format segmentor checkpoint (keys backbone.*, decode_head.*, auxiliary_head.*)",
    )


def load_segmentation_checkpoint(source: str | Path) -> tuple[dict[str, Tensors], SegCheckpointReport]:
    """Read an mmseg-format segmentor checkpoint (bare, state_dict / meta+state_dict / module-wrapped, safetensors).

    Returns the PARTS (prefixes stripped; the backbone part in our InternViT layout, ready for
    `load_state_into(backbone, to_native(parts["backbone"]))`) and a report of what was found.
    """
    raw = read_checkpoint(source)
    try:
        state = unwrap(raw.tensors)
    except InternViTError as e:
        raise InternViTError(f"{source}: {e.message}", fix=e.fix) from e
    parts = split_segmentor_state(state)
    if not parts["backbone"] and not parts["decode_head"]:
        raise _no_segmentor_error(str(source), state)
    report = SegCheckpointReport(
        source=str(source),
        wrappers=_wrappers(raw.tensors),
        num_tensors={part: len(tensors) for part, tensors in parts.items()},
        other=sorted(parts["other"]),
        metadata=dict(raw.metadata),
        meta=_scalar_meta(raw.tensors),
    )
    log.info("%s", report)
    return parts, report


def save_segmentation_checkpoint(
    parts: Mapping[str, Mapping[str, torch.Tensor]], path: str | Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write PARTS as one safetensors file in the mmseg key layout, atomically; metadata values must be strings."""
    bad = [k for k, v in (metadata or {}).items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ValueError(f"safetensors metadata must map str to str; not so for {bad}")
    state = {k: v.detach().contiguous() for k, v in join_segmentor_state(parts).items()}
    if not state:
        raise ValueError("nothing to save: every part is empty")
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"internvit_layout": "mmseg-segmentor", **(metadata or {})})
    return path


def trainable_state(segmentor: Segmentor, backbone_frozen: bool) -> Tensors:
    """What a run saves: heads and FPN always; the backbone only when it was fine-tuned (it is 12 GB otherwise)."""
    state = segmentor.state_dict()
    return {k: v for k, v in state.items() if not (backbone_frozen and k.startswith("backbone."))}


def save_segmentor(
    segmentor: Segmentor | None,
    cfg: SegmentationConfig,
    path: Path,
    extra: dict | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Trainable weights (mmseg key layout) plus the run's settings in the metadata, so `segment` can rebuild it.

    `state`: the segmentor's whole state when it was gathered elsewhere (a sharded model, a run's checkpoint);
    default the segmentor's own."""
    state = state if state is not None else segmentor.state_dict()
    state = {k: v for k, v in state.items() if not (cfg.backbone.frozen and k.startswith("backbone."))}
    # mmseg keeps the FPN adapter inside the backbone (backbone.up1.*): save in that layout, as the released files
    parts = split_segmentor_state({("backbone." + k[4:] if k.startswith("fpn.") else k): v for k, v in state.items()})
    meta = {"config": json.dumps(to_dict(cfg)), **{k: str(v) for k, v in (extra or {}).items()}}
    save_segmentation_checkpoint(parts, path, metadata=meta)


def load_segmentor_weights(segmentor: Segmentor, source: str) -> None:
    """Load a released mmseg checkpoint or one of ours: heads, FPN and (when present) the fine-tuned backbone;
    refused when a tensor holds NaN / Inf."""
    parts, report = load_segmentation_checkpoint(source)
    fpn = {f"fpn.{k}": v for k, v in parts.pop("fpn", {}).items()}  # mmseg keeps the adapter under backbone.up*
    state = join_segmentor_state(parts) | fpn
    own = segmentor.state_dict()
    missing = [k for k in own if k not in state and not k.startswith("backbone.")]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise InternViTError(
            f"{source} does not fit this segmentor: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"mismatched {mismatched[:3]}",
            fix="use the head / fpn / out_indices settings the checkpoint was trained with",
        )
    check_finite(state, source)
    segmentor.load_state_dict(state, strict=False)
    log.info("loaded %d tensors from %s", len(state), source)


def export_segmentor(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """One safetensors file in our layout from a training run's last checkpoint (sharded or not), in one process
    and without building a model: what `seg eval`, `segment` and `load_model` read. Default `RUN/export.safetensors`."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise InternViTError(f"{run_dir} has no config.yaml", fix="pass the output_dir of a seg train run")
    cfg = load_config(SegmentationConfig, run_dir / "config.yaml")
    state, plain = read_run_state(run_dir, "model")
    path = Path(out) if out else run_dir / "export.safetensors"
    save_segmentor(None, cfg, path, extra={"iter": plain["objects"]["loop"]["step"]}, state=state)
    return path


# What a saved segmentor's metadata decides for `seg eval`: the model and the resolution it was trained at. The data
# location, the evaluation settings (scales, flip, batch) and the device stay the caller's.
SAVED_SETTINGS = (
    "setting",
    "head",
    "backbone.preset",
    "backbone.out_indices",
    "backbone.frozen",
    "data.crop",
    "data.img_scale",
    "data.test_short",
    "data.test_resize",
)


def with_saved_settings(cfg: SegmentationConfig) -> SegmentationConfig:
    """`cfg` with the settings stored in `head.checkpoint` (a file written by seg train or export), so that an
    evaluation needs none of them restated and reports the setting the file was trained for. A value the caller set
    (not the default) that the file contradicts is an error; files without stored settings leave `cfg` as it is."""
    source = Path(cfg.head.checkpoint).expanduser()
    if not (source.is_file() and source.suffix == ".safetensors"):
        return cfg
    try:
        with safe_open(source, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError):
        return cfg  # unreadable: loading the weights reports it, with its fix
    if "config" not in meta:
        return cfg
    saved, given, default = json.loads(meta["config"]), to_dict(cfg), to_dict(SegmentationConfig())
    merged = copy.deepcopy(given)
    conflicts = []
    for name in SAVED_SETTINGS:
        *path, key = name.split(".")
        stored, mine, base = (_section(d, path)[key] for d in (saved, given, default))
        if name == "head":  # the head section but its checkpoint: that is the file itself
            stored = {**stored, "checkpoint": mine["checkpoint"]}
            base = {**base, "checkpoint": mine["checkpoint"]}
        conflicts += _conflicts(name, stored, mine, base)
        _section(merged, path)[key] = stored
    if conflicts:
        raise InternViTError(
            f"{source} was trained with {'; '.join(conflicts)}",
            fix="drop these settings: seg eval takes them from the file",
        )
    # what follows data.crop is derived again from the file's crop (unless the caller chose a stride)
    default_stride = SegmentationConfig(data=cfg.data).eval.stride
    merged["backbone"]["img_size"] = merged["eval"]["crop"] = None
    if given["eval"]["stride"] == default_stride:
        merged["eval"]["stride"] = None
    merged["train"]["parallel"] = None
    if given["backbone"]["checkpoint"] == default["backbone"]["checkpoint"]:
        merged["backbone"]["checkpoint"] = saved["backbone"]["checkpoint"]
    log.info("settings from %s: setting %s, head %s", source, saved["setting"], saved["head"]["kind"])
    return config_from_dict(SegmentationConfig, merged)


def _section(data: dict, path: list[str]) -> dict:
    for key in path:
        data = data[key]
    return data


def _conflicts(name: str, stored: object, mine: object, base: object) -> list[str]:
    """'name = stored (given: mine)' for each value the caller changed from the default to something else than the
    file's; dicts field by field."""
    if isinstance(stored, dict):
        return [c for k in stored for c in _conflicts(f"{name}.{k}", stored[k], mine.get(k), base.get(k))]
    if mine != base and mine != stored and stored is not None:
        return [f"{name} = {stored!r} (given: {mine!r})"]
    return []
