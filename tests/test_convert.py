"""`convert` (any layout -> our safetensors) and `inspect`: bit-exact round trips, metadata, integrity."""

import pytest
import torch
from checkpoints import (
    assert_same,
    clip_projector,
    expect_error,
    native_sd,
    save_pth,
    save_st,
    write_case,
)
from conftest import TINY_6B, TINY_300M
from safetensors import safe_open
from safetensors.torch import load_file

from internvit.model import PRESETS
from internvit.weights import (
    content_sha256,
    convert_checkpoint,
    from_native,
    inspect_checkpoint,
    load_model,
)

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
