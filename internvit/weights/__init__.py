"""Checkpoint sources (named tags), key maps between formats, and loading with a report."""

from internvit.weights.convert import content_sha256, convert_checkpoint, inspect_checkpoint
from internvit.weights.files import read_checkpoint
from internvit.weights.keymaps import LAYOUTS, NativeState, detect_layout, from_native, to_native, unwrap
from internvit.weights.loading import LoadReport, infer_architecture, load_model, load_state_into, match_presets
from internvit.weights.tags import TAGS, PretrainedTag, resolve_tag

__all__ = [
    "LAYOUTS",
    "TAGS",
    "LoadReport",
    "NativeState",
    "PretrainedTag",
    "content_sha256",
    "convert_checkpoint",
    "detect_layout",
    "from_native",
    "infer_architecture",
    "inspect_checkpoint",
    "load_model",
    "load_state_into",
    "match_presets",
    "read_checkpoint",
    "resolve_tag",
    "to_native",
    "unwrap",
]
