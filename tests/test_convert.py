"""`convert` (any layout -> our safetensors) and `inspect`: bit-exact round trips, metadata, integrity."""

import hashlib
import json

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

from internvit.cli import main
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


# ----------------------------------------------------------------------------------------------- content_sha256


def reference_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """The definition convert has always written, spelled out with whole-tensor copies (tobytes)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


MIXED = {
    "w": torch.randn(100, 4, generator=torch.Generator().manual_seed(0)),
    "bf16": torch.randn(3, 5).bfloat16(),
    "ids": torch.arange(7),
    "mask": torch.tensor([[True, False], [False, True]]),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 3),
    "transposed": torch.arange(24, dtype=torch.float32).reshape(4, 6).t(),  # not contiguous
}


def test_content_sha256_streams_in_chunks_with_the_written_definition(monkeypatch):
    expected = reference_sha256(MIXED)
    assert content_sha256(MIXED) == expected
    sizes: list[int] = []
    sha256 = hashlib.sha256

    class Recorder:
        def __init__(self) -> None:
            self.inner = sha256()

        def update(self, data) -> None:
            sizes.append(memoryview(data).nbytes)
            self.inner.update(data)

        def hexdigest(self) -> str:
            return self.inner.hexdigest()

    monkeypatch.setattr("internvit.weights.integrity.HASH_CHUNK_BYTES", 64)
    monkeypatch.setattr("internvit.weights.integrity.hashlib.sha256", Recorder)
    assert content_sha256(MIXED) == expected
    assert max(sizes) <= 64  # no row here is longer than a chunk: nothing is hashed whole
    # 7 name lines; w: 1600 bytes in 25 chunks; transposed: 6 rows of 16 bytes, 4 rows a chunk -> 2; empty: none;
    # the other four fit one chunk each
    assert len(sizes) == 7 + 25 + 2 + 4
    assert sum(sizes) == sum(t.numel() * t.element_size() for t in MIXED.values()) + sum(
        len(f"{k}|{t.dtype}|{tuple(t.shape)}\n") for k, t in MIXED.items()
    )
    monkeypatch.undo()
    changed = dict(MIXED, w=MIXED["w"].clone())
    changed["w"][99, 3] += 1e-3  # the last chunk's last value
    assert content_sha256(changed) != content_sha256(MIXED)


def _tamper(path, key: str = "blocks.3.mlp.fc2.bias", index: int = 7) -> torch.Tensor:
    """Change one value of one tensor, keeping the header: -> the changed tensor."""
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    tensors[key][index] += 1.0
    save_st(tensors, path, metadata=metadata)
    return tensors[key]


MODIFIED = "its tensors do not match the content_sha256 in its header: the file was modified or corrupted after it"


def test_modified_file_is_refused_unless_the_check_is_skipped(tmp_path, monkeypatch):
    path = tmp_path / "out.safetensors"
    convert_checkpoint(save_pth(native_sd(), tmp_path / "ckpt.pth"), path)
    load_model(path)  # intact: loads
    tampered = _tamper(path)
    err = expect_error("modified or corrupted", load_model, path)
    assert err.message == f"{path}: {MODIFIED} was written"
    assert "INTERNVIT_SKIP_HASH_CHECK=1" in err.fix
    expect_error("modified or corrupted", convert_checkpoint, path, tmp_path / "again.safetensors")
    model, _ = load_model(path, verify_hash=False)
    assert torch.equal(model.state_dict()["blocks.3.mlp.fc2.bias"], tampered)
    for value in ("1", "true"):
        monkeypatch.setenv("INTERNVIT_SKIP_HASH_CHECK", value)
        model, _ = load_model(path)
        assert torch.equal(model.state_dict()["blocks.3.mlp.fc2.bias"], tampered)
    monkeypatch.setenv("INTERNVIT_SKIP_HASH_CHECK", "0")
    expect_error("modified or corrupted", load_model, path)
    monkeypatch.setenv("INTERNVIT_SKIP_HASH_CHECK", "maybe")
    err = expect_error("neither 1 nor 0", load_model, path)
    assert err.message == "INTERNVIT_SKIP_HASH_CHECK='maybe' is neither 1 nor 0"


def test_flipped_byte_on_disk_is_refused(tmp_path):
    path = tmp_path / "out.safetensors"
    convert_checkpoint(save_pth(native_sd(), tmp_path / "ckpt.pth"), path)
    data = bytearray(path.read_bytes())
    data[-4] ^= 0x01  # lowest mantissa bit of the last float32 in the data section: still a finite number
    path.write_bytes(bytes(data))
    err = expect_error("modified or corrupted", load_model, path)
    assert err.message == f"{path}: {MODIFIED} was written"
    info = inspect_checkpoint(path)  # info reports it and does not refuse
    assert info["sha256_ok"] is False and info["non_finite_tensors"] == []


# ----------------------------------------------------------------------------------------------- info


def test_info_reports_non_finite_tensors_instead_of_failing(tmp_path, capsys):
    sd = native_sd()
    sd["blocks.0.attn.qkv.weight"][1, 2] = float("nan")
    sd["blocks.2.ls2.gamma"][0] = float("inf")
    path = save_pth(sd, tmp_path / "ckpt.pth")
    expect_error("2 tensor\\(s\\) hold NaN or Inf", load_model, path)
    info = inspect_checkpoint(path)
    assert info["non_finite_tensors"] == ["blocks.0.attn.qkv.weight", "blocks.2.ls2.gamma"]
    assert main(["info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["non_finite_tensors"] == info["non_finite_tensors"]
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert (
        "non_finite_tensors: 2 tensor(s) with NaN / Inf: blocks.0.attn.qkv.weight, blocks.2.ls2.gamma "
        "(loading refuses this file)" in out
    )
    clean = save_pth(native_sd(), tmp_path / "clean.pth")
    assert inspect_checkpoint(clean)["non_finite_tensors"] == []
    assert main(["info", str(clean)]) == 0
    assert "non_finite_tensors: 0 tensor(s) with NaN / Inf\n" in capsys.readouterr().out


def test_info_reports_a_header_preset_that_does_not_fit(tmp_path):
    path = tmp_path / "out.safetensors"
    meta = convert_checkpoint(save_pth(native_sd(), tmp_path / "ckpt.pth"), path)
    save_st(load_file(path), path, metadata=meta | {"preset": "internvit-6b-224px"})
    info = inspect_checkpoint(path)
    assert info["preset"] is None and info["presets_matching"] == ["debug"] and info["sha256_ok"] is True
    assert info["preset_error"].startswith(f"{path}: its header names preset 'internvit-6b-224px', but its tensors")
    assert "preset_error" not in inspect_checkpoint(save_pth(native_sd(), tmp_path / "plain.pth"))
