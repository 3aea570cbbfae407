"""Shared fixtures: tiny configs, deterministic seeds, and no network at test time."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never download at test time
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from internvit.model import PRESETS, InternViTConfig, build_model, get_config  # noqa: E402

TINY_6B = get_config("debug")  # rms_norm, full-width QK-norm, no qkv bias
TINY_300M = InternViTConfig(
    embed_dim=48,
    depth=3,
    num_heads=3,
    mlp_hidden_dim=96,
    img_size=56,
    norm_type="layer_norm",
    qkv_bias=True,
    qk_norm=False,
    layer_scale_init=1.0,
)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (norm weights and LayerScale included) non-trivial values, so no part hides."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(("norm1.weight", "norm2.weight", "q_norm.weight", "k_norm.weight")):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith(("gamma", "lambda_1", "lambda_2")):
                p.copy_(0.5 + 0.3 * noise)
            else:
                p.copy_(0.2 * noise)
    return model


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return randomize_(build_model(TINY_6B)).eval()


@pytest.fixture
def tiny_300m_preset(monkeypatch):
    """Register TINY_300M as a preset so that LayerNorm / qkv-bias checkpoints can be matched and loaded."""
    monkeypatch.setitem(PRESETS, "tiny-300m", TINY_300M)
    return "tiny-300m"
