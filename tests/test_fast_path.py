"""The fast inference path (engine/parallelize.py): same features as the eager model, compiled once for all blocks."""

import copy

import pytest
import torch
from conftest import fast_path_model
from torch import nn

from internvit.engine import parallelize
from internvit.engine.parallelize import cast_matmul_weights, optimize_for_inference, resolve_compile
from internvit.errors import InternViTError


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return fast_path_model()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(5))


def autocast_bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@torch.no_grad()
def test_bf16_weight_storage_is_exactly_autocast(model, images):
    """Storing the matmul weights in bf16 gives the very features of the fp32 model under autocast."""
    with autocast_bf16():
        expected = model(images)
        fast = optimize_for_inference(copy.deepcopy(model), compile=False)
        got = fast(images)
    assert torch.equal(got, expected)
    assert got.dtype == torch.float32  # LayerScale keeps the residual stream fp32 (§1.3)
    assert fast.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert fast.patch_embed.proj.weight.dtype == torch.bfloat16
    for name in ("blocks.0.norm1.weight", "blocks.0.attn.q_norm.weight", "blocks.0.ls1.gamma", "pos_embed"):
        assert fast.get_parameter(name).dtype == torch.float32, name


@torch.no_grad()
def test_compiled_fast_path_matches_eager_fp32(model, images):
    """The default fast path (bf16 storage, compiled blocks) against the eager fp32 model: within bf16 tolerance."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    reference = model(images)
    fast = optimize_for_inference(copy.deepcopy(model), compile=True)
    with autocast_bf16():
        got = fast(images)
        eager_bf16 = optimize_for_inference(copy.deepcopy(model), compile=False)(images)
    assert torch.isfinite(got).all()
    assert rel_err(got, reference) < 1e-2
    assert rel_err(got, eager_bf16) < 5e-3  # compiling changes only rounding, not the function
    assert rel_err(eager_bf16, reference) > 1e-4  # the check can fail: bf16 is visibly not fp32
    # regional compilation: the four blocks share one compiled graph
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert all(block._compiled_call_impl is not None for block in fast.blocks)


@torch.no_grad()
def test_compiled_intermediate_layers_match(model, images):
    fast = optimize_for_inference(copy.deepcopy(model), compile=True)
    with autocast_bf16():
        got = fast.get_intermediate_layers(images, [1, 3], output="nchw")
    want = model.get_intermediate_layers(images, [1, 3], output="nchw")
    for (cls_a, map_a), (cls_b, map_b) in zip(got, want, strict=True):
        assert map_a.shape == map_b.shape == (3, 64, 4, 4)
        assert rel_err(map_a, map_b) < 1e-2 and rel_err(cls_a, cls_b) < 1e-2


def test_no_autocast_dtype_leaves_storage_alone(model):
    fast = optimize_for_inference(copy.deepcopy(model), amp_dtype=None, compile=False)
    assert all(p.dtype == torch.float32 for p in fast.parameters())
    assert not any(p.requires_grad for p in fast.parameters()) and not fast.training


def test_cast_matmul_weights_only_touches_linears_and_convs():
    layer = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Conv2d(3, 4, 2))
    cast_matmul_weights(layer, torch.float16)
    assert [p.dtype for p in layer.parameters()] == [torch.float16] * 2 + [torch.float32] * 2 + [torch.float16] * 2


def test_resolve_compile():
    assert resolve_compile(None, "cuda") is True and resolve_compile(None, "cpu") is False
    assert resolve_compile(True, "cpu") is True and resolve_compile(False, "cuda") is False


def test_unknown_compile_mode_is_refused(model):
    with pytest.raises(InternViTError, match="unknown compile mode"):
        parallelize.compile_blocks(copy.deepcopy(model), mode="fastest")


def test_fp8_on_a_gpu_without_fp8_is_refused(model, monkeypatch):
    monkeypatch.setattr(parallelize, "float8_supported", lambda device: False)
    with pytest.raises(InternViTError, match="compute capability 8.9") as e:
        optimize_for_inference(copy.deepcopy(model), compile=False, fp8=True)
    assert "drop the fp8 option" in e.value.fix


def test_classification_backbone_takes_the_fast_path():
    from internvit.classification.build import build_backbone

    kwargs = dict(preset="debug", img_size=56, device=torch.device("cpu"))
    fast, _ = build_backbone("random", precision="bf16", compile=True, **kwargs)
    assert fast.blocks[0].mlp.fc1.weight.dtype == torch.bfloat16 and fast.blocks[0].ls1.gamma.dtype == torch.float32
    assert all(block._compiled_call_impl is not None for block in fast.blocks)
    plain, _ = build_backbone("random", precision="fp32", **kwargs)  # compile=None: auto, off on the CPU
    assert all(p.dtype == torch.float32 for p in plain.parameters())
    assert all(block._compiled_call_impl is None for block in plain.blocks)


def test_fast_path_settings_in_the_configs():
    from internvit.classification.config import ClassificationConfig
    from internvit.engine.config import load_config
    from internvit.segmentation.config import SegmentationConfig

    cfg = load_config(ClassificationConfig, overrides=["backbone.compile=false", "backbone.fp8=true"])
    assert cfg.backbone.compile is False and cfg.backbone.fp8 is True
    assert load_config(SegmentationConfig).backbone.compile is None  # auto by default


def test_segmentation_fp8_needs_a_frozen_backbone():
    from internvit.segmentation.build import optimize_frozen_backbone
    from internvit.segmentation.config import SegBackboneConfig

    cfg = SegBackboneConfig(checkpoint="random", preset="debug", frozen=False, fp8=True)
    with pytest.raises(InternViTError, match="frozen backbone only"):
        optimize_frozen_backbone(None, cfg, torch.device("cpu"))


def test_cuda_graphs_need_a_cuda_input():
    with pytest.raises(InternViTError, match="CUDA graphs need a CUDA input"):
        parallelize.CudaGraphForward(lambda x: x, torch.zeros(1, 3, 56, 56))


def test_float8_support_follows_the_compute_capability(monkeypatch):
    from internvit.engine.float8 import float8_supported

    for capability, expected in (((8, 0), False), ((8, 9), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert float8_supported("cuda") is expected
    assert float8_supported("cpu") is True and float8_supported("mps") is False
