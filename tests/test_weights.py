"""Checkpoint reading, key maps, strict loading, preset matching and errors (docs/protocol.md §1.7-1.10)."""

import json
import time
from pathlib import Path

import pytest
import torch
from checkpoints import (
    CASES,
    CONFIGS,
    NotATensor,
    assert_same,
    clip_projector,
    expect_error,
    native_sd,
    prefixed,
    save_legacy_pth,
    save_pth,
    save_sharded,
    save_st,
    write_case,
)
from conftest import TINY_6B, TINY_300M, randomize_
from safetensors.torch import load_file

from internvit.classification.checkpoints import load_head_state, save_head
from internvit.classification.heads import ClsPatchConcatHead
from internvit.weights import (
    LAYOUTS,
    convert_checkpoint,
    detect_layout,
    files,
    from_native,
    load_model,
    to_native,
)
from internvit.weights.integrity import non_finite_tensors

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


def test_hf_internvit_block_keys_are_exactly_the_spec_list(cfg=TINY_6B):
    """Written out from docs/protocol.md §1.10, independent of the key-map table."""
    keys = {k for k in from_native(native_sd(cfg), "hf_internvit") if k.startswith("encoder.layers.0.")}
    parts = [
        "norm1.weight",
        "attn.qkv.weight",
        "attn.q_norm.weight",
        "attn.k_norm.weight",
        "attn.proj.weight",
        "attn.proj.bias",
        "ls1",
        "norm2.weight",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
        "ls2",
    ]
    assert keys == {f"encoder.layers.0.{p}" for p in parts}


def test_clip_projector_beside_a_vision_model_prefix_is_kept(tmp_path):
    sd = prefixed(from_native(native_sd(), "hf_internvit"), "vision_model.") | clip_projector(64)
    _, report = load_model(save_st(sd, tmp_path / "chat.safetensors"))
    assert sorted(report.extras) == sorted(clip_projector(64))


def test_checkpoint_loads_at_its_own_resolution_by_default(tmp_path):
    sd = native_sd()
    sd["pos_embed"] = torch.randn(1, 1 + 6 * 6, 64)  # fine-tuned at 84 px
    model, report = load_model(save_pth(sd, tmp_path / "ckpt.pth"))
    assert model.config.img_size == 84 and not report.resized
    assert torch.equal(model.pos_embed, sd["pos_embed"])


def test_patch_kernel_is_resized_to_the_model_patch_size(tmp_path):
    sd = native_sd()
    sd["patch_embed.proj.weight"] = torch.randn(64, 3, 16, 16)
    model, report = load_model(save_pth(sd, tmp_path / "ckpt.pth"))
    assert ("patch_embed.proj.weight", (64, 3, 16, 16), (64, 3, 14, 14)) in report.resized
    assert model.patch_embed.proj.weight.shape == (64, 3, 14, 14)


@pytest.mark.parametrize("name", ["ckpts/model.pth", "{tmp}/InternViT-6B"])
def test_mistyped_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path.parent)
    expect_error("no such file or folder", load_model, name.format(tmp=tmp_path.name))


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


# ----------------------------------------------------------------------------------------------- shard indexes


def _sharded(tmp_path: Path) -> tuple[Path, dict]:
    """A valid sharded hf_internvit folder (in tmp_path/model) and its parsed index."""
    index = save_sharded(from_native(native_sd(), "hf_internvit"), tmp_path / "model")
    return index, json.loads(index.read_text())


def _rewrite(index: Path, data: dict, key: str, value: object) -> None:
    data["weight_map"][key] = value
    index.write_text(json.dumps(data))


def _no_shard_reads(monkeypatch) -> None:
    """Make reading any checkpoint or safetensors header fail the test: checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a shard was read before the index was checked")

    for name in ("safe_open", "_load_file", "_is_safetensors"):
        monkeypatch.setattr(f"internvit.weights.files.{name}", refuse)


ENTRY = "embeddings.class_embedding"


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink-file", "symlink-folder"])
def test_index_entries_outside_the_folder_are_refused_before_any_read(tmp_path, monkeypatch, how):
    index, data = _sharded(tmp_path)
    folder = index.parent.resolve()
    outside = tmp_path / "elsewhere"
    save_st({"x": torch.zeros(2)}, outside / "stolen.safetensors")  # exists: refused for where it is, not absence
    if how == "dotdot":
        name, why = "../../elsewhere/stolen.safetensors", "outside the index's folder"
    elif how == "absolute":
        name, why = str(outside / "stolen.safetensors"), "outside the index's folder"
    elif how == "symlink-file":
        (index.parent / "evil.safetensors").symlink_to(outside / "stolen.safetensors")
        name, why = (
            "evil.safetensors",
            f"a symlink to {outside.resolve() / 'stolen.safetensors'}, outside the index's folder",
        )
    else:
        (index.parent / "sub").symlink_to(outside, target_is_directory=True)
        name, why = (
            "sub/stolen.safetensors",
            f"a symlink to {outside.resolve() / 'stolen.safetensors'}, outside the index's folder",
        )
    _rewrite(index, data, ENTRY, name)
    _no_shard_reads(monkeypatch)
    for source in (index, index.parent):
        err = expect_error("outside the index's folder", load_model, source)
        assert err.message == f"{index}: weight_map entry {ENTRY!r} names {name!r}, {why} {folder}"


def test_index_symlinks_inside_the_folder_and_the_hub_cache_layout_load(tmp_path):
    sd = native_sd()
    index, data = _sharded(tmp_path)
    shard = data["weight_map"][ENTRY]
    (index.parent / "alias.safetensors").symlink_to(index.parent / shard)  # a link that stays inside
    for key, value in data["weight_map"].items():
        if value == shard:
            data["weight_map"][key] = "alias.safetensors"
    index.write_text(json.dumps(data))
    assert_same(load_model(index.parent)[0].state_dict(), sd)
    # the Hugging Face cache: snapshots/REV/* are symlinks to ../../blobs/HASH (what snapshot_download returns)
    repo = tmp_path / "hub" / "models--OpenGVLab--tiny"
    snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for j, file in enumerate(sorted(index.parent.iterdir())):  # alias.safetensors too
        (blobs / f"blob{j}").write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("../../blobs") / f"blob{j}")
    model, report = load_model(snapshot)
    assert report.ok and report.layout == "hf_internvit"
    assert_same(model.state_dict(), sd)


def _bad_index_cases(index: Path) -> dict[str, tuple[str, str]]:
    """case -> (index text, the exact error message)."""
    try:
        json.loads("{not json")
    except json.JSONDecodeError as e:
        decode_error = str(e)
    shape = f"{index}: not a valid shard index (needs a non-empty 'weight_map' object of tensor name -> shard file)"
    entry = f"{index}: weight_map entry {ENTRY!r} is "
    return {
        "not-json": ("{not json", f"{index}: not a valid shard index (not JSON: {decode_error})"),
        "a-list": ("[1, 2]", shape),
        "no-weight_map": ('{"metadata": {"total_size": 0}}', shape),
        "weight_map-a-list": ('{"weight_map": ["model-00001-of-00003.safetensors"]}', shape),
        "empty-weight_map": ('{"weight_map": {}}', shape),
        "number-entry": (json.dumps({"weight_map": {ENTRY: 3}}), entry + "3, not a shard file name"),
        "null-entry": (json.dumps({"weight_map": {ENTRY: None}}), entry + "null, not a shard file name"),
        "list-entry": (json.dumps({"weight_map": {ENTRY: ["a"]}}), entry + '["a"], not a shard file name'),
        "empty-entry": (json.dumps({"weight_map": {ENTRY: ""}}), entry + '"", not a shard file name'),
    }


@pytest.mark.parametrize(
    "case",
    [
        "not-json",
        "a-list",
        "no-weight_map",
        "weight_map-a-list",
        "empty-weight_map",
        "number-entry",
        "null-entry",
        "list-entry",
        "empty-entry",
    ],
)
def test_malformed_index_is_a_clear_error_naming_it(tmp_path, monkeypatch, case):
    index, _ = _sharded(tmp_path)
    text, message = _bad_index_cases(index)[case]
    index.write_text(text)
    _no_shard_reads(monkeypatch)
    err = expect_error("shard index|weight_map entry", load_model, index)
    assert err.message == message


def test_index_naming_a_missing_shard(tmp_path):
    index, data = _sharded(tmp_path)
    _rewrite(index, data, ENTRY, "model-00009-of-00003.safetensors")
    err = expect_error("missing", load_model, index)
    assert err.message == f"{index}: 1 shard file(s) it lists are missing: model-00009-of-00003.safetensors"


# ----------------------------------------------------------------------------------------------- header preset


def _claiming(tmp_path: Path, preset: str) -> Path:
    """Our safetensors file of the debug-sized backbone whose header names `preset`."""
    path = tmp_path / "tiny.safetensors"
    meta = convert_checkpoint(save_pth(native_sd(), tmp_path / "ckpt.pth"), path)
    save_st(load_file(path), path, metadata=meta | {"preset": preset})
    return path


def _no_data_no_model(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was read or a model built before the header was checked")

    monkeypatch.setattr("internvit.weights.files._load_safetensors", refuse)
    monkeypatch.setattr("internvit.weights.loading.build_model", refuse)


def test_header_claiming_the_6b_preset_fails_before_reading_data_or_building(tmp_path, monkeypatch):
    path = _claiming(tmp_path, "internvit-6b-224px")
    _no_data_no_model(monkeypatch)
    err = expect_error("its header names preset 'internvit-6b-224px'", load_model, path)
    assert err.message == (
        f"{path}: its header names preset 'internvit-6b-224px', but its tensors do not fit it: "
        "embed_dim 64 vs 3200; depth 4 vs 48; mlp_hidden_dim 256 vs 12800 (checkpoint vs preset); "
        "e.g. cls_token: checkpoint (1, 1, 64) vs preset (1, 1, 3200)"
    )
    assert "use preset 'debug'" in err.fix
    # a preset asked for is checked from the header just as early, and wins over the header's
    err = expect_error("does not fit preset 'internvit-300m-448px'", load_model, path, preset="internvit-300m-448px")
    assert err.message == (
        "checkpoint does not fit preset 'internvit-300m-448px': embed_dim 64 vs 1024; depth 4 vs 24; "
        "mlp_hidden_dim 256 vs 4096; norm_type rms_norm vs layer_norm; qkv_bias False vs True; qk_norm True vs False "
        "(checkpoint vs preset); e.g. cls_token: checkpoint (1, 1, 64) vs preset (1, 1, 1024)"
    )


def test_header_preset_that_fits_still_loads(tmp_path):
    path = _claiming(tmp_path, "debug")
    model, report = load_model(path)
    assert report.preset == "debug" and report.ok
    assert_same(model.state_dict(), native_sd())
    expect_error("does not fit preset", load_model, path, preset="internvit-6b-224px")


# ----------------------------------------------------------------------------------------------- NaN / Inf


def test_non_finite_backbone_is_refused_before_building(tmp_path, monkeypatch):
    sd = native_sd()
    sd["pos_embed"][0, 3, 1] = float("-inf")
    sd["blocks.1.mlp.fc1.weight"][3, 5] = float("nan")
    sd["blocks.3.attn.proj.bias"][0] = float("inf")
    path = save_pth(sd, tmp_path / "ckpt.pth")
    monkeypatch.setattr("internvit.weights.loading.build_model", lambda *a, **k: pytest.fail("model built"))
    for strict in (True, False):
        err = expect_error("NaN or Inf", load_model, path, strict=strict)
        assert err.message == (
            f"{path}: 3 tensor(s) hold NaN or Inf values: pos_embed, blocks.1.mlp.fc1.weight, blocks.3.attn.proj.bias"
        )


def test_non_finite_listing_is_capped_and_names_the_file_of_a_folder(tmp_path):
    sd = native_sd()
    bad = [f"blocks.{i}.{p}" for i in range(4) for p in ("mlp.fc2.weight", "attn.qkv.weight")][:7]
    for key in bad:
        sd[key].view(-1)[-1] = float("nan")
    source, _, _ = write_case("hf-safetensors-folder", sd, tmp_path)
    err = expect_error("NaN or Inf", load_model, source)
    names = err.message.split("values: ")[1].split(", ... ")[0].split(", ")
    assert err.message.startswith(f"{source / 'model.safetensors'}: 7 tensor(s) hold NaN or Inf values: ")
    assert err.message.endswith(", ... (2 more)") and len(names) == 5 and set(names) < set(bad)


def test_non_finite_tensors_by_dtype():
    good = {
        "f32": torch.randn(4, 3),
        "bf16": torch.randn(5).bfloat16(),
        "f8": torch.tensor([1.0, -448.0, 0.0]).to(torch.float8_e4m3fn),  # no isfinite kernel: checked upcast
        "int": torch.tensor([2**62, -(2**62)]),
        "bool": torch.ones(3, dtype=torch.bool),
    }
    assert non_finite_tensors(good) == []
    bad = {
        "f16": torch.tensor([1.0, float("inf")]).half(),
        "f8-nan": torch.tensor([1.0, float("nan")]).to(torch.float8_e4m3fn),
        "f8e5m2": torch.tensor([float("-inf")]).to(torch.float8_e5m2),
        "f64": torch.tensor(float("nan"), dtype=torch.float64),
    }
    assert non_finite_tensors(good | bad) == list(bad)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_non_finite_head_is_refused_and_nothing_is_loaded(tmp_path, fmt):
    source = randomize_(ClsPatchConcatHead(64, 5), seed=1)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["head.weight"][2, 7] = float("nan")
    state["norm.running_var"][4] = float("inf")
    if fmt == "pth":
        path = save_pth({"model": state, "epoch": 3}, tmp_path / "head.pth")
    else:
        source.load_state_dict(state)
        path = save_head(source, tmp_path / "head.safetensors", metadata={})
    target = randomize_(ClsPatchConcatHead(64, 5), seed=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    for strict in (True, False):
        err = expect_error("NaN or Inf", load_head_state, path, target, strict=strict)
        order = "norm.running_var, head.weight" if fmt == "pth" else "head.weight, norm.running_var"  # file order
        assert err.message == f"{path}: 2 tensor(s) hold NaN or Inf values: {order}"
    assert_same(target.state_dict(), before)


def test_hub_cache_is_used_and_an_unreachable_hub_fails_at_once(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--name" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--org--name" / "refs").mkdir()
    (cache / "models--org--name" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(files, "hub_reachable", lambda timeout_s=3.0: pytest.fail("the cache needs no network"))
    assert files.download("org/name", "config.json") == snapshot / "config.json"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(files, "hub_reachable", lambda timeout_s=3.0: False)
    start = time.perf_counter()
    err = expect_error(
        "not in the local hub cache and the Hugging Face Hub is not reachable", files.download, "o/x", "m"
    )
    assert time.perf_counter() - start < 5 and "HF_HUB_OFFLINE=1" in err.fix
