"""Segmentation optimizer (docs/protocol.md §5.7): BEiT layer ids, layer-decay LR scales, weight-decay groups, poly
warmup."""

import functools
import math

import pytest
import torch
from conftest import TINY_6B
from torch import nn

from internvit.engine.optim import build_adamw, describe_groups, layer_id, param_groups
from internvit.engine.schedule import StepScheduler, poly_lr
from internvit.model import build_model

NUM_BLOCKS = TINY_6B.depth  # 4
HEAD = NUM_BLOCKS + 1


class FakeSegmentor(nn.Module):
    """Backbone at `backbone.` (with the original's FPN adapter inside it), a conv + BN decode head, a `neck`."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = build_model(TINY_6B)
        c = TINY_6B.embed_dim
        self.backbone.up1 = nn.Sequential(nn.ConvTranspose2d(c, c, 2, 2))  # the original keeps FPN in the backbone
        self.neck = nn.Conv2d(c, c, 1)
        self.decode_head = nn.Module()
        self.decode_head.norm = nn.BatchNorm2d(c)
        self.decode_head.conv_seg = nn.Conv2d(c, 7, 1)


@pytest.fixture
def seg():
    torch.manual_seed(0)
    return FakeSegmentor()


def groups_by_param(groups):
    return {name: g for g in groups for name in g["param_names"]}


# ----------------------------------------------------------------------------------------------- layer ids


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("backbone.cls_token", 0),
        ("backbone.pos_embed", 0),
        ("backbone.patch_embed.proj.weight", 0),
        ("backbone.patch_embed.proj.bias", 0),
        ("backbone.blocks.0.attn.qkv.weight", 1),
        ("backbone.blocks.7.mlp.fc1.bias", 8),
        ("backbone.blocks.47.ls2.gamma", 48),
        ("backbone.up1.0.weight", 49),
        ("backbone.up2.0.bias", 49),
        ("decode_head.conv_seg.weight", 49),
        ("decode_head.psp_modules.0.1.conv.weight", 49),
        ("auxiliary_head.convs.0.bn.weight", 49),
        ("fpn.up1.0.weight", 49),
        ("cls_token", 49),  # not segmentor-relative: the original's rule gives it the head's id too
        ("blocks.3.norm1.weight", 49),
    ],
)
def test_layer_id_48_blocks(name, expected):
    assert layer_id(name, 48) == expected


def test_layer_ids_and_lr_scales_48_blocks():
    """The published scales with rate 0.95: block 47 -> 0.95, block 0 -> ~0.0853, embeddings ~0.0810, heads 1."""

    class Deep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Module()
            self.backbone.pos_embed = nn.Parameter(torch.zeros(1, 2, 2))
            self.backbone.blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(48))
            self.decode_head = nn.Conv2d(2, 3, 1)

    groups = groups_by_param(param_groups(Deep(), base_lr=4e-5, weight_decay=0.05, layer_decay=0.95, num_blocks=48))
    assert groups["backbone.blocks.47.weight"]["lr_scale"] == pytest.approx(0.95)
    assert groups["backbone.blocks.0.weight"]["lr_scale"] == pytest.approx(0.95**48)
    assert groups["backbone.blocks.0.weight"]["lr_scale"] == pytest.approx(0.0853, abs=5e-5)
    assert groups["backbone.pos_embed"]["lr_scale"] == pytest.approx(0.0810, abs=5e-5)
    assert groups["decode_head.weight"]["lr_scale"] == 1.0
    assert groups["backbone.blocks.0.weight"]["lr"] == pytest.approx(4e-5 * 0.95**48)
    assert {g["layer_id"] for g in groups.values()} == {0, *range(1, 49), 49}


def test_wrapper_name_parts_are_ignored():
    """torch.compile / activation checkpointing / DDP insert name parts that must not change the layer id."""
    seg = nn.Module()
    seg.backbone = nn.Module()
    seg.backbone.blocks = nn.ModuleList([nn.Module()])
    seg.backbone.blocks[0]._checkpoint_wrapped_module = nn.Linear(2, 2)
    wrapped = nn.Module()
    wrapped._orig_mod = seg
    ddp = nn.Module()
    ddp.module = wrapped  # DistributedDataParallel keeps the model at `.module`
    for model in (wrapped, ddp):
        groups = groups_by_param(param_groups(model, base_lr=1.0, weight_decay=0.1, num_blocks=1))
        assert {n: g["layer_id"] for n, g in groups.items()} == {
            "backbone.blocks.0.weight": 1,
            "backbone.blocks.0.bias": 1,
        }


# ----------------------------------------------------------------------------------------------- groups


def test_lr_scales_debug_segmentor(seg):
    groups = groups_by_param(param_groups(seg, base_lr=4e-5, weight_decay=0.05, layer_decay=0.95, num_blocks=4))
    expected = {
        "backbone.cls_token": 0.95**5,
        "backbone.pos_embed": 0.95**5,
        "backbone.patch_embed.proj.bias": 0.95**5,
        "backbone.blocks.0.attn.qkv.weight": 0.95**4,
        "backbone.blocks.3.mlp.fc2.weight": 0.95,
        "backbone.up1.0.weight": 1.0,
        "neck.weight": 1.0,
        "decode_head.conv_seg.weight": 1.0,
        "decode_head.norm.weight": 1.0,
    }
    for name, scale in expected.items():
        assert groups[name]["lr_scale"] == pytest.approx(scale), name
        assert groups[name]["lr"] == pytest.approx(4e-5 * scale), name
    assert groups["backbone.blocks.3.ls1.gamma"]["layer_id"] == 4
    assert groups["decode_head.conv_seg.bias"]["layer_id"] == HEAD


def test_weight_decay_membership_with_quirk(seg):
    groups = groups_by_param(param_groups(seg, base_lr=1e-3, weight_decay=0.05, num_blocks=NUM_BLOCKS))
    decayed = {n for n, g in groups.items() if g["weight_decay"] == 0.05}
    not_decayed = {n for n, g in groups.items() if g["weight_decay"] == 0.0}
    assert decayed | not_decayed == set(groups)
    # the original's quirk: pos_embed / cls_token DO get weight decay (§5.7, §7.8)
    assert {"backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed.proj.weight"} <= decayed
    assert {"backbone.blocks.0.attn.qkv.weight", "backbone.up1.0.weight", "decode_head.conv_seg.weight"} <= decayed
    # 1-D tensors (norms, LayerScale, BN) and every `.bias` do not
    for name in (
        "backbone.patch_embed.proj.bias",
        "backbone.blocks.0.norm1.weight",
        "backbone.blocks.0.attn.q_norm.weight",
        "backbone.blocks.2.ls2.gamma",
        "backbone.blocks.1.mlp.fc1.bias",
        "backbone.up1.0.bias",
        "decode_head.norm.weight",
        "decode_head.conv_seg.bias",
    ):
        assert name in not_decayed, name
    assert groups["backbone.cls_token"]["name"] == "layer_0_decay"
    assert groups["decode_head.conv_seg.bias"]["name"] == f"layer_{HEAD}_no_decay"


def test_weight_decay_quirk_off(seg):
    groups = groups_by_param(
        param_groups(seg, base_lr=1e-3, weight_decay=0.05, num_blocks=NUM_BLOCKS, quirk_decay_pos_embed=False)
    )
    for name in ("backbone.cls_token", "backbone.pos_embed"):
        assert groups[name]["weight_decay"] == 0.0
        assert groups[name]["name"] == "layer_0_no_decay"
    assert groups["backbone.patch_embed.proj.weight"]["weight_decay"] == 0.05


def test_every_trainable_param_in_exactly_one_group_in_a_fixed_order(seg):
    groups = param_groups(seg, base_lr=1e-3, weight_decay=0.05, layer_decay=0.9, num_blocks=NUM_BLOCKS)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in seg.parameters()}
    assert all(len(g["params"]) == len(g["param_names"]) for g in groups)
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names))
    assert names[:4] == ["layer_0_decay", "layer_0_no_decay", "layer_1_no_decay", "layer_1_decay"]  # first-seen order
    assert names == [g["name"] for g in param_groups(FakeSegmentor(), base_lr=1, weight_decay=1, num_blocks=4)]
    assert len(groups) == 2 * (NUM_BLOCKS + 2)


def test_frozen_params_are_skipped(seg):
    seg.backbone.requires_grad_(False)
    seg.backbone.up1.requires_grad_(True)  # created after freezing in the original, so trainable
    groups = param_groups(seg, base_lr=1e-3, weight_decay=0.05, layer_decay=0.95, num_blocks=NUM_BLOCKS)
    assert {g["layer_id"] for g in groups} == {HEAD}
    names = {n for g in groups for n in g["param_names"]}
    assert "backbone.up1.0.weight" in names
    assert not any(n.startswith(("backbone.blocks", "backbone.pos_embed")) for n in names)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in seg.parameters() if p.requires_grad}


def test_bad_arguments(seg):
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups(seg, base_lr=1e-3, weight_decay=0.05, layer_decay=0.0, num_blocks=4)
    with pytest.raises(ValueError, match="num_blocks=3"):  # the model has blocks 0..3
        param_groups(seg, base_lr=1e-3, weight_decay=0.05, num_blocks=3)
    with pytest.raises(ValueError, match="base_lr"):
        param_groups(seg, base_lr=0.0, weight_decay=0.05, num_blocks=4)
    seg.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_adamw(seg, num_blocks=4)


def test_describe_groups(seg):
    groups = param_groups(seg, base_lr=1e-3, weight_decay=0.0, layer_decay=0.5, num_blocks=NUM_BLOCKS)
    rows = {r["name"]: r for r in describe_groups(groups)}
    assert rows["layer_0_decay"]["decay"] is True  # a decay group even when weight_decay is 0 (linear probing)
    assert rows["layer_0_decay"]["num_tensors"] == 3  # cls_token, pos_embed, patch_embed.proj.weight
    c = TINY_6B.embed_dim
    assert rows["layer_0_decay"]["num_params"] == c + (1 + TINY_6B.grid_size**2) * c + c * 3 * 14 * 14
    assert rows["layer_0_decay"]["lr_scale"] == pytest.approx(0.5**5)
    assert sum(r["num_params"] for r in rows.values()) == sum(p.numel() for p in seg.parameters())


# ----------------------------------------------------------------------------------------------- AdamW


def test_build_adamw_uses_the_groups(seg):
    opt = build_adamw(seg, base_lr=0.1, weight_decay=0.5, layer_decay=0.5, num_blocks=NUM_BLOCKS)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["name"] for g in opt.param_groups] == [
        g["name"] for g in param_groups(seg, base_lr=0.1, weight_decay=0.5, num_blocks=NUM_BLOCKS)
    ]
    assert all(g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 for g in opt.param_groups)
    before = {n: p.detach().clone() for n, p in seg.named_parameters()}
    for p in seg.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # zero gradients: AdamW only applies its decoupled decay, p <- p (1 - lr wd), per group
    after = dict(seg.named_parameters())
    by_name = groups_by_param(opt.param_groups)
    for name in ("backbone.pos_embed", "backbone.blocks.0.attn.qkv.weight", "decode_head.conv_seg.weight"):
        g = by_name[name]
        assert torch.allclose(after[name], before[name] * (1 - g["lr"] * 0.5)), name
    assert by_name["backbone.pos_embed"]["lr"] == pytest.approx(0.1 * 0.5**5)
    for name in ("backbone.blocks.0.norm1.weight", "decode_head.conv_seg.bias"):
        assert torch.equal(after[name], before[name]), name


# ----------------------------------------------------------------------------------------------- schedule


def test_poly_warmup_by_hand():
    """mmcv Poly (power 1, min_lr 0) with multiplicative linear warmup 1e-6, t = 0-based iteration (§5.7)."""
    lr = functools.partial(poly_lr, base_lr=4e-5, total_steps=80_000, warmup_steps=1500, warmup_ratio=1e-6)
    assert lr(0) == pytest.approx(4e-5 * 1e-6, rel=1e-12)
    assert lr(750) == pytest.approx(4e-5 * (1 - 750 / 80_000) * (0.5 + 0.5e-6), rel=1e-12)
    assert lr(1499) == pytest.approx(4e-5 * (1 - 1499 / 80_000) * (1 - (1 / 1500) * (1 - 1e-6)), rel=1e-12)
    assert lr(1500) == pytest.approx(3.925e-5, rel=1e-12)  # warmup over: the plain poly value
    assert lr(40_000) == pytest.approx(2e-5, rel=1e-12)
    assert lr(79_999) == pytest.approx(5e-10, rel=1e-9)  # last iteration
    few_shot = functools.partial(poly_lr, base_lr=4e-5, total_steps=5000, warmup_steps=100)
    assert few_shot(50) == pytest.approx(4e-5 * 0.99 * (0.5 + 0.5e-6), rel=1e-12)


def test_poly_per_group_like_mmcv(seg):
    """Before iteration t every group runs at its own initial lr (scale * base) times the schedule's factor."""
    opt = build_adamw(seg, base_lr=4e-5, weight_decay=0.05, layer_decay=0.95, num_blocks=NUM_BLOCKS)
    initial = [g["lr"] for g in opt.param_groups]
    lr_fn = functools.partial(poly_lr, base_lr=4e-5, total_steps=100, warmup_steps=10)
    sched = StepScheduler(opt, lr_fn, lag_one_step=False)

    def mmcv_lr(base: float, t: int) -> float:
        regular = base * (1 - t / 100)
        return regular * (1 - (1 - t / 10) * (1 - 1e-6)) if t < 10 else regular

    for t in range(100):  # iteration t runs with the LR set before it
        for group, base in zip(opt.param_groups, initial, strict=True):
            assert group["lr"] == pytest.approx(mmcv_lr(base, t), rel=1e-12, abs=0), (t, group["name"])
        sched.step_update(t)
    assert math.isclose(opt.param_groups[0]["lr"], 0.0, abs_tol=0.0)  # after the last iteration


def test_any_bias_gets_no_decay_whatever_its_shape():
    seg = nn.Module()
    seg.decode_head = nn.Module()
    seg.decode_head.bias = nn.Parameter(torch.zeros(2, 2))  # e.g. a per-class-per-channel bias
    seg.decode_head.scale = nn.Parameter(torch.zeros(()))  # 0-D: decays, as in the original (only ndim == 1 is spared)
    groups = groups_by_param(param_groups(seg, base_lr=1.0, weight_decay=0.1, num_blocks=1))
    assert groups["decode_head.bias"]["weight_decay"] == 0.0
    assert groups["decode_head.scale"]["weight_decay"] == 0.1
