"""The backbone: preset sizes, shapes, intermediate layers, pos-embed resizing, precision semantics, options."""

import numpy as np
import pytest
import torch
from conftest import TINY_6B, TINY_300M, randomize_
from torch.utils.flop_counter import FlopCounterMode

from internvit.engine.parallelize import apply_activation_checkpointing
from internvit.model import PRESETS, InternViT, build_model, count_flops, count_params, get_config, resize_pos_embed
from internvit.model.layers import RMSNorm


def meta_params(name: str) -> int:
    with torch.device("meta"):
        return count_params(InternViT(get_config(name)))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("internvit-6b-224px", 5_902_793_600),
        *[(f"internvit-6b-448px-v{v}", 5_536_496_000) for v in ("1.0", "1.2", "1.5", "2.5")],
        ("internvit-300m-448px", 304_012_288),
    ],
)
def test_preset_parameter_counts_on_meta(name, expected):
    assert meta_params(name) == expected


def test_presets_have_the_published_architecture():
    six_b = PRESETS["internvit-6b-224px"]
    assert (six_b.embed_dim, six_b.num_heads, six_b.head_dim, six_b.mlp_hidden_dim) == (3200, 25, 128, 12800)
    assert (six_b.norm_type, six_b.qkv_bias, six_b.qk_norm, six_b.layer_scale_init) == ("rms_norm", False, True, 0.1)
    small = PRESETS["internvit-300m-448px"]
    assert (small.norm_type, small.qkv_bias, small.qk_norm, small.layer_scale_init) == ("layer_norm", True, False, 1.0)
    block = InternViT(TINY_300M).blocks[0]
    assert isinstance(block.norm1, torch.nn.LayerNorm) and block.attn.qkv.bias is not None
    assert isinstance(block.attn.q_norm, torch.nn.Identity)
    block = InternViT(TINY_6B).blocks[0]
    assert isinstance(block.attn.q_norm, RMSNorm) and block.attn.q_norm.weight.shape == (TINY_6B.embed_dim,)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="internvit-6b-224px"):
        get_config("internvit-7b")


def test_meta_build_allocates_nothing_and_init_is_explicit():
    with torch.device("meta"):
        model = InternViT(get_config("internvit-6b-224px"))
    assert all(p.is_meta for p in model.parameters())
    model = build_model(TINY_6B)
    assert torch.all(model.cls_token == 0) and torch.all(model.pos_embed == 0)
    assert torch.all(model.blocks[0].ls1.gamma == 0.1) and torch.all(model.blocks[0].norm1.weight == 1)
    assert model.blocks[0].attn.qkv.weight.std() > 0


@pytest.mark.parametrize("preset", ["internvit-6b-224px", "debug"])
def test_flop_formula_matches_torch_flop_counter(preset):
    cfg = TINY_6B if preset == "debug" else get_config(preset).replace(depth=1)
    with torch.device("meta"):
        model = InternViT(cfg)
    for side in (cfg.img_size, cfg.img_size + 2 * cfg.patch_size):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.empty(1, 3, side, side, device="meta"))
        assert counter.get_total_flops() == count_flops(cfg, side)


def test_forward_and_intermediate_shapes(tiny_model):
    x = torch.randn(2, 3, 56, 84)  # non-square: 4 x 6 grid
    with torch.no_grad():
        tokens = tiny_model.forward_features(x)
        assert tokens.shape == (2, 1 + 24, 64)
        layers = tiny_model.get_intermediate_layers(x, [0, -1])
        assert [t.shape for t in layers] == [(2, 25, 64)] * 2
        assert torch.equal(layers[-1], tokens)
        (cls0, map0), (cls3, map3) = tiny_model.get_intermediate_layers(x, 4, output="nchw")[::3]
    assert map3.shape == (2, 64, 4, 6) and cls3.shape == (2, 64)
    assert torch.equal(cls3, tokens[:, 0])
    assert torch.equal(map3[:, :, 1, 2], tokens[:, 1 + 1 * 6 + 2])  # row-major (h, w) token order
    assert torch.equal(cls0, layers[0][:, 0])


def test_intermediate_layers_stop_early(tiny_model, monkeypatch):
    calls = []
    for i, block in enumerate(tiny_model.blocks):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
    tiny_model.get_intermediate_layers(torch.randn(1, 3, 56, 56), [1])
    assert calls == [0, 1]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m(torch.randn(1, 3, 50, 56)), "multiple of the patch size"),
        (lambda m: m(torch.randn(1, 1, 56, 56)), "expected images of shape"),
        (lambda m: m.get_intermediate_layers(torch.randn(1, 3, 56, 56), [4]), "out of range"),
        (lambda m: m.get_intermediate_layers(torch.randn(1, 3, 56, 56), 5), "last 5 blocks"),
        (lambda m: m.get_intermediate_layers(torch.randn(1, 3, 56, 56), 1, output="nhwc"), "output must be"),
    ],
)
def test_bad_inputs_raise_clear_errors(tiny_model, call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_model)


def bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """Independent 1-D cubic-convolution resampling matrix (Keys, a=-0.75; half-pixel centres; clamped borders)."""

    def kernel(d: float) -> float:
        d = abs(d)
        if d <= 1:
            return (a + 2) * d**3 - (a + 3) * d**2 + 1
        return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a if d < 2 else 0.0

    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = (i + 0.5) * n_in / n_out - 0.5
        x0 = int(np.floor(x))
        for k in range(-1, 3):
            w[i, min(max(x0 + k, 0), n_in - 1)] += kernel(x - (x0 + k))
    return w


def test_pos_embed_resize_identity_at_equal_size():
    pos = torch.randn(1, 1 + 16 * 16, 8)
    assert torch.equal(resize_pos_embed(pos, (16, 16)), pos)


def test_pos_embed_resize_16_to_36_matches_bicubic_reference():
    rng = np.random.default_rng(0)
    pos = rng.standard_normal((1, 1 + 16 * 16, 5))
    out = resize_pos_embed(torch.from_numpy(pos).float(), (36, 36)).double().numpy()
    grid = pos[0, 1:].reshape(16, 16, 5)  # row-major (h, w) grid
    w = bicubic_matrix(16, 36)
    expected = np.einsum("ih,hwc,jw->ijc", w, grid, w).reshape(36 * 36, 5)
    assert np.array_equal(out[0, 0], pos[0, 0].astype(np.float32))  # cls row untouched
    np.testing.assert_allclose(out[0, 1:], expected, atol=1e-5)


def test_on_the_fly_resize_equals_model_built_at_that_size(tiny_model):
    big = build_model(TINY_6B.replace(img_size=84), init=False)
    state = tiny_model.state_dict()
    state["pos_embed"] = resize_pos_embed(state["pos_embed"], (6, 6))
    big.load_state_dict(state)
    x = torch.randn(2, 3, 84, 84)
    with torch.no_grad():
        assert torch.allclose(tiny_model(x), big.eval()(x), atol=1e-6, rtol=0)


def test_rmsnorm_fp32_statistics_and_compute_dtype_output():
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
    x = torch.randn(4, 16) * 100
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert torch.allclose(norm(x), ref, atol=1e-5)
    assert norm(x.bfloat16()).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)  # fp32 input under autocast -> compute-dtype output (apex semantics)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref, rtol=1e-2)


def test_autocast_keeps_fp32_residual_stream(tiny_model):
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_model(x)
    assert out.dtype == torch.float32  # fp32 cls token + fp32 LayerScale keep the stream fp32 (docs/protocol.md §1.4)
    with torch.no_grad():
        ref = tiny_model(x)
        bf16 = build_model(TINY_6B, dtype=torch.bfloat16, init=False)
        bf16.load_state_dict(tiny_model.state_dict())
        pure_bf16 = bf16.eval()(x)
    assert pure_bf16.dtype == torch.bfloat16
    for approx in (out, pure_bf16.float()):
        assert ((approx - ref).norm() / ref.norm()) < 2e-2


def test_drop_path_rates_and_behaviour():
    model = build_model(TINY_6B.replace(drop_path_rate=0.3))
    assert [b.drop_path.drop_prob for b in model.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    drop = model.blocks[-1].drop_path
    x = torch.ones(1000, 3, 2)
    drop.train()
    y = drop(x)
    kept = y[:, 0, 0] != 0
    assert 0.6 < kept.float().mean() < 0.8
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.7))
    assert torch.equal(drop.eval()(x), x)


def test_grad_checkpointing_changes_nothing_numerically():
    torch.manual_seed(0)
    model = randomize_(build_model(TINY_6B)).train()
    x = torch.randn(2, 3, 56, 56)
    model(x).square().mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    apply_activation_checkpointing(model)  # from outside the model, as the engine does
    model(x).square().mean().backward()
    assert list(model.state_dict()) == list(plain)  # the wrapper keeps the state-dict keys
    for name, p in zip(plain, model.parameters(), strict=True):
        assert torch.allclose(p.grad, plain[name], atol=1e-6), name


def test_rmsnorm_matches_apex_emulation_under_fp16_autocast():
    norm = RMSNorm(32)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 32))
    x = torch.randn(8, 32) * 30
    x16 = x.half().float()  # apex: input and weight cast to the autocast dtype, fp32 math, one final rounding
    expected = (x16 * torch.rsqrt(x16.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.half().float()).half()
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.equal(norm(x), expected)


def test_rmsnorm_bf16_input_uses_fp32_statistics():
    x = torch.cat([torch.full((1, 255), 1.0), torch.full((1, 1), 300.0)], dim=1).bfloat16()
    out = RMSNorm(256).requires_grad_(False)
    torch.nn.init.ones_(out.weight)
    ref = x.float() / torch.sqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.equal(out(x), ref.bfloat16())


def test_layerscale_outputs_stay_fp32_under_autocast(tiny_model):
    dtypes = []
    for block in tiny_model.blocks:
        for ls in (block.ls1, block.ls2):
            ls.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        tiny_model(torch.randn(1, 3, 56, 56))
    assert dtypes == [torch.float32] * 2 * len(tiny_model.blocks)
