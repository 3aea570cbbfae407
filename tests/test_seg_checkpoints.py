"""mmseg-format segmentor checkpoints (docs/protocol.md §5.9): every wrapping, split into parts, strict backbone
load."""

import pytest
import torch
from conftest import TINY_6B, randomize_
from safetensors.torch import save_file

from internvit.errors import InternViTError
from internvit.model import build_model, get_config
from internvit.segmentation.build import build_segmentor
from internvit.segmentation.checkpoints import (
    PARTS,
    join_segmentor_state,
    load_segmentation_checkpoint,
    load_segmentor_weights,
    save_segmentation_checkpoint,
    split_segmentor_state,
)
from internvit.segmentation.config import SegBackboneConfig, SegHeadConfig
from internvit.weights import load_state_into, to_native

C = TINY_6B.embed_dim
NUM_CLASSES = 7
Tensors = dict[str, torch.Tensor]


def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=gen)


def _bn(gen: torch.Generator, prefix: str, c: int) -> Tensors:
    """A BatchNorm's five state tensors (mmseg ConvModule `bn` or the linear head's `norm`)."""
    return {
        f"{prefix}.weight": _rand(gen, c),
        f"{prefix}.bias": _rand(gen, c),
        f"{prefix}.running_mean": _rand(gen, c),
        f"{prefix}.running_var": _rand(gen, c).abs(),
        f"{prefix}.num_batches_tracked": torch.tensor(1234),
    }


def expected_parts(*, fpn: bool, aux: bool, seed: int = 0) -> dict[str, Tensors]:
    """The parts a tiny segmentor checkpoint should split into (heads: linear, or FCN-like with an auxiliary head)."""
    gen = torch.Generator().manual_seed(seed)
    backbone = {
        k: v.detach().clone() for k, v in randomize_(build_model(TINY_6B, init=False), seed).state_dict().items()
    }
    parts: dict[str, Tensors] = {part: {} for part in PARTS}
    parts["backbone"] = backbone
    if fpn:  # the original's adapters: up1 = ConvT, LayerNorm2d, GELU, ConvT; up2 = ConvT (docs/protocol.md §5.5)
        for name in ("up1.0", "up1.3", "up2.0"):
            parts["fpn"] |= {f"{name}.weight": _rand(gen, C, C, 2, 2), f"{name}.bias": _rand(gen, C)}
        parts["fpn"] |= {"up1.1.weight": _rand(gen, C), "up1.1.bias": _rand(gen, C)}
    parts["decode_head"] = _bn(gen, "norm", C) | {
        "conv_seg.weight": _rand(gen, NUM_CLASSES, C, 1, 1),
        "conv_seg.bias": _rand(gen, NUM_CLASSES),
    }
    if aux:
        parts["auxiliary_head"] = (
            {"convs.0.conv.weight": _rand(gen, 16, C, 3, 3)}
            | _bn(gen, "convs.0.bn", 16)
            | {"conv_seg.weight": _rand(gen, NUM_CLASSES, 16, 1, 1), "conv_seg.bias": _rand(gen, NUM_CLASSES)}
        )
    return parts


def mmseg_state(parts: dict[str, Tensors]) -> Tensors:
    """The mmseg key layout, written out by hand (not through join_segmentor_state)."""
    state = {f"backbone.{k}": v for k, v in parts["backbone"].items()}
    state |= {f"backbone.{k}": v for k, v in parts["fpn"].items()}
    state |= {f"decode_head.{k}": v for k, v in parts["decode_head"].items()}
    state |= {f"auxiliary_head.{k}": v for k, v in parts["auxiliary_head"].items()}
    return state


def _optimizer_state() -> dict:
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(3)
    opt.step()
    return opt.state_dict()


MMCV_META = {
    "mmseg_version": "0.30.0",
    "config": "model = dict(type='EncoderDecoder')",
    "CLASSES": ("wall", "building"),
    "PALETTE": [[120, 120, 120], [180, 120, 120]],
    "iter": 80000,
    "epoch": 63,
    "hook_msgs": {"last_ckpt": "work_dirs/iter_80000.pth"},
}

WRAPPINGS = {
    "bare": (lambda s: s, []),  # release.py: the `module` entry saved as is
    "state_dict": (lambda s: {"state_dict": s}, ["state_dict"]),
    "meta+state_dict": (
        lambda s: {"meta": MMCV_META, "state_dict": s, "optimizer": _optimizer_state()},
        ["state_dict"],
    ),
    "module": (lambda s: {"module": s, "ds_version": "0.9.5", "global_steps": 80000}, ["module"]),  # DeepSpeed
    "ddp_prefix": (lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}}, ["state_dict"]),
}


def assert_parts_equal(got: dict[str, Tensors], want: dict[str, Tensors]) -> None:
    assert set(got) == set(PARTS)
    for part in PARTS:
        assert sorted(got[part]) == sorted(want[part]), part
        for key, tensor in want[part].items():
            assert torch.equal(got[part][key], tensor), f"{part}: {key}"


# ----------------------------------------------------------------------------------------------- splitting


@pytest.mark.parametrize("wrapping", list(WRAPPINGS))
@pytest.mark.parametrize(
    ("fpn", "aux"), [(True, True), (False, False), (True, False)], ids=["upernet", "linear", "fpn"]
)
def test_load_every_wrapping(tmp_path, wrapping, fpn, aux):
    want = expected_parts(fpn=fpn, aux=aux)
    wrap, wrappers = WRAPPINGS[wrapping]
    path = tmp_path / "seg.pth"
    torch.save(wrap(mmseg_state(want)), path)
    parts, report = load_segmentation_checkpoint(path)
    assert_parts_equal(parts, want)
    assert report.wrappers == wrappers
    assert report.other == []
    assert report.num_tensors["fpn"] == (8 if fpn else 0)
    assert report.num_tensors["auxiliary_head"] == (len(want["auxiliary_head"]) if aux else 0)
    if wrapping == "meta+state_dict":
        assert report.meta["iter"] == 80000 and "config" not in report.meta and "hook_msgs" not in report.meta
    backbone = build_model(TINY_6B, init=False)
    load = load_state_into(backbone, to_native(parts["backbone"]), strict=True)
    assert load.ok and load.num_loaded == len(want["backbone"])
    for key, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, want["backbone"][key]), key


def test_split_routes_by_prefix():
    t = torch.zeros(1)
    keys = [
        "backbone.pos_embed",
        "backbone.blocks.3.attn.qkv.weight",
        "backbone.up1.3.bias",
        "backbone.up4.1.weight",  # with_final_norm=True only
        "backbone.upsample.weight",  # not FPN adapters: only up1. .. up4. are
        "backbone.up12.weight",
        "decode_head.psp_modules.0.1.conv.weight",
        "decode_head.conv_seg.weight",
        "auxiliary_head.convs.0.bn.running_var",
        "data_preprocessor.mean",
    ]
    parts = split_segmentor_state(dict.fromkeys(keys, t))
    assert {part: sorted(keys) for part, keys in parts.items()} == {
        "backbone": ["blocks.3.attn.qkv.weight", "pos_embed", "up12.weight", "upsample.weight"],
        "fpn": ["up1.3.bias", "up4.1.weight"],
        "decode_head": ["conv_seg.weight", "psp_modules.0.1.conv.weight"],
        "auxiliary_head": ["convs.0.bn.running_var"],
        "other": ["data_preprocessor.mean"],
    }
    assert sorted(join_segmentor_state(parts)) == sorted(keys)


def test_other_keys_are_reported(tmp_path):
    want = expected_parts(fpn=False, aux=False)
    state = mmseg_state(want) | {"data_preprocessor.mean": torch.ones(3)}
    torch.save(state, tmp_path / "seg.pth")
    parts, report = load_segmentation_checkpoint(tmp_path / "seg.pth")
    assert report.other == ["data_preprocessor.mean"]
    assert torch.equal(parts["other"]["data_preprocessor.mean"], torch.ones(3))
    assert "other       data_preprocessor.mean" in str(report)


# ----------------------------------------------------------------------------------------------- saving


def test_save_and_load_round_trip(tmp_path):
    want = expected_parts(fpn=True, aux=True)
    path = save_segmentation_checkpoint(want, tmp_path / "out" / "seg.safetensors", {"config": "upernet", "iter": "7"})
    assert [p.name for p in path.parent.iterdir()] == ["seg.safetensors"]  # no temporary file left behind
    parts, report = load_segmentation_checkpoint(path)
    assert_parts_equal(parts, want)
    assert report.metadata == {"internvit_layout": "mmseg-segmentor", "config": "upernet", "iter": "7"}
    assert report.wrappers == []


def test_saved_file_is_in_the_mmseg_layout(tmp_path):
    want = expected_parts(fpn=True, aux=False)
    path = save_segmentation_checkpoint(want, tmp_path / "seg.safetensors")
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        assert sorted(f.keys()) == sorted(mmseg_state(want))


def test_save_rejects_bad_input(tmp_path):
    parts = expected_parts(fpn=False, aux=False)
    with pytest.raises(ValueError, match="unknown checkpoint part"):
        save_segmentation_checkpoint({"head": parts["decode_head"]}, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="metadata"):
        save_segmentation_checkpoint(parts, tmp_path / "a.safetensors", {"iter": 7})
    with pytest.raises(ValueError, match="up1. .. up4."):
        save_segmentation_checkpoint({"fpn": {"neck.weight": torch.ones(1)}}, tmp_path / "a.safetensors")
    clash = {"backbone": {"up1.0.bias": torch.ones(1)}, "fpn": {"up1.0.bias": torch.ones(1)}}
    with pytest.raises(ValueError, match="two parts"):
        save_segmentation_checkpoint(clash, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="nothing to save"):
        save_segmentation_checkpoint({part: {} for part in PARTS}, tmp_path / "a.safetensors")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------- errors


def test_empty_file(tmp_path):
    torch.save({}, tmp_path / "empty.pth")
    with pytest.raises(InternViTError, match=r"empty\.pth: checkpoint holds no tensors"):
        load_segmentation_checkpoint(tmp_path / "empty.pth")
    torch.save({"meta": MMCV_META, "state_dict": {}}, tmp_path / "empty_meta.pth")
    with pytest.raises(InternViTError, match="holds no tensors"):
        load_segmentation_checkpoint(tmp_path / "empty_meta.pth")


def test_foreign_file_says_what_it_found(tmp_path):
    save_file({"model.layers.0.mlp.weight": torch.ones(2), "lm_head.weight": torch.ones(2)}, tmp_path / "x.safetensors")
    with pytest.raises(InternViTError, match=r"no backbone\.\* or decode_head\.\* keys \(found: lm_head\.weight, mod"):
        load_segmentation_checkpoint(tmp_path / "x.safetensors")


def test_bare_backbone_file_points_to_load_model(tmp_path):
    torch.save({"module": expected_parts(fpn=False, aux=False)["backbone"]}, tmp_path / "vit.pth")
    with pytest.raises(InternViTError, match="bare backbone \\(internvit layout") as info:
        load_segmentation_checkpoint(tmp_path / "vit.pth")
    assert "load_model" in info.value.fix


def test_auxiliary_head_alone_is_not_a_segmentor(tmp_path):
    torch.save({"auxiliary_head.conv_seg.bias": torch.ones(2)}, tmp_path / "aux.pth")
    with pytest.raises(InternViTError, match="not a segmentation checkpoint"):
        load_segmentation_checkpoint(tmp_path / "aux.pth")


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(InternViTError, match="no such file"):
        load_segmentation_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(InternViTError, match="cannot read"):
        load_segmentation_checkpoint(tmp_path / "junk.pth")


def _segmentor(seed: int):
    torch.manual_seed(seed)
    backbone = build_model(get_config("debug").replace(img_size=112))
    return build_segmentor(
        backbone,
        SegBackboneConfig(out_indices=[0, 1, 2, 3]),
        SegHeadConfig(kind="upernet", fpn=True, aux=True, channels=8),
    )


def _write_segmentor(state: Tensors, path, fmt: str):
    """A segmentor state in the released mmseg layout (FPN under backbone.up*), as .pth or our safetensors."""
    mmseg = {("backbone." + k[4:] if k.startswith("fpn.") else k): v for k, v in state.items()}
    if fmt == "pth":
        torch.save({"meta": {"iter": 80000}, "state_dict": mmseg}, path)
        return path
    return save_segmentation_checkpoint(split_segmentor_state(mmseg), path)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_non_finite_segmentor_weights_are_refused_and_nothing_is_loaded(tmp_path, fmt):
    state = {k: v.clone() for k, v in _segmentor(0).state_dict().items()}
    assert any(k.startswith("fpn.") for k in state)
    path = tmp_path / f"seg.{fmt}"
    state["decode_head.conv_seg.weight"][1, 0, 0, 0] = float("nan")
    state["fpn.up1.0.bias"][2] = float("-inf")
    _write_segmentor(state, path, fmt)
    target = _segmentor(1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(InternViTError, match="NaN or Inf") as info:
        load_segmentor_weights(target, str(path))
    # in the order the segmentor's state is assembled: the heads' parts, then the FPN
    assert info.value.message == (
        f"{path}: 2 tensor(s) hold NaN or Inf values: decode_head.conv_seg.weight, fpn.up1.0.bias"
    )
    assert info.value.fix
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    state["decode_head.conv_seg.weight"][1, 0, 0, 0] = 0.0  # the same weights made finite load
    state["fpn.up1.0.bias"][2] = 0.0
    _write_segmentor(state, path, fmt)
    load_segmentor_weights(target, str(path))
    assert all(torch.equal(v, state[k]) for k, v in target.state_dict().items())
