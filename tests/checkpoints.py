"""Synthetic tiny checkpoints written in every real on-disk layout, shared by the weights tests."""

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_6B, TINY_300M, randomize_
from safetensors.torch import save_file

from internvit.errors import InternViTError
from internvit.model import InternViTConfig, build_model
from internvit.weights import (
    from_native,
)

CONFIGS = {"6b": TINY_6B, "300m": TINY_300M}
Tensors = dict[str, torch.Tensor]


class NotATensor:
    """A custom object that torch.load(weights_only=True) must refuse."""


# ----------------------------------------------------------------------------------------------- helpers


def native_sd(cfg: InternViTConfig = TINY_6B, seed: int = 0) -> Tensors:
    """A randomised state dict in our (original InternVL .pth) layout."""
    model = randomize_(build_model(cfg, init=False), seed=seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def clip_projector(c: int, seed: int = 1) -> Tensors:
    """The 14 InternVL-C clip_projector tensors (docs/protocol.md §1.8), at width c."""
    shapes = {f"norm1_{x}.{p}": (c,) for x in "qkv" for p in ("weight", "bias")}
    shapes |= {f"cross_attn.{x}_bias": (c,) for x in "qkv"}
    shapes |= {f"cross_attn.{x}.weight": (c, c) for x in "qkv"}
    shapes |= {"cross_attn.proj.weight": (768, c), "cross_attn.proj.bias": (768,)}
    gen = torch.Generator().manual_seed(seed)
    return {f"clip_projector.{k}": torch.randn(s, generator=gen) for k, s in shapes.items()}


def unrelated(prefixes: tuple[str, ...]) -> Tensors:
    """Tensors of the rest of a chat model (language model, projector) that sit beside the vision tower."""
    gen = torch.Generator().manual_seed(7)
    return {f"{p}weight": torch.randn(5, 3, generator=gen) for p in prefixes}


def save_st(sd: Tensors, path: Path, metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def save_pth(obj: object, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path, **kwargs)
    return path


def save_legacy_pth(sd: Tensors, path: Path) -> Path:
    """torch.save's pre-1.6 format: a bare pickle stream, not a zip archive."""
    return save_pth(sd, path, _use_new_zipfile_serialization=False)


def save_sharded(sd: Tensors, folder: Path, n: int = 3) -> Path:
    """HF-style sharded safetensors: n shards plus model.safetensors.index.json; returns the index path."""
    keys = sorted(sd)
    size = -(-len(keys) // n)
    weight_map = {}
    for j in range(n):
        name = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
        part = keys[j * size : (j + 1) * size]
        save_st({k: sd[k] for k in part}, folder / name)
        weight_map |= dict.fromkeys(part, name)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def prefixed(sd: Tensors, prefix: str) -> Tensors:
    return {prefix + k: v for k, v in sd.items()}


_HF_CHAT = unrelated(("mlp1.1.", "language_model.model.tok_embeddings."))
_TF_OLD = unrelated(("language_model.model.embed_tokens.", "multi_modal_projector.linear_1."))
_TF_HF = unrelated(("model.language_model.embed_tokens.", "model.multi_modal_projector.linear_1.", "lm_head."))
# case -> (layout, key prefix, tensors of the rest of the model, how it is written)
CASES = {
    "pth": ("internvit", "", {}, "pth"),
    "pth-legacy-format": ("internvit", "", {}, "legacy-pth"),
    "pth-module-wrapper": ("internvit", "", {}, "module-pth"),
    "pth-ddp-prefix": ("internvit", "module.", {}, "pth"),
    "hf-safetensors-folder": ("hf_internvit", "", {}, "st-folder"),
    "hf-sharded-folder": ("hf_internvit", "", {}, "sharded-folder"),
    "hf-sharded-index": ("hf_internvit", "", {}, "sharded-index"),
    "hf-bin-folder": ("hf_internvit", "", {}, "bin-folder"),
    "hf-vision_model-prefix": ("hf_internvit", "vision_model.", _HF_CHAT, "st-file"),
    "transformers": ("transformers", "", {}, "st-folder"),
    "transformers-vision_tower": ("transformers", "vision_tower.", _TF_OLD, "st-file"),
    "transformers-model.vision_tower": ("transformers", "model.vision_tower.", _TF_HF, "sharded-folder"),
}


def write_case(case: str, sd: Tensors, d: Path) -> tuple[Path, str, set[str]]:
    """Write `sd` (our layout) to disk as CASES[case]: -> (what to pass, its layout, keys set aside on purpose)."""
    layout, prefix, rest, how = CASES[case]
    t = prefixed(from_native(sd, layout), prefix) | rest
    writers = {
        "pth": lambda: save_pth(t, d / "ckpt.pth"),
        "legacy-pth": lambda: save_legacy_pth(t, d / "ckpt.pth"),
        "module-pth": lambda: save_pth({"module": t}, d / "ckpt.pth"),
        "st-file": lambda: save_st(t, d / "chat.safetensors"),
        "st-folder": lambda: save_st(t, d / "model.safetensors").parent,
        "bin-folder": lambda: save_pth(t, d / "pytorch_model.bin").parent,
        "sharded-folder": lambda: save_sharded(t, d).parent,
        "sharded-index": lambda: save_sharded(t, d),
    }
    return writers[how](), layout, set(rest)


def assert_same(actual: Tensors, expected: Tensors) -> None:
    """Same keys, and every tensor bit-identical (dtype, shape and values)."""
    assert sorted(actual) == sorted(expected)
    for k, v in expected.items():
        assert actual[k].dtype == v.dtype and torch.equal(actual[k], v), k


def expect_error(match: str, fn, *args, **kwargs) -> InternViTError:
    with pytest.raises(InternViTError, match=match) as info:
        fn(*args, **kwargs)
    assert info.value.fix.strip()
    return info.value
