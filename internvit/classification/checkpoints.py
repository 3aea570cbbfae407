"""Head files: the released head .pth, the original training checkpoints, and our safetensors (with metadata).

The released `intern_vit_6b_224px_head.pth` and the original full-model training checkpoints (`model`, `model_ema`,
optimizer, yacs config) load directly: backbone keys are ignored and reported. Our own head files are safetensors
with the head kind, class names and settings in their metadata (`save_head` / `head_metadata`).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from internvit.atomic import atomic_path
from internvit.classification.heads import HEADS
from internvit.data.imagenet_meta import imagenet_1k_categories
from internvit.errors import InternViTError
from internvit.model import InternViT
from internvit.weights.files import RawCheckpoint, download, read_checkpoint
from internvit.weights.integrity import check_finite
from internvit.weights.keymaps import WRAPPER_KEYS, unwrap
from internvit.weights.tags import HEAD_TAGS

log = logging.getLogger(__name__)
_BACKBONE_KEYS = ("blocks.", "patch_embed.", "pos_embed", "cls_token")
_MAX_LISTED = 20


class _YacsConfigStandIn:
    """Rebuilds the yacs `config` entry of original InternVL training checkpoints as an inert OrderedDict."""

    def __new__(cls, *args: object) -> OrderedDict:  # type: ignore[misc]
        return OrderedDict()


def _allow_training_configs() -> AbstractContextManager:
    """Allow-list just `yacs.config.CfgNode` (as the stand-in) so ckpt_epoch_*.pth load with weights_only=True."""
    if not hasattr(torch.serialization, "safe_globals") or torch.__version__ < "2.6":
        return nullcontext()
    return torch.serialization.safe_globals([(_YacsConfigStandIn, "yacs.config.CfgNode")])


def _run_checkpoint_objects(obj: object) -> Mapping | None:
    """The objects of one of our training checkpoints (`checkpoint.pth` of `cls train`: signature + objects with
    `head` and, with EMA on, `ema`), or None for any other file."""
    if (
        isinstance(obj, Mapping)
        and isinstance(obj.get("signature"), Mapping)
        and isinstance(obj.get("objects"), Mapping)
    ):
        objects = obj["objects"]
        return objects if isinstance(objects.get("head"), Mapping) else None
    return None


def select_head_state(obj: object, use_ema: bool, source: str) -> tuple[dict[str, torch.Tensor], str]:
    """The head state inside a loaded file: `model_ema` if asked, else the `model`-style wrapper, else the file;
    of our own training checkpoint, its `head` (or `ema`)."""
    objects = _run_checkpoint_objects(obj)
    if objects is not None:
        entry = "ema" if use_ema else "head"
        if not isinstance(objects.get(entry), Mapping):
            raise InternViTError(
                f"{source}: this training checkpoint has no EMA head (the run had train.ema=false)",
                fix="evaluate its head (head.use_ema=false)",
            )
        return dict(objects[entry]), f"objects.{entry}"
    if use_ema:
        if not (isinstance(obj, Mapping) and isinstance(obj.get("model_ema"), Mapping)):
            found = ", ".join(sorted(map(str, obj))[:10]) if isinstance(obj, Mapping) else type(obj).__name__
            raise InternViTError(
                f"{source}: no 'model_ema' entry to load (top-level entries: {found})",
                fix="load the raw weights (use_ema=False), or pass a checkpoint saved with EMA on",
            )
        return unwrap(obj["model_ema"]), "model_ema"
    entry = next((k for k in WRAPPER_KEYS if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping)), "")
    return unwrap(obj), entry or "state dict"


def _ignore_reason(key: str) -> str | None:
    if key.startswith(_BACKBONE_KEYS):
        return "frozen backbone weights, not part of the head (load them with internvit.weights.load_model)"
    if key.startswith("clip_projector."):
        return "InternVL-C clip_projector, not used by this head"
    return None


def _guess_kind(state: Mapping[str, torch.Tensor]) -> str | None:
    """The head kind a state dict was saved from, from its key names and shapes (for error messages)."""
    weight = state.get("head.weight")
    proj = state.get("clip_projector.cross_attn.proj.weight")
    if any(k.startswith("attn_pooling.") for k in state):
        return "attention_pooling"
    # a cls_patch_concat training checkpoint may carry an unused clip_projector too: the head width tells them apart
    if weight is not None and proj is not None and weight.shape[1] == proj.shape[0]:
        return "clip_projector"
    return "cls_patch_concat" if weight is not None else None


def _listing(label: str, items: list[str]) -> list[str]:
    lines = [f"  {label:<11} {item}" for item in items[:_MAX_LISTED]]
    return lines + ([f"  {label:<11} ... and {len(items) - _MAX_LISTED} more"] if len(items) > _MAX_LISTED else [])


def _mismatch_error(report: dict, head: nn.Module, state: Mapping[str, torch.Tensor]) -> InternViTError:
    kind = getattr(head, "kind", type(head).__name__)
    lines = [f"{report['source']} ({report['entry']}) does not match the {kind} head:"]
    lines += _listing("mismatched", [f"{k}: checkpoint {c} vs head {h}" for k, c, h in report["mismatched"]])
    lines += _listing("missing", report["missing"]) + _listing("unexpected", report["unexpected"])
    guess, weight = _guess_kind(state), state.get("head.weight")
    looks = (
        f" (it looks like kind {guess!r} with num_classes {weight.shape[0]})" if guess and weight is not None else ""
    )
    return InternViTError(
        "\n".join(lines), fix=f"build the head the file was saved from{looks}, or load with strict=False"
    )


def _read_head_state(source: str | Path, use_ema: bool) -> tuple[RawCheckpoint, dict[str, torch.Tensor], str]:
    """Read a head file safely (weights_only pickles, or safetensors) and pick the head state inside it."""
    path = Path(source).expanduser()
    if not path.exists() and str(source) in HEAD_TAGS:
        path = download(*HEAD_TAGS[str(source)])
    if not path.exists():
        raise InternViTError(
            f"no such head checkpoint: {source}",
            fix=f"check the path, or pass {', '.join(HEAD_TAGS)} for the released head (downloaded once)",
        )
    with _allow_training_configs():
        raw = read_checkpoint(path)
    state, entry = select_head_state(raw.tensors, use_ema, str(source))
    return raw, state, entry


@dataclass
class HeadFileInfo:
    """What a head file says about the head to build for it (from save_head metadata, else from tensor shapes)."""

    kind: str
    num_classes: int
    class_names: list[str]  # the saved names, else the class indices as strings
    metadata: dict[str, str] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)  # the saved class folders (wnids, custom folders); [] if none


def default_class_names(num_classes: int) -> list[str]:
    """ImageNet-1K's names for a 1000-way head without saved names (the released head), else the indices."""
    if num_classes == 1000:
        return imagenet_1k_categories()
    return [str(i) for i in range(num_classes)]


def read_head_file(source: str | Path, *, use_ema: bool = False) -> HeadFileInfo:
    """Which head (kind, num_classes, class names) a file holds, so that it can be built before loading."""
    raw, state, _ = _read_head_state(source, use_ema)
    meta = dict(raw.metadata) | _run_checkpoint_metadata(raw.tensors)
    kind = meta.get("head_kind") or meta.get("kind") or _guess_kind(state)
    weight = state.get("head.weight")
    if kind not in HEADS or weight is None:
        raise InternViTError(
            f"{source}: cannot tell which head this file holds (kind {kind!r}, has head.weight: {weight is not None})",
            fix="pass a file written by save_head() or the released intern_vit_6b_224px_head.pth",
        )
    num_classes = int(weight.shape[0])
    names = _metadata_list(meta, "class_names", source, num_classes)
    names = default_class_names(num_classes) if names is None else names
    classes = _metadata_list(meta, "classes", source, num_classes) or []  # heads saved before it was recorded: []
    return HeadFileInfo(kind, num_classes, names, meta, classes)


def _run_checkpoint_metadata(obj: object) -> dict[str, str]:
    """What our training checkpoint's settings signature says about its head (kind, input resolution), in the keys
    of a head file's metadata; {} for other files."""
    if _run_checkpoint_objects(obj) is None:
        return {}
    head, backbone = obj["signature"].get("head", {}), obj["signature"].get("backbone", {})
    meta = {"kind": str(head.get("kind") or ""), "img_size": str(backbone.get("img_size") or "")}
    return {k: v for k, v in meta.items() if v}


def _metadata_list(meta: dict[str, str], key: str, source: str | Path, num_classes: int) -> list[str] | None:
    """A JSON list of one string per class in the head file's metadata, or None when the file has no such entry."""
    if key not in meta:
        return None
    try:
        items = json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise InternViTError(f"{source}: metadata {key} is not JSON ({e})", fix="re-save the head") from e
    if not isinstance(items, list) or len(items) != num_classes:
        raise InternViTError(
            f"{source}: metadata {key} is not a list of {num_classes} names", fix="re-save the head with them"
        )
    return [str(n) for n in items]


@torch.no_grad()
def load_head_state(
    source: str | Path, head: nn.Module, *, strict: bool = True, use_ema: bool = False
) -> dict[str, object]:
    """Load head weights from the released head .pth, an original training checkpoint, or our safetensors.

    Layouts: {"model": state, ...} (with optional model_ema / optimizer / epoch / yacs config), a bare state dict,
    `module.`-prefixed keys, or save_head() safetensors. Backbone keys of a full-model checkpoint are ignored and
    reported. Strict by default; head tensors holding NaN / Inf are always refused. Returns a report: source, entry,
    num_loaded, missing, unexpected, mismatched, ignored (key -> reason), metadata (safetensors header) and info
    (top-level scalars such as epoch).
    """
    raw, state, entry = _read_head_state(source, use_ema)
    own = head.state_dict()
    ignored = {k: r for k in state if k not in own and (r := _ignore_reason(k)) is not None}
    # BN's num_batches_tracked has no effect with momentum 0.1, so a file without it is still complete
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in own and k not in ignored)
    mismatched = [
        (k, tuple(v.shape), tuple(own[k].shape))
        for k, v in sorted(state.items())
        if k in own and v.shape != own[k].shape
    ]
    top = raw.tensors if isinstance(raw.tensors, Mapping) else {}
    report: dict[str, object] = {
        "source": str(source),
        "entry": entry,
        "num_loaded": 0,
        "missing": missing,
        "unexpected": unexpected,
        "mismatched": mismatched,
        "ignored": ignored,
        "metadata": dict(raw.metadata),
        "info": {k: v for k, v in top.items() if isinstance(v, (int, float, str))},
    }
    if strict and (missing or unexpected or mismatched):
        raise _mismatch_error(report, head, state)
    loadable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    check_finite(loadable, raw.files[0])
    head.load_state_dict(loadable, strict=False)
    report["num_loaded"] = len(loadable)
    if ignored:
        log.info("head checkpoint %s: ignored %d backbone/clip_projector key(s)", source, len(ignored))
    log.info("loaded %d head tensors from %s (%s)", len(loadable), source, entry)
    return report


def save_head(head: nn.Module, path: str | Path, *, metadata: dict[str, str]) -> Path:
    """Write the head's full state dict (BN running stats included) as safetensors, atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InternViTError(f"{path}: head files are written as safetensors", fix="use a .safetensors file name")
    bad = sorted(str(k) for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str)))
    if bad:
        raise InternViTError(
            f"safetensors metadata must map str to str; not so for: {', '.join(bad)}",
            fix="convert values with str() or json.dumps()",
        )
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    header = {"format": "internvit-head", "head_kind": getattr(head, "kind", type(head).__name__), **metadata}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=header)
    return path


def head_metadata(
    kind: str,
    backbone: InternViT,
    num_classes: int,
    class_names: list[str],
    checkpoint: str,
    *,
    classes: list[str] | None = None,
) -> dict[str, str]:
    """The settings a head file carries, so `classify` and `cls eval` can rebuild the head and its input.

    `class_names` are what `classify` prints (ImageNet: readable names; a custom set: its display names);
    `classes` the class folders in logit order (wnids, custom folders), so `cls eval` can check a custom set's.
    """
    cfg = backbone.config
    extra = {"classes": json.dumps(classes)} if classes is not None else {}
    return {
        "kind": kind,
        "num_classes": str(num_classes),
        "embed_dim": str(cfg.embed_dim),
        "num_heads": str(cfg.num_heads),
        "img_size": str(cfg.img_size),
        "backbone": checkpoint,
        "class_names": json.dumps(class_names),
        **extra,
    }
