"""Typed run configs: dataclass defaults <- YAML file <- dotted `key=value` overrides, merged once and validated."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import logging
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml

from internvit.engine.precision import PRECISIONS
from internvit.errors import InternViTError

T = TypeVar("T")
log = logging.getLogger(__name__)
# A config class may list fields renamed since earlier releases as `RENAMED_FIELDS`: old dotted name -> (new name,
# old value -> new value). Old command lines, YAML files and the settings stored in saved models keep working, with a
# warning; within one source (the YAML file, one override) the new name wins over the old.
Renames = dict[str, tuple[str, dict[str, str]]]


@dataclass(frozen=True)
class BackboneConfig:
    """The backbone settings both tasks share."""

    checkpoint: str = "internvit-6b-224px"  # file, folder, named tag or hub id; "random" = random init (tests, demo)
    preset: str | None = None  # default: detected from the checkpoint
    img_size: int = 224
    # fp32 | bf16 | fp16: what the backbone computes in, per task regime (engine/precision.py); fp16 adds a
    # GradScaler for what trains
    precision: str = "bf16"
    # the fast inference path for a frozen backbone (engine/parallelize.py): null = compile on CUDA only
    compile: bool | None = None
    fp8: bool = False  # e4m3 matmuls with rowwise scales (H100/H200); faster, not bit-faithful: see docs/performance.md

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"backbone.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.img_size is not None and (self.img_size < 14 or self.img_size % 14):
            raise ValueError(f"backbone.img_size must be a positive multiple of the patch size 14, got {self.img_size}")


def check_range(name: str, value: float, *, low: float | None = None, high: float | None = None, **kw: bool) -> None:
    """A ValueError naming the field unless low <= value <= high (`low_open` / `high_open`: strict bounds)."""
    low_open, high_open = kw.get("low_open", False), kw.get("high_open", False)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        raise ValueError(f"{name} must be {' and '.join(b for b in (lo, hi) if b)}, got {value:g}")


DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_tensorboard(enabled: bool) -> None:
    """tensorboard=true needs the tensorboard package: refused when the config is built, on every process."""
    if enabled and importlib.util.find_spec("tensorboard") is None:
        raise ValueError(
            "tensorboard=true needs the tensorboard package (pip install tensorboard), or tensorboard=false"
        )


def check_device(device: str) -> None:
    """`device` names a device the run can use: auto, cpu, cuda or cuda:N (a GPU only where one is visible)."""
    if not DEVICE.match(str(device)):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device} was asked for, but no GPU is visible (use device=auto or device=cpu)")
    if ":" in str(device) and int(str(device).split(":")[1]) >= torch.cuda.device_count():
        raise ValueError(f"device={device}: only {torch.cuda.device_count()} GPU(s) are visible")


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Check (and gently convert) one value against its field type; a ValueError names the field."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, name)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{name}: bad value {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        items = [_coerce(v, args[0], f"{name}[]") for v in value] if args else list(value)
        return tuple(items) if origin is tuple else items
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name}: expected true/false, got {value!r}")
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):  # YAML 1.1 reads "4e-5" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{name}: expected float, got {value!r}") from None
    if annotation in (int, str) and isinstance(value, annotation) and not isinstance(value, bool):
        return value
    if annotation is str and isinstance(value, (int, float)):
        return str(value)
    if annotation in (int, float, str):
        raise ValueError(f"{name}: expected {annotation.__name__}, got {value!r}")
    return value


def _merge(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(fields), n=1)
        hint = f"did you mean {prefix}{close[0]}? " if close else ""
        raise ValueError(f"unknown config field {prefix}{unknown[0]} ({hint}valid: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError(f"{prefix}{name}: expected a mapping of fields")
            kwargs[name] = _merge(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a config from its `to_dict` form (e.g. the settings stored in a saved model); renamed fields apply."""
    try:
        return _merge(cls, _rename_fields(data, getattr(cls, "RENAMED_FIELDS", {})))
    except (ValueError, TypeError) as e:
        raise InternViTError(f"invalid config: {e}", fix="check the field name and value type") from e


def _rename_fields(data: dict[str, Any], renames: Renames) -> dict[str, Any]:
    """Move renamed fields to their new names (translating old values), with a warning."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for old, (new, values) in renames.items():
        old_section, old_leaf = old.split(".")
        section = out.get(old_section)
        if not isinstance(section, dict) or old_leaf not in section:
            continue
        value = section.pop(old_leaf)
        value = values.get(value, value) if isinstance(value, str) else value
        new_section, new_leaf = new.split(".")
        target = out.setdefault(new_section, {})
        if isinstance(target, dict) and new_leaf not in target:
            target[new_leaf] = value
            log.warning("config field %s is now %s (read %s=%s)", old, new, new, value)
        else:
            log.warning("config field %s is now %s, which is set too: %s is ignored", old, new, old)
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build `cls` from its defaults, a YAML file of deltas and `a.b=value` overrides (values parsed as YAML)."""
    data: dict[str, Any] = {}
    renames: Renames = getattr(cls, "RENAMED_FIELDS", {})
    if path:
        path = Path(path)
        if not path.is_file():
            raise InternViTError(f"no such config file: {path}", fix="pass a YAML file, e.g. from configs/")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise InternViTError(
                f"{path} is not valid YAML{at}: {problem}",
                fix="fix the YAML syntax (plain values only: python tags are not read)",
            ) from None
        if not isinstance(loaded, dict):
            raise InternViTError(f"{path}: a config must be a YAML mapping", fix="write `section: {field: value}`")
        data = _rename_fields(loaded, renames)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InternViTError(f"bad override {item!r}", fix="write overrides as section.field=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise InternViTError(
                f"override {item!r}: the value is not valid YAML ({problem})",
                fix="quote it, or write lists as [a,b] and mappings as {k: v}",
            ) from None
        if key in renames:  # an override under its old name wins like any other override
            key, values = renames[key]
            log.warning("config field %s is now %s", item.partition("=")[0], key)
            value = values.get(value, value) if isinstance(value, str) else value
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InternViTError(f"override {key}: {part} is not a section", fix="check the field path")
        node[leaf] = value
    return config_from_dict(cls, data)
