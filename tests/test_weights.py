"""Checkpoint reading, key maps, strict loading, preset matching, errors, convert and inspect (REFERENCE 1.7-1.10).

Every checkpoint is synthetic and tiny, written into tmp_path in the real on-disk layouts.
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_6B, TINY_300M, randomize_
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from internvit.errors import InternViTError
from internvit.model import PRESETS, InternViTConfig, build_model
from internvit.weights import (
    LAYOUTS,
    content_sha256,
    convert_checkpoint,
    detect_layout,
    from_native,
    inspect_checkpoint,
    load_model,
    to_native,
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
    """The 14 InternVL-C clip_projector tensors (REFERENCE 1.8), at width c."""
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


@pytest.fixture
def tiny_300m_preset(monkeypatch):
    """Register TINY_300M as a preset so that LayerNorm / qkv-bias checkpoints can be matched and loaded."""
    monkeypatch.setitem(PRESETS, "tiny-300m", TINY_300M)
    return "tiny-300m"


# ----------------------------------------------------------------------------------------------- key maps


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_round_trip_and_detection(cfg, layout):
    sd = native_sd(cfg)
    foreign = from_native(sd, layout)
    assert detect_layout(list(foreign)) == layout
    assert (set(foreign) == set(sd)) == (layout == "internvit")
    native = to_native(foreign)
    assert native.layout == layout and not native.set_aside
    assert_same(native.state, sd)


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_foreign_key_names_follow_the_spec(cfg):
    sd, c = native_sd(cfg), cfg.embed_dim
    hf, tf = from_native(sd, "hf_internvit"), from_native(sd, "transformers")
    for ours, theirs in [
        ("cls_token", "embeddings.class_embedding"),
        ("pos_embed", "embeddings.position_embedding"),
        ("patch_embed.proj.weight", "embeddings.patch_embedding.weight"),
        ("blocks.1.ls1.gamma", "encoder.layers.1.ls1"),
        ("blocks.1.ls2.gamma", "encoder.layers.1.ls2"),
        ("blocks.1.attn.qkv.weight", "encoder.layers.1.attn.qkv.weight"),
        ("blocks.1.mlp.fc2.bias", "encoder.layers.1.mlp.fc2.bias"),
    ]:
        assert torch.equal(hf[theirs], sd[ours]), theirs
    for ours, theirs in [
        ("cls_token", "embeddings.cls_token"),
        ("pos_embed", "embeddings.position_embeddings"),
        ("patch_embed.proj.bias", "embeddings.patch_embeddings.projection.bias"),
        ("blocks.1.ls1.gamma", "encoder.layer.1.lambda_1"),
        ("blocks.1.norm1.weight", "encoder.layer.1.layernorm_before.weight"),
        ("blocks.1.norm2.weight", "encoder.layer.1.layernorm_after.weight"),
        ("blocks.1.attn.proj.weight", "encoder.layer.1.attention.projection_layer.weight"),
    ]:
        assert torch.equal(tf[theirs], sd[ours]), theirs
    qkv = sd["blocks.1.attn.qkv.weight"]  # rows [0, C) q, [C, 2C) k, [2C, 3C) v
    for j, name in enumerate("qkv"):
        assert torch.equal(tf[f"encoder.layer.1.attention.{name}_proj.weight"], qkv[j * c : (j + 1) * c])
    assert ("encoder.layer.0.attention.v_proj.bias" in tf) == cfg.qkv_bias
    assert ("encoder.layer.0.attention.q_norm.weight" in tf) == cfg.qk_norm


def test_unrecognised_layout_and_incomplete_split_qkv():
    expect_error("unrecognised checkpoint layout", detect_layout, ["foo.weight", "bar.bias"])
    tf = from_native(native_sd(), "transformers")
    del tf["encoder.layer.2.attention.k_proj.weight"]
    expect_error(r"only the q/v projection\(s\) for blocks\.2\.attn\.qkv\.weight", to_native, tf)


# ----------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("cfg_name", CONFIGS)
@pytest.mark.parametrize("case", CASES)
def test_load_every_layout_bit_exact(tmp_path, tiny_300m_preset, cfg_name, case):
    sd = native_sd(CONFIGS[cfg_name])
    source, layout, set_aside = write_case(case, sd, tmp_path)
    model, report = load_model(source)
    assert report.ok and report.layout == layout
    assert report.preset == {"6b": "debug", "300m": tiny_300m_preset}[cfg_name]
    assert report.num_loaded == len(sd) and not report.resized
    assert set(report.set_aside) == set_aside and not report.extras
    assert_same(model.state_dict(), sd)


@pytest.mark.parametrize("wrap", ["plain", "module-wrapper", "ddp-prefix"])
def test_clip_projector_is_set_aside_and_kept(tmp_path, wrap):
    sd, clip = native_sd(), clip_projector(TINY_6B.embed_dim)
    assert len(clip) == 14
    full = sd | clip
    obj = {"plain": full, "module-wrapper": {"module": full}, "ddp-prefix": prefixed(full, "module.")}[wrap]
    model, report = load_model(save_pth(obj, tmp_path / "intern_vit_6b_224px.pth"), strict=True)
    assert report.ok and report.unexpected == []
    assert set(report.set_aside) == set(clip)
    assert all("clip_projector" in reason for reason in report.set_aside.values())
    assert_same(report.extras, clip)
    assert_same(model.state_dict(), sd)


def test_preset_is_matched_and_pos_embed_resized(tmp_path):
    sd = native_sd()
    path = save_pth(sd, tmp_path / "ckpt.pth")
    native_model, report = load_model(path)
    assert report.preset == "debug" and not report.resized
    model, report = load_model(path, img_size=84)
    assert report.preset == "debug" and model.config.img_size == 84
    assert report.resized == [("pos_embed", (1, 17, 64), (1, 37, 64))]
    assert not torch.equal(model.pos_embed[:, 1:5], native_model.pos_embed[:, 1:5])  # really resized
    x = torch.randn(2, 3, 84, 84, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = native_model.eval()(x)  # the 56px model interpolates on the fly
        actual = model.eval()(x)
    assert actual.shape == (2, 37, 64)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------- errors


RANDOM = bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist())


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BAD_FILES = {
    "missing": ("nope.pth", lambda p: p, "no such file or folder"),
    "random-pth": ("ckpt.pth", lambda p: p.write_bytes(RANDOM), "cannot read this PyTorch file"),
    "html-page-pth": ("ckpt.pth", lambda p: p.write_bytes(b"<!DOCTYPE html>denied"), "cannot read this PyTorch file"),
    "damaged-pickle-pth": (
        "ckpt.pth",
        lambda p: p.write_bytes(b"\x80\x02t."),
        "cannot read this PyTorch",
    ),  # IndexError
    "random-safetensors": ("ckpt.safetensors", lambda p: p.write_bytes(RANDOM), "cannot read this safetensors file"),
    "truncated-pth": ("ckpt.pth", lambda p: truncate(save_pth(native_sd(), p)), "cannot read this PyTorch file"),
    "truncated-legacy-pth": ("a.pth", lambda p: truncate(save_legacy_pth(native_sd(), p)), "cannot read this PyTorch"),
    "truncated-safetensors": (
        "a.safetensors",
        lambda p: truncate(save_st(native_sd(), p)),
        "cannot read this safetensors",
    ),
    "pickled-object": ("ckpt.pth", lambda p: save_pth(native_sd() | {"obj": NotATensor()}, p), "refused to unpickle"),
    "no-tensors": ("ckpt.pth", lambda p: save_pth({"epoch": 3}, p), "holds no tensors"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_unreadable_files(tmp_path, case):
    name, write, match = BAD_FILES[case]
    write(tmp_path / name)
    expect_error(match, load_model, tmp_path / name)


def test_wrong_shape_under_strict(tmp_path):
    sd = native_sd()
    sd["blocks.1.mlp.fc1.weight"] = torch.randn(200, 64)
    path = save_pth(sd, tmp_path / "ckpt.pth")
    expect_error(
        r"mismatched\s+blocks\.1\.mlp\.fc1\.weight: checkpoint \(200, 64\) vs model \(256, 64\)", load_model, path
    )
    _, report = load_model(path, strict=False)
    assert report.mismatched == [("blocks.1.mlp.fc1.weight", (200, 64), (256, 64))]


def test_missing_key_strict_and_lenient(tmp_path):
    sd = native_sd()
    del sd["blocks.2.attn.proj.bias"]
    path = save_pth(sd, tmp_path / "ckpt.pth")
    expect_error(r"missing\s+blocks\.2\.attn\.proj\.bias", load_model, path)
    model, report = load_model(path, strict=False)
    assert report.missing == ["blocks.2.attn.proj.bias"] and not report.ok
    assert report.num_loaded == len(sd)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in sd.items())


def test_unexpected_key_under_strict(tmp_path):
    path = save_pth(native_sd() | {"head.weight": torch.zeros(3, 64)}, tmp_path / "ckpt.pth")
    expect_error(r"unexpected\s+head\.weight", load_model, path)


def test_checkpoint_does_not_fit_preset(tmp_path):
    path = save_pth(native_sd(TINY_300M), tmp_path / "ckpt.pth")
    err = expect_error(r"does not fit preset 'debug'.*embed_dim 48 vs 64", load_model, path, preset="debug")
    assert "norm_type layer_norm vs rms_norm" in err.message
    expect_error("no preset has this checkpoint's architecture", load_model, path)


def test_sharded_folder_with_a_missing_shard(tmp_path):
    index = save_sharded(from_native(native_sd(), "hf_internvit"), tmp_path)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    for source in (tmp_path, index):
        expect_error(r"missing: model-00002-of-00003\.safetensors", load_model, source)


@pytest.mark.parametrize("name", ["OpenGVLab/InternViT-6B-224px", "internvit-6b-224px.hf"])
def test_hub_sources_offline_fail_clearly(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # so that no local folder of that name can exist
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # never hang on the network
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))  # nor find a real cache
    err = expect_error("Hugging Face Hub", load_model, name)
    assert "OpenGVLab/InternViT-6B-224px" in err.message
    assert "local-dir DIR" in err.fix and "path" in err.fix


def test_folder_with_two_unrelated_pth_files(tmp_path):
    save_pth(native_sd(), tmp_path / "a.pth")
    save_pth(native_sd(seed=1), tmp_path / "b.pth")
    expect_error(r"cannot tell which checkpoint to load \(a\.pth, b\.pth\)", load_model, tmp_path)


# ----------------------------------------------------------------------------------------------- convert / inspect


CONVERT_CASES = ["pth", "pth-ddp-prefix", "hf-sharded-folder", "hf-bin-folder", "transformers-model.vision_tower"]


@pytest.mark.parametrize("case", CONVERT_CASES)
def test_convert_is_bit_exact_and_round_trips(tmp_path, case):
    sd = native_sd()
    source, layout, _ = write_case(case, sd, tmp_path / "src")
    meta = convert_checkpoint(source, tmp_path / "out.safetensors")
    tensors = load_file(tmp_path / "out.safetensors")
    assert_same(tensors, sd)
    assert meta["format"] == "internvit" and meta["preset"] == "debug" and meta["source_layout"] == layout
    assert meta["content_sha256"] == content_sha256(tensors) == content_sha256(sd)
    again = convert_checkpoint(tmp_path / "out.safetensors", tmp_path / "again.safetensors")
    assert_same(load_file(tmp_path / "again.safetensors"), tensors)
    assert again["content_sha256"] == meta["content_sha256"] and again["source_layout"] == "internvit"


def test_convert_keeps_clip_projector_and_casts(tmp_path):
    sd, clip = native_sd(), clip_projector(TINY_6B.embed_dim)
    source = save_pth({"module": sd | clip}, tmp_path / "ckpt.pth")
    convert_checkpoint(source, tmp_path / "fp32.safetensors")
    assert_same(load_file(tmp_path / "fp32.safetensors"), sd | clip)
    meta = convert_checkpoint(source, tmp_path / "bf16.safetensors", dtype=torch.bfloat16)
    bf16 = load_file(tmp_path / "bf16.safetensors")
    assert_same(bf16, {k: v.to(torch.bfloat16) for k, v in (sd | clip).items()})
    assert meta["content_sha256"] == content_sha256(bf16) != content_sha256(sd | clip)
    _, report = load_model(tmp_path / "bf16.safetensors", dtype=torch.bfloat16)
    assert set(report.set_aside) == set(clip) and report.ok


def test_converted_file_remembers_the_preset_asked_for(tmp_path, monkeypatch):
    for name in ("tiny-a", "tiny-b"):  # same shapes, like the 448px 6B releases v1.0 ... v2.5
        monkeypatch.setitem(PRESETS, name, TINY_300M)
    source = save_pth(native_sd(TINY_300M), tmp_path / "ckpt.pth")
    assert load_model(source)[1].preset == "tiny-a"
    assert convert_checkpoint(source, tmp_path / "b.safetensors", preset="tiny-b")["preset"] == "tiny-b"
    assert load_model(tmp_path / "b.safetensors")[1].preset == "tiny-b"
    assert inspect_checkpoint(tmp_path / "b.safetensors")["preset"] == "tiny-b"


def test_convert_refuses_to_overwrite(tmp_path):
    source = save_pth(native_sd(), tmp_path / "ckpt.pth")
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"keep me")
    expect_error("already exists", convert_checkpoint, source, dst)
    assert dst.read_bytes() == b"keep me"
    convert_checkpoint(source, dst, overwrite=True)
    assert_same(load_file(dst), native_sd())
    expect_error(r"must end in \.safetensors", convert_checkpoint, source, tmp_path / "out.pth")


def test_inspect_reports_layout_preset_and_integrity(tmp_path):
    sd = native_sd()
    converted = tmp_path / "out.safetensors"
    convert_checkpoint(save_st(from_native(sd, "transformers"), tmp_path / "src" / "model.safetensors"), converted)
    info = inspect_checkpoint(converted)
    assert info["layout"] == "internvit" and info["preset"] == "debug" and info["sha256_ok"] is True
    assert info["num_tensors"] == len(sd) and info["metadata"]["source_layout"] == "transformers"
    with safe_open(converted, framework="pt") as f:  # keep the metadata, change one value of one tensor
        metadata = f.metadata()
    tampered = load_file(converted)
    tampered["blocks.3.mlp.fc2.bias"][7] += 1.0
    save_st(tampered, converted, metadata=metadata)
    info = inspect_checkpoint(converted)
    assert info["metadata"]["content_sha256"] == metadata["content_sha256"]
    assert info["layout"] == "internvit" and info["sha256_ok"] is False


def test_inspect_foreign_checkpoint_has_no_integrity_check(tmp_path):
    sd = native_sd()
    source, _, set_aside = write_case("hf-vision_model-prefix", sd, tmp_path)
    info = inspect_checkpoint(source)
    assert info["layout"] == "hf_internvit" and info["preset"] == "debug" and info["presets_matching"] == ["debug"]
    assert "sha256_ok" not in info and set(info["set_aside"]) == set_aside
    assert info["num_backbone_params"] == sum(v.numel() for v in sd.values())
