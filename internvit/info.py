"""`internvit info`: what a file holds, whichever of our files it is (a backbone, a head, a segmentor, a training
checkpoint), reported and never refused: sizes, settings, and the NaN / Inf tensors that loading would refuse."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from internvit.classification.checkpoints import read_head_file
from internvit.segmentation.checkpoints import split_segmentor_state
from internvit.weights.convert import inspect_checkpoint
from internvit.weights.files import read_checkpoint, read_header
from internvit.weights.integrity import non_finite_tensors

_SHOWN_NAMES = 5


def describe(source: str | Path) -> dict[str, object]:
    """The report `internvit info` prints for `source` (JSON-serialisable)."""
    path = Path(source).expanduser()
    if not path.is_file() or path.name.endswith(".index.json"):  # folders, indexes, tags, hub ids: backbones
        return {"kind": "backbone", **inspect_checkpoint(source)}
    header = read_header(path)  # safetensors: the kind from the header alone, no tensor read for a backbone
    if header is not None and not {"internvit-head", "mmseg-segmentor"} & set(header[0].values()):
        return {"kind": "backbone", **inspect_checkpoint(source)}
    raw = read_checkpoint(path, verify_hash=False)
    meta = dict(raw.metadata)
    if meta.get("format") == "internvit-head":
        return _head(path, raw.tensors, meta)
    if meta.get("internvit_layout") == "mmseg-segmentor":
        return _segmentor(path, raw.tensors, meta)
    if isinstance(raw.tensors, Mapping) and {"signature", "objects"} <= set(raw.tensors):
        return _training_checkpoint(path, raw.tensors)
    del raw  # a pickled backbone: read again by the inspection (memory-mapped), not held twice
    return {"kind": "backbone", **inspect_checkpoint(source)}


def _common(path: Path, tensors: Mapping[str, torch.Tensor]) -> dict[str, object]:
    return {
        "source": str(path),
        "bytes_on_disk": path.stat().st_size,
        "num_tensors": len(tensors),
        "num_params": sum(t.numel() for t in tensors.values()),
        "non_finite_tensors": non_finite_tensors(tensors),
    }


def _head(path: Path, tensors: Mapping[str, torch.Tensor], meta: dict[str, str]) -> dict[str, object]:
    info = read_head_file(path)
    names = info.class_names
    return {
        "kind": "classification head",
        "head_kind": info.kind,
        "num_classes": info.num_classes,
        "class_names": names[:_SHOWN_NAMES] + (["..."] if len(names) > _SHOWN_NAMES else []),
        "img_size": int(meta["img_size"]) if meta.get("img_size", "").isdigit() else None,
        "backbone": meta.get("backbone"),
        **_common(path, tensors),
    }


def _segmentor(path: Path, tensors: Mapping[str, torch.Tensor], meta: dict[str, str]) -> dict[str, object]:
    parts = split_segmentor_state(tensors)  # the tensors already read: the file is not read again
    config = json.loads(meta["config"]) if "config" in meta else {}
    head, backbone = config.get("head", {}), config.get("backbone", {})
    return {
        "kind": "segmentor",
        "setting": config.get("setting"),
        "head_kind": head.get("kind"),
        "num_classes": head.get("num_classes"),
        "fpn": head.get("fpn"),
        "aux": head.get("aux"),
        "backbone": backbone.get("checkpoint"),
        "backbone_frozen": backbone.get("frozen"),
        "crop": config.get("data", {}).get("crop"),
        "iter": int(meta["iter"]) if meta.get("iter", "").isdigit() else None,
        "tensors_per_part": {part: len(t) for part, t in parts.items() if t},
        **_common(path, tensors),
    }


def _training_checkpoint(path: Path, obj: Mapping) -> dict[str, object]:
    """A run's `checkpoint.pth`: the settings signature it resumes under and the trainable objects' tensors."""
    objects = obj["objects"]
    tensors = {
        f"{name}.{key}": value
        for name in ("head", "ema", "model")
        if isinstance(objects.get(name), Mapping)
        for key, value in objects[name].items()
        if isinstance(value, torch.Tensor)
    }
    loop = objects.get("loop", {})
    return {
        "kind": "training checkpoint",
        "step": loop.get("step"),
        "objects": sorted(objects),
        "signature": obj["signature"],
        **_common(path, tensors),
    }
