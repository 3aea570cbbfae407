"""load_model(config=...): a custom (non-preset) architecture loads exactly; a config that does not fit is refused."""

import re

import pytest
import torch
from checkpoints import expect_error, native_sd, save_pth, save_sharded, save_st
from conftest import TINY_6B, TINY_300M, randomize_

from internvit.model import PRESETS, InternViTConfig, build_model
from internvit.weights import content_sha256, from_native, load_model

# 6B-type (RMSNorm, QK-norm, no qkv bias) at a width no preset has: only a config can build it
CUSTOM = InternViTConfig(embed_dim=48, depth=3, num_heads=3, mlp_hidden_dim=96, patch_size=14, img_size=56)
CONFIGS = {"rms": CUSTOM, "layer_norm": TINY_300M}
FORMATS = ("safetensors", "pth", "hf-sharded")


def _save(model: torch.nn.Module, fmt: str, tmp_path) -> object:
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        return save_st(sd, tmp_path / "custom.safetensors")
    if fmt == "pth":
        return save_pth(sd, tmp_path / "custom.pth")
    return save_sharded(from_native(sd, "hf_internvit"), tmp_path / "hf").parent


def _custom(cfg: InternViTConfig = CUSTOM) -> torch.nn.Module:
    return randomize_(build_model(cfg), seed=3).eval()


def _no_data_no_model(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was read or a model built before the config was checked")

    monkeypatch.setattr("internvit.weights.files._load_safetensors", refuse)
    monkeypatch.setattr("internvit.weights.loading.build_model", refuse)


def test_custom_architectures_are_no_preset():
    assert all(c.replace(img_size=56) != cfg for c in PRESETS.values() for cfg in CONFIGS.values())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", CONFIGS)
def test_custom_config_loads_exactly(tmp_path, fmt, name):
    cfg = CONFIGS[name]
    original = _custom(cfg)
    path = _save(original, fmt, tmp_path)
    expect_error("no preset has this checkpoint's architecture", load_model, path)  # why config= exists
    model, report = load_model(path, config=cfg)
    assert report.ok and report.preset is None and not report.resized
    assert report.num_loaded == len(original.state_dict())
    assert model.config == cfg
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), original(x))


def test_config_img_size_and_drop_path_rate(tmp_path):
    path = _save(_custom(), "safetensors", tmp_path)
    model, _ = load_model(path, config=CUSTOM.replace(img_size=112, drop_path_rate=0.1))
    assert model.config.img_size == 56  # the checkpoint's own grid, as for presets
    assert model.config.drop_path_rate == 0.1  # the config's own, unless given
    model, report = load_model(path, config=CUSTOM, img_size=84, drop_path_rate=0.2)
    assert model.config == CUSTOM.replace(img_size=84, drop_path_rate=0.2)
    assert report.resized == [("pos_embed", (1, 17, 48), (1, 37, 48))]


def test_preset_and_config_together_are_refused(tmp_path):
    path = _save(_custom(), "pth", tmp_path)
    err = expect_error(
        r"both a preset \('debug'\) and a config were given", load_model, path, preset="debug", config=CUSTOM
    )
    assert "pass one" in err.fix


# wrong config -> (message fragment, the fix's suggestion)
WRONG = {
    "depth-short": (
        CUSTOM.replace(depth=2),
        r"depth 3 vs 2 \(checkpoint vs config\); e\.g\. blocks\.2\.\S+: in the checkpoint, not in the config",
        "depth=3",
    ),
    "depth-long": (
        CUSTOM.replace(depth=4),
        r"depth 3 vs 4 \(checkpoint vs config\); e\.g\. blocks\.3\.\S+: in the config, not in the checkpoint",
        "depth=3",
    ),
    "embed_dim": (
        CUSTOM.replace(embed_dim=64, num_heads=4),
        r"embed_dim 48 vs 64 \(checkpoint vs config\); e\.g\. cls_token: checkpoint \(1, 1, 48\) vs config "
        r"\(1, 1, 64\)",
        "embed_dim=48",
    ),
    "mlp": (
        CUSTOM.replace(mlp_hidden_dim=192),
        r"mlp_hidden_dim 96 vs 192 \(checkpoint vs config\); e\.g\. blocks\.0\.mlp\.fc1\.weight: checkpoint "
        r"\(96, 48\) vs config \(192, 48\)",
        "mlp_hidden_dim=96",
    ),
    "patch_size": (
        CUSTOM.replace(patch_size=16, img_size=64),
        r"patch_size 14 vs 16 \(checkpoint vs config\); e\.g\. patch_embed\.proj\.weight: checkpoint "
        r"\(48, 3, 14, 14\) vs config \(48, 3, 16, 16\)",
        "patch_size=14",
    ),
    "layer_norm": (
        CUSTOM.replace(norm_type="layer_norm", qkv_bias=True, qk_norm=False),
        r"norm_type rms_norm vs layer_norm; qkv_bias False vs True; qk_norm True vs False \(checkpoint vs config\); "
        r"e\.g\. blocks\.0\.attn\.[qk]_norm\.weight: in the checkpoint, not in the config",
        "norm_type='rms_norm', qkv_bias=False, qk_norm=True",
    ),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", WRONG)
def test_config_that_does_not_fit_is_refused_naming_the_difference(tmp_path, monkeypatch, fmt, case):
    cfg, match, fix = WRONG[case]
    path = _save(_custom(), fmt, tmp_path)
    if fmt == "safetensors":
        _no_data_no_model(monkeypatch)  # refused from the header alone
    else:
        monkeypatch.setattr("internvit.weights.loading.build_model", lambda *a, **k: pytest.fail("model built"))
    err = expect_error("checkpoint does not fit the given config", load_model, path, config=cfg)
    assert re.fullmatch("checkpoint does not fit the given config: " + match, err.message), err.message
    assert f"build the InternViTConfig with {fix}" in err.fix
    assert "or load it as preset" not in err.fix  # no preset has this architecture


def test_config_for_a_preset_checkpoint_suggests_the_preset(tmp_path):
    path = save_pth(native_sd(TINY_6B), tmp_path / "debug.pth")
    err = expect_error("depth 4 vs 3", load_model, path, config=TINY_6B.replace(depth=3))
    assert "or load it as preset 'debug'" in err.fix
    model, report = load_model(path, config=TINY_6B)  # a config equal to a preset's loads like it
    assert report.ok and model.config == TINY_6B


def test_config_keeps_the_hash_and_non_finite_checks(tmp_path):
    sd = {k: v.detach().clone() for k, v in _custom().state_dict().items()}
    digest = content_sha256(sd)
    sd["blocks.0.mlp.fc1.bias"][0] += 1.0  # modified after the hash was written
    path = save_st(sd, tmp_path / "tampered.safetensors", metadata={"content_sha256": digest})
    expect_error("do not match the content_sha256", load_model, path, config=CUSTOM)
    assert load_model(path, config=CUSTOM, verify_hash=False)[1].ok
    sd["blocks.1.attn.proj.weight"][0, 0] = float("nan")
    path = save_pth(sd, tmp_path / "nan.pth")
    expect_error("NaN or Inf", load_model, path, config=CUSTOM)
