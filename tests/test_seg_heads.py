"""Segmentation heads, FPN adapter, loss and segmentor (docs/protocol.md §5.3, §5.5, §5.6): sizes, names, numerics."""

import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_6B, randomize_

from internvit.errors import InternViTError
from internvit.model import build_model
from internvit.segmentation.heads import (
    ChannelsFirstLayerNorm,
    FCNAuxHead,
    FPNAdapter,
    LinearHead,
    UPerHead,
    seg_cross_entropy,
)
from internvit.segmentation.segmentor import Segmentor, predict, slide_inference, window_grid

C, CH, K = 32, 16, 5


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randomize_bn_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN affine and running statistics, so that eval-mode BN is not the identity."""
    g = gen(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return module


def trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ---------------------------------------------------------------- sizes and names at InternViT-6B scale (meta)


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: LinearHead(3200), 486_550),
        (lambda: FPNAdapter(3200), 122_896_000),
        (lambda: UPerHead((3200,) * 4, channels=1536), 312_480_918),
        (lambda: FCNAuxHead(3200, channels=1536), 44_470_422),
    ],
    ids=["linear", "fpn", "upernet", "aux"],
)
def test_param_counts_at_6b_scale(build, expected):
    with torch.device("meta"):
        module = build()
    assert trainable(module) == expected


def test_meta_build_then_init():
    with torch.device("meta"):
        head = LinearHead(3200)
    head.to_empty(device="cpu").init_weights()
    assert head.conv_seg.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.all(head.conv_seg.bias == 0) and torch.all(head.norm.running_var == 1)


def test_state_dict_names_follow_mmseg():
    with torch.device("meta"):
        uper, aux, linear, fpn = UPerHead((C,) * 4, CH, K), FCNAuxHead(C, CH, K), LinearHead(C, K), FPNAdapter(C)
    prefixes = {k.rsplit(".", 1)[0] for k in uper.state_dict()}
    expected = {f"psp_modules.{i}.1.{m}" for i in range(4) for m in ("conv", "bn")}
    expected |= {f"{n}.{i}.{m}" for n in ("lateral_convs", "fpn_convs") for i in range(3) for m in ("conv", "bn")}
    expected |= {"bottleneck.conv", "bottleneck.bn", "fpn_bottleneck.conv", "fpn_bottleneck.bn", "conv_seg"}
    assert prefixes == expected
    assert "bottleneck.conv.bias" not in uper.state_dict()  # ConvModule convs have no bias
    assert set(aux.state_dict()) == {
        "convs.0.conv.weight",
        *(f"convs.0.bn.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")),
        "conv_seg.weight",
        "conv_seg.bias",
    }
    assert {k.split(".")[0] for k in linear.state_dict()} == {"norm", "conv_seg"}
    assert set(fpn.state_dict()) == {
        f"{m}.{p}" for m in ("up1.0", "up1.1", "up1.3", "up2.0") for p in ("weight", "bias")
    }


def test_init_statistics():
    torch.manual_seed(0)
    linear = LinearHead(256, 150)
    assert linear.conv_seg.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.all(linear.conv_seg.bias == 0) and torch.all(linear.norm.weight == 1)
    assert linear.norm.eps == 1e-5 and linear.norm.momentum == 0.1
    uper = UPerHead((64,) * 4, channels=64, num_classes=K)
    w = uper.fpn_bottleneck.conv.weight  # kaiming normal, fan_out = 64 * 3 * 3, relu gain
    assert w.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.05)
    assert abs(w.mean().item()) < 0.01
    assert uper.dropout.p == pytest.approx(0.1) and isinstance(uper.dropout, torch.nn.Dropout2d)
    fpn = FPNAdapter(64)
    assert fpn.up2[0].weight.std().item() == pytest.approx(math.sqrt(2 / (4 * 64)), rel=0.05)
    assert torch.all(fpn.up1[0].bias == 0) and torch.all(fpn.up1[1].weight == 1) and torch.all(fpn.up1[1].bias == 0)


# ---------------------------------------------------------------- numerics against hand computations


def test_channels_first_layernorm_by_hand():
    x = torch.randn(2, 8, 3, 4, generator=gen(1))
    ln = ChannelsFirstLayerNorm(8)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(8, generator=gen(2)))
        ln.bias.copy_(torch.randn(8, generator=gen(3)))
    b, i, j = 1, 2, 3  # one pixel, normalised over its 8 channels with the biased variance
    v = x[b, :, i, j]
    mean = sum(v.tolist()) / 8
    var = sum((t - mean) ** 2 for t in v.tolist()) / 8
    by_hand = [
        (t - mean) / math.sqrt(var + 1e-6) * g + c
        for t, g, c in zip(v.tolist(), ln.weight.tolist(), ln.bias.tolist(), strict=True)
    ]
    torch.testing.assert_close(ln(x)[b, :, i, j], torch.tensor(by_hand), rtol=1e-5, atol=1e-5)
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (8,), ln.weight, ln.bias, 1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(ln(x), ref, rtol=1e-5, atol=1e-5)
    out = ln(x.bfloat16())  # statistics in fp32, result back in the input dtype
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ln(x.bfloat16().float()).bfloat16())


def test_fpn_levels_and_ops():
    fpn = FPNAdapter(C).eval()
    maps = [torch.randn(2, C, 36, 36, generator=gen(i)) for i in range(4)]
    out = fpn(maps)
    assert [tuple(o.shape[-2:]) for o in out] == [(144, 144), (72, 72), (36, 36), (18, 18)]
    up1 = fpn.up1
    y = F.conv_transpose2d(maps[0], up1[0].weight, up1[0].bias, stride=2)
    y = F.gelu(up1[1](y))
    torch.testing.assert_close(out[0], F.conv_transpose2d(y, up1[3].weight, up1[3].bias, stride=2))
    torch.testing.assert_close(out[1], F.conv_transpose2d(maps[1], fpn.up2[0].weight, fpn.up2[0].bias, stride=2))
    assert torch.equal(out[2], maps[2])
    assert torch.equal(out[3], F.max_pool2d(maps[3], 2, 2))
    with pytest.raises(ValueError, match="4 feature maps"):
        fpn(maps[:3])


def test_linear_head_by_hand():
    head = randomize_bn_(LinearHead(C, K)).eval()
    x = torch.randn(2, C, 3, 3, generator=gen(4))
    bn = head.norm
    normed = (x - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + 1e-5)
    normed = normed * bn.weight[:, None, None] + bn.bias[:, None, None]
    by_hand = (
        torch.einsum("bchw,kc->bkhw", normed, head.conv_seg.weight[:, :, 0, 0]) + head.conv_seg.bias[:, None, None]
    )
    torch.testing.assert_close(head(x), by_hand, rtol=1e-5, atol=1e-5)
    other = torch.randn(2, 7, 5, 5)
    torch.testing.assert_close(head([other, x]), by_hand, rtol=1e-5, atol=1e-5)  # in_index -1: the last map
    with pytest.raises(ValueError, match=r"\(B, 32, h, w\)"):
        head(other)


def _conv_module(x, cm, padding):
    bn = cm.bn
    y = F.conv2d(x, cm.conv.weight, padding=padding)
    return F.relu(F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))


def _up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def reference_upernet(head: UPerHead, feats: list[torch.Tensor], scales=(1, 2, 3, 6)) -> torch.Tensor:
    """UperNet written out from §5.6 with functional ops (eval mode), reusing only the head's weights."""
    top = feats[3]
    pooled = [
        _up(_conv_module(F.adaptive_avg_pool2d(top, s), head.psp_modules[i][1], 0), top.shape[2:])
        for i, s in enumerate(scales)
    ]
    lat3 = _conv_module(torch.cat([top, *pooled], dim=1), head.bottleneck, 1)
    lat2 = _conv_module(feats[2], head.lateral_convs[2], 0) + _up(lat3, feats[2].shape[2:])
    lat1 = _conv_module(feats[1], head.lateral_convs[1], 0) + _up(lat2, feats[1].shape[2:])
    lat0 = _conv_module(feats[0], head.lateral_convs[0], 0) + _up(lat1, feats[0].shape[2:])
    outs = [_conv_module(lat, conv, 1) for lat, conv in zip((lat0, lat1, lat2), head.fpn_convs, strict=True)] + [lat3]
    size = outs[0].shape[2:]
    fused = _conv_module(torch.cat([outs[0]] + [_up(o, size) for o in outs[1:]], dim=1), head.fpn_bottleneck, 1)
    return F.conv2d(fused, head.conv_seg.weight, head.conv_seg.bias)


def test_upernet_matches_reference():
    head = randomize_bn_(UPerHead((C,) * 4, CH, K)).eval()
    with torch.no_grad():
        head.conv_seg.weight.normal_(0, 0.3, generator=gen(5))
    feats = [torch.randn(2, C, s, s, generator=gen(10 + s)) for s in (48, 24, 12, 6)]
    out = head(feats)
    assert out.shape == (2, K, 48, 48)
    torch.testing.assert_close(out, reference_upernet(head, feats), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="4 feature maps"):
        head(feats[:3])


def test_upernet_and_aux_train_mode_shapes():
    uper, aux = UPerHead((C,) * 4, CH, K).train(), FCNAuxHead(C, CH, K).train()
    feats = FPNAdapter(C)([torch.randn(2, C, 36, 36, generator=gen(i)) for i in range(4)])
    assert uper(feats).shape == (2, K, 144, 144)
    assert aux(feats[1]).shape == (2, K, 72, 72)
    aux.eval()
    x = torch.randn(1, C, 6, 6, generator=gen(6))
    cm = aux.convs[0]
    by_hand = F.conv2d(_conv_module(x, cm, 1), aux.conv_seg.weight, aux.conv_seg.bias)  # dropout off in eval
    torch.testing.assert_close(aux(x), by_hand)


# ---------------------------------------------------------------- loss


def _ce(logit_pair: tuple[float, float], target: int) -> float:
    return math.log(sum(math.exp(v) for v in logit_pair)) - logit_pair[target]


def test_cross_entropy_normalisation_by_hand():
    pixels = {(0, 0): (2.0, 0.0), (0, 1): (0.5, 1.5), (1, 0): (3.0, -3.0), (1, 1): (1.0, -1.0)}
    logits = torch.zeros(1, 2, 2, 2)
    for (i, j), pair in pixels.items():
        logits[0, :, i, j] = torch.tensor(pair)
    label = torch.tensor([[[0, 1], [255, 1]]])
    total = _ce(pixels[(0, 0)], 0) + _ce(pixels[(0, 1)], 1) + _ce(pixels[(1, 1)], 1)  # (1, 0) is ignored
    assert seg_cross_entropy(logits, label).item() == pytest.approx(total / 4, rel=1e-6)  # all 4 pixels
    assert seg_cross_entropy(logits, label, avg_non_ignore=True).item() == pytest.approx(total / 3, rel=1e-6)
    assert seg_cross_entropy(logits.bfloat16(), label[:, None]).dtype == torch.float32
    small = torch.tensor([2.0, 0.0]).reshape(1, 2, 1, 1)  # upsampled to the 2x2 label: the same logits everywhere
    assert seg_cross_entropy(small, label).item() == pytest.approx((_ce((2, 0), 0) + 2 * _ce((2, 0), 1)) / 4, rel=1e-6)
    ignored = torch.full((1, 2, 2), 255)
    assert seg_cross_entropy(logits, ignored, avg_non_ignore=True).item() == 0.0


# ---------------------------------------------------------------- segmentor


def tiny_backbone(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_(build_model(TINY_6B, dtype=dtype)).eval()


def test_segmentor_linear_forward_and_loss():
    dim = TINY_6B.embed_dim
    seg = Segmentor(tiny_backbone(), LinearHead(dim, K), out_indices=[2])
    x = torch.randn(2, 3, 56, 84, generator=gen(7))
    assert seg(x).shape == (2, K, 4, 6)
    label = torch.randint(0, K, (2, 56, 84), generator=gen(8))
    label[:, :10] = 255
    out = seg.loss(x, label)
    assert set(out) == {"loss", "decode", "acc_seg"}
    torch.testing.assert_close(out["loss"], seg_cross_entropy(seg(x), label))
    hits = (_up(seg(x), (56, 84)).argmax(1) == label)[label != 255]
    assert out["acc_seg"].item() == pytest.approx(100 * hits.float().mean().item(), rel=1e-5)
    assert seg.loss(x, label[:, None])["acc_seg"] == out["acc_seg"]  # (B, 1, H, W) labels too


def test_segmentor_upernet_fpn_aux():
    dim = TINY_6B.embed_dim
    aux = FCNAuxHead(dim, CH, K)
    seen = []
    aux.register_forward_hook(lambda _m, args, _o: seen.append(tuple(args[0].shape)))
    seg = Segmentor(
        tiny_backbone(),
        UPerHead((dim,) * 4, CH, K),
        out_indices=[0, 1, 2, 3],
        fpn=FPNAdapter(dim),
        aux_head=aux,
        aux_index=1,
    ).train()
    x, label = torch.randn(2, 3, 56, 56, generator=gen(9)), torch.randint(0, K, (2, 56, 56), generator=gen(10))
    assert [tuple(m.shape[-2:]) for m in seg.extract_features(x)] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    torch.manual_seed(1)
    out = seg.loss(x, label)
    assert seen[-1] == (2, dim, 8, 8)  # FPN level 1 reaches the aux head
    torch.testing.assert_close(out["loss"], out["decode"] + 0.4 * out["aux"])
    out["loss"].backward()
    assert seg.fpn.up1[0].weight.grad is not None and aux.conv_seg.weight.grad is not None


def test_segmentor_casts_bf16_maps_to_fp32():
    dim = TINY_6B.embed_dim
    fpn = FPNAdapter(dim).to(torch.bfloat16)
    seg = Segmentor(tiny_backbone(torch.bfloat16), LinearHead(dim, K), out_indices=[0, 1, 2, 3], fpn=fpn)
    maps = seg.extract_features(torch.randn(1, 3, 28, 28))
    assert all(m.dtype == torch.float32 for m in maps)


def test_segmentor_rejects_bad_settings():
    backbone, head = torch.nn.Identity(), LinearHead(C, K)
    with pytest.raises(InternViTError, match="4 tapped blocks"):
        Segmentor(backbone, head, out_indices=[44], fpn=FPNAdapter(C))
    with pytest.raises(InternViTError, match="go together"):
        Segmentor(backbone, head, out_indices=[44], aux_head=FCNAuxHead(C, CH, K))
    with pytest.raises(InternViTError, match="out of range"):
        Segmentor(backbone, head, out_indices=[44], aux_head=FCNAuxHead(C, CH, K), aux_index=1)


# ---------------------------------------------------------------- sliding window


@pytest.mark.parametrize(
    ("h", "w", "expected_rows", "expected_cols"),
    [
        (504, 504, [(0, 504)], [(0, 504)]),
        (672, 504, [(0, 504), (168, 672)], [(0, 504)]),  # last window shifted back to fit
        (826, 504, [(0, 504), (322, 826)], [(0, 504)]),  # 504 + 322: fits exactly, no shift
        (672, 826, [(0, 504), (168, 672)], [(0, 504), (322, 826)]),  # 2 x 2 windows, row-major
        (896, 280, [(0, 504), (322, 826), (392, 896)], [(0, 280)]),  # a side shorter than the crop: one window
        (504, 2016, [(0, 504)], [(0, 504), (322, 826), (644, 1148), (966, 1470), (1288, 1792), (1512, 2016)]),
    ],
)
def test_window_grid_by_hand(h, w, expected_rows, expected_cols):
    assert window_grid(h, w, 504, 322) == [(y1, y2, x1, x2) for y1, y2 in expected_rows for x1, x2 in expected_cols]


def _covers(spans: list[tuple[int, int]], size: int) -> bool:
    """Do the (start, end) spans cover [0, size) without a gap?"""
    reach = 0
    for start, end in sorted(spans):
        if start > reach:
            return False
        reach = max(reach, end)
    return reach == size


def test_window_grid_properties():
    def n(side: int) -> int:  # the §5.3 formula
        return max(side - 504 + 322 - 1, 0) // 322 + 1

    rng = random.Random(0)
    for _ in range(300):
        h, w = 14 * rng.randint(1, 200), 14 * rng.randint(1, 200)
        windows = window_grid(h, w, 504, 322)
        assert len(windows) == n(h) * n(w)
        for y1, y2, x1, x2 in windows:
            assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
            assert (y2 - y1, x2 - x1) == (min(504, h), min(504, w))
        assert _covers([(y1, y2) for y1, y2, _, _ in windows], h)
        assert _covers([(x1, x2) for _, _, x1, x2 in windows], w)
        assert len(set(windows)) == len(windows)
    with pytest.raises(ValueError, match="leave pixels"):
        window_grid(600, 600, 100, 200)


class PositionSegmentor:
    """Fake segmentor: reads its window's (y1, x1) off the image and returns the constant 1000*y1 + x1 + 0.5*k."""

    def __init__(self) -> None:
        self.crops: list[tuple[int, int]] = []

    def __call__(self, crop: torch.Tensor) -> torch.Tensor:
        self.crops.append(tuple(crop.shape[-2:]))
        value = 1000 * crop[:, 0, 0, 0] + crop[:, 1, 0, 0]  # (B,)
        out = value[:, None, None, None] + 0.5 * torch.arange(3.0)[None, :, None, None]
        return out.expand(-1, -1, crop.shape[-2] // 14, crop.shape[-1] // 14)


def coordinate_image(h: int, w: int) -> torch.Tensor:
    rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
    return torch.stack([rows, cols, torch.zeros(h, w)])[None]


def test_slide_inference_averages_overlapping_windows():
    fake = PositionSegmentor()
    logits = slide_inference(fake, coordinate_image(672, 672), num_classes=3)
    assert fake.crops == [(504, 504)] * 4  # windows at y, x in {0, 168}
    assert logits.shape == (1, 3, 672, 672)
    expected = {
        (0, 0): 0,
        (0, 200): 84,
        (200, 200): 84_084,
        (600, 100): 168_000,
        (600, 300): 168_084,
        (671, 671): 168_168,
    }
    for (i, j), value in expected.items():  # mean of the covering windows' 1000*y1 + x1
        torch.testing.assert_close(logits[0, :, i, j], value + 0.5 * torch.arange(3.0), rtol=1e-6, atol=1e-6)


def test_slide_inference_upsamples_each_window_and_runs_small_images_whole():
    low = torch.randn(1, 2, 4, 6, generator=gen(11))
    calls = []

    def fake(crop):
        calls.append(tuple(crop.shape[-2:]))
        return low

    out = slide_inference(fake, torch.zeros(1, 3, 280, 420), num_classes=2)  # smaller than the crop both ways
    assert calls == [(280, 420)]
    torch.testing.assert_close(out, _up(low, (280, 420)))
    with pytest.raises(ValueError, match="expected"):
        slide_inference(fake, torch.zeros(1, 3, 280, 420), num_classes=3)


def test_predict_resizes_to_original_and_argmaxes():
    logits = torch.zeros(1, 2, 4, 4)
    logits[0, 1, :, :2] = 5.0  # class 1 on the left half, class 0 on the right
    logits[0, 0, :, 2:] = 5.0

    pred = predict(lambda crop: logits, torch.zeros(3, 56, 56), (100, 60), num_classes=2)
    assert pred.shape == (100, 60) and pred.dtype == torch.int64
    assert torch.all(pred[:, :25] == 1) and torch.all(pred[:, 35:] == 0)
    with pytest.raises(ValueError, match="one image"):
        predict(lambda crop: logits, torch.zeros(2, 3, 56, 56), (100, 60), num_classes=2)


def test_slide_inference_with_real_segmentor_matches_whole_image():
    seg = Segmentor(tiny_backbone(), randomize_bn_(LinearHead(TINY_6B.embed_dim, K)), out_indices=[3]).eval()
    x = torch.randn(1, 3, 56, 84, generator=gen(12))
    with torch.no_grad():
        whole = _up(seg(x), (56, 84))
    torch.testing.assert_close(slide_inference(seg, x, num_classes=K, crop=112, stride=56), whole)
