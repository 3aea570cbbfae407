"""The CUDA paths, where the users run them: skipped without a GPU, run by `pytest -m cuda` (benchmarks/gpu_check.py).

The same properties the CPU tests check, on the GPU's kernels: bf16 storage is exactly autocast, the compiled fast
path matches eager fp32, FP8 stays close to bf16, SyncBatchNorm keeps BatchNorm's numerics and keys, and the loaders'
CUDA branches (pinned memory, normalising uint8 batches on the device) give the CPU's values bit for bit.
"""

import copy

import numpy as np
import pytest
import torch
from conftest import TINY_6B, fast_path_model
from PIL import Image
from torch import nn

from internvit.classification.heads import build_head
from internvit.data import build_eval_transform
from internvit.data import normalize_images as normalize_cls
from internvit.data.imagenet import ImageClassificationDataset
from internvit.data.seg_transforms import normalize_images as normalize_seg
from internvit.engine.data import build_eval_loader
from internvit.engine.distributed import DistInfo, cleanup_distributed, init_distributed
from internvit.engine.float8 import float8_supported
from internvit.engine.parallelize import optimize_for_inference

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def probe_input(tokens: torch.Tensor) -> torch.Tensor:
    """cls || mean of the patch tokens: what the paper's head reads."""
    return torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=1).float()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return fast_path_model().to(CUDA)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 56, 56, generator=torch.Generator().manual_seed(5)).to(CUDA)


@torch.no_grad()
def test_bf16_storage_is_exactly_autocast_on_cuda(model, images):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = model(images)
        got = optimize_for_inference(copy.deepcopy(model), compile=False)(images)
    assert torch.equal(got, expected) and got.dtype == torch.float32


@torch.no_grad()
def test_compiled_fast_path_matches_eager_fp32_on_cuda(model, images):
    torch._dynamo.reset()
    reference = model(images)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = optimize_for_inference(copy.deepcopy(model), compile=True)(images)
        eager = optimize_for_inference(copy.deepcopy(model), compile=False)(images)
    assert torch.isfinite(got).all()
    assert rel_err(got, reference) < 1e-2 and rel_err(got, eager) < 5e-3
    assert rel_err(eager, reference) > 1e-4  # bf16 is visibly not fp32: the check can fail


@torch.no_grad()
def test_fp8_stays_close_to_bf16(model, images):
    if not float8_supported(CUDA):
        pytest.skip("FP8 matmuls need compute capability 8.9+")
    torch._dynamo.reset()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = optimize_for_inference(copy.deepcopy(model), compile=True)(images)
        fp8 = optimize_for_inference(copy.deepcopy(model), compile=True, fp8=True)(images)
    cos = nn.functional.cosine_similarity(probe_input(fp8), probe_input(bf16), dim=1)
    assert 0.99 < cos.min().item() < 1.0, cos  # close, and not secretly the bf16 path
    assert not torch.equal(fp8, bf16)


def test_sync_batchnorm_keeps_batchnorm_numerics_and_keys():
    """The paper head's BatchNorm as SyncBatchNorm on the GPU (a one-process NCCL group): the same outputs, gradients,
    running statistics and state-dict keys."""
    dist = init_distributed("cuda", process_group=True)
    try:
        plain = build_head("cls_patch_concat", embed_dim=TINY_6B.embed_dim, num_heads=TINY_6B.num_heads, num_classes=7)
        plain = plain.to(CUDA).train()
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain)).train()
        assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
        assert synced.state_dict().keys() == plain.state_dict().keys()
        tokens = torch.randn(6, 17, TINY_6B.embed_dim, device=CUDA, generator=torch.Generator(CUDA).manual_seed(1))
        out_plain, out_synced = plain(tokens), synced(tokens)
        torch.testing.assert_close(out_synced, out_plain)
        out_plain.square().sum().backward()
        out_synced.square().sum().backward()
        for (name, a), b in zip(plain.named_parameters(), synced.parameters(), strict=True):
            torch.testing.assert_close(b.grad, a.grad, msg=name)
        for key, value in plain.state_dict().items():
            torch.testing.assert_close(synced.state_dict()[key], value, msg=key)
        assert dist.device.type == "cuda"
    finally:
        cleanup_distributed()


def test_normalising_on_the_device_is_bit_identical():
    gen = torch.Generator().manual_seed(2)
    batch = torch.randint(0, 256, (3, 3, 40, 56), dtype=torch.uint8, generator=gen)
    assert torch.equal(normalize_cls(batch.to(CUDA)).cpu(), normalize_cls(batch))
    sizes = torch.tensor([[40, 56], [31, 50], [12, 9]])
    assert torch.equal(normalize_seg(batch.to(CUDA), sizes.to(CUDA)).cpu(), normalize_seg(batch, sizes))


def test_pinned_eval_loader_gives_the_cpu_batches(tmp_path):
    rng = np.random.default_rng(0)
    samples = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(path)
        samples.append((path, i % 2))
    dataset = ImageClassificationDataset(samples, ["a", "b"], name="t", transform=build_eval_transform(56))
    gpu = build_eval_loader(dataset, batch_size=2, dist=DistInfo(device=CUDA))
    cpu = build_eval_loader(dataset, batch_size=2, dist=DistInfo())
    assert gpu.pin_memory and not cpu.pin_memory
    for (images_g, targets_g, idx_g), (images_c, targets_c, idx_c) in zip(gpu, cpu, strict=True):
        assert images_g.is_pinned()
        assert torch.equal(images_g.to(CUDA, non_blocking=True).cpu(), images_c)
        assert torch.equal(targets_g, targets_c) and torch.equal(idx_g, idx_c)
