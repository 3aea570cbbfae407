"""Numerical parity with transformers' InternVLVisionModel, with weights copied through OUR converter."""

import pytest
import torch
from conftest import TINY_6B, TINY_300M, randomize_

from internvit.model import InternViTConfig, build_model
from internvit.model import layers as layers_mod
from internvit.weights import from_native, load_state_into, to_native
from internvit.weights.convert import build_transformers_model

transformers = pytest.importorskip("transformers")


def hf_model(cfg: InternViTConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_transformers_model(cfg, attn_implementation="eager", device="cpu")
    return randomize_(model, seed=1).eval()


def ours_from(hf: torch.nn.Module, cfg: InternViTConfig) -> torch.nn.Module:
    native = to_native(hf.state_dict())
    assert native.layout == "transformers"
    model = build_model(cfg, init=False)
    report = load_state_into(model, native)
    assert report.ok and report.num_loaded == len(model.state_dict())
    return model.eval()


def max_errors(ours: torch.nn.Module, hf: torch.nn.Module, x: torch.Tensor) -> list[float]:
    """Max abs error on every block's output (the last one is last_hidden_state)."""
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
        mine = ours.get_intermediate_layers(x, list(range(len(ours.blocks))))
    theirs = list(out.hidden_states[1:])  # [0] is the embedding output
    assert len(theirs) == len(mine)
    assert torch.equal(theirs[-1], out.last_hidden_state)
    return [(a - b).abs().max().item() for a, b in zip(mine, theirs, strict=True)]


@pytest.mark.parametrize("cfg", [TINY_6B, TINY_300M], ids=["6b-type", "300m-type"])
@pytest.mark.parametrize("side", [56, 84], ids=["native", "interpolated-pos-embed"])
def test_parity_every_layer(cfg, side):
    hf = hf_model(cfg)
    ours = ours_from(hf, cfg)
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(2))
    errors = max_errors(ours, hf, x)
    assert max(errors) < 1e-5, errors
    with torch.no_grad():
        assert torch.allclose(ours.forward_features(x), hf(pixel_values=x).last_hidden_state, atol=1e-5, rtol=0)


def test_round_trip_to_transformers_layout_is_exact():
    hf = hf_model(TINY_6B)
    back = from_native(to_native(hf.state_dict()).state, "transformers")
    reference = hf.state_dict()
    assert set(back) == set(reference)
    assert all(torch.equal(back[k], reference[k]) for k in reference)


class PerHeadQKNormAttention(layers_mod.Attention):
    """A plausible mistake: QK-norm statistics per head instead of over the full width."""

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).unbind(2)

        def per_head(norm, t):
            t32 = t.float() * torch.rsqrt(t.float().pow(2).mean(-1, keepdim=True) + norm.eps)
            return t32 * norm.weight.view(self.num_heads, self.head_dim)

        q, k = per_head(self.q_norm, q), per_head(self.k_norm, k)
        out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
        return self.proj(out.transpose(1, 2).reshape(B, T, C))


def test_parity_detects_per_head_qk_norm(monkeypatch):
    hf = hf_model(TINY_6B)
    monkeypatch.setattr(layers_mod, "Attention", PerHeadQKNormAttention)
    ours = ours_from(hf, TINY_6B)
    assert isinstance(ours.blocks[0].attn, PerHeadQKNormAttention)
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    assert max_errors(ours, hf, x)[0] > 1e-3


def test_parity_detects_missing_layerscale(monkeypatch):
    hf = hf_model(TINY_6B)
    monkeypatch.setattr(layers_mod.LayerScale, "forward", lambda self, x: x)
    ours = ours_from(hf, TINY_6B)
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    assert max_errors(ours, hf, x)[0] > 1e-3
