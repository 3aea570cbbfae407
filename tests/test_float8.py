"""FP8 inference linears (engine/float8.py): the scaling arithmetic, the swap, and the fidelity it costs."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_6B, TINY_300M, randomize_
from torch import nn

from internvit.engine.float8 import FP8_MAX, Float8Linear, convert_blocks_to_float8, quantize_rowwise
from internvit.engine.parallelize import optimize_for_inference
from internvit.model import build_model


def test_quantize_rowwise_scales_each_row_to_the_fp8_range():
    x = torch.randn(6, 64) * torch.logspace(-3, 3, 6).unsqueeze(1)  # rows six orders of magnitude apart
    q, scale = quantize_rowwise(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (6, 1)
    assert torch.allclose(q.float().abs().amax(1), torch.full((6,), FP8_MAX))  # each row's amax lands on 448
    back = q.float() * scale
    # e4m3 keeps 3 mantissa bits: at most 1/16 relative rounding for normal values, so every row keeps its detail
    assert ((back - x).abs() <= x.abs() / 16 + scale * 2**-9).all()


def test_quantize_rowwise_keeps_zero_rows_finite():
    q, scale = quantize_rowwise(torch.zeros(2, 32))
    assert torch.isfinite(scale).all() and (q.float() == 0).all()


def test_float8_linear_is_the_matmul_of_the_quantised_operands():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    fp8 = Float8Linear.from_linear(linear, out_dtype=torch.bfloat16)
    x = torch.randn(2, 5, 64)
    q_x, s_x = quantize_rowwise(x.reshape(-1, 64))
    expected = F.linear(q_x.float() * s_x, fp8.weight.float() * fp8.weight_scale.t(), linear.bias).reshape(2, 5, 48)
    got = fp8(x)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 5, 48)
    assert torch.allclose(got.float(), expected, rtol=1e-2, atol=1e-2)  # only the bf16 output rounding remains
    err = (got.float() - linear(x)).norm() / linear(x).norm()
    assert 1e-3 < err.item() < 0.08  # fp8 is visibly lossy, but close


def test_float8_linear_needs_sizes_divisible_by_16():
    with pytest.raises(ValueError, match="divisible by 16"):
        Float8Linear.from_linear(nn.Linear(40, 48))


@pytest.mark.parametrize("cfg", [TINY_6B, TINY_300M], ids=["6b-type", "300m-type"])
def test_convert_swaps_every_block_linear_and_nothing_else(cfg):
    model = build_model(cfg)
    assert convert_blocks_to_float8(model.blocks) == 4 * cfg.depth
    assert isinstance(model.patch_embed.proj, nn.Conv2d)
    assert not any(type(m) is nn.Linear for m in model.blocks.modules())
    qkv = model.blocks[0].attn.qkv
    assert (qkv.bias is not None) == cfg.qkv_bias


@torch.no_grad()
def test_fp8_model_features_stay_close_to_bf16():
    torch.manual_seed(0)
    model = randomize_(build_model(TINY_6B), seed=4).eval()
    for name, p in model.named_parameters():
        if name.endswith(("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight")):
            p.mul_(0.25)
    x = torch.randn(4, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = optimize_for_inference(copy.deepcopy(model), compile=False)(x)
        fp8 = optimize_for_inference(copy.deepcopy(model), compile=False, fp8=True)(x)
    cos = F.cosine_similarity(fp8.flatten(1), bf16.flatten(1), dim=-1)
    assert (cos > 0.99).all()
    assert (fp8 - bf16).abs().max() > 0  # the fp8 path really ran


def test_cpu_fallback_for_torch_without_rowwise_cpu_scaled_mm(monkeypatch):
    """torch 2.11's CPU _scaled_mm takes per-tensor scales only: the dequantised product stands in for it."""
    from internvit.engine import float8

    torch.manual_seed(0)
    fp8 = Float8Linear.from_linear(nn.Linear(64, 32))
    x = torch.randn(7, 64)
    native = fp8(x)
    monkeypatch.setattr(float8, "_cpu_rowwise_scaled_mm", lambda: False)
    emulated = fp8(x)
    assert emulated.dtype == native.dtype == torch.bfloat16
    assert torch.allclose(emulated.float(), native.float(), rtol=1e-2, atol=1e-2)
