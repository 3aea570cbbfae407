"""InternViT backbone (docs/protocol.md §1.2): patch embed, cls token, absolute pos embed, pre-norm blocks, no final
norm."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from internvit.model.config import InternViTConfig, get_config
from internvit.model.layers import Block, PatchEmbed


def resize_pos_embed(pos_embed: torch.Tensor, grid_hw: tuple[int, int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """Bicubically resize a (1, prefix + S*S, C) position embedding to a (h, w) grid (docs/protocol.md §1.7, step 2).

    The prefix (cls) rows pass through unchanged; the square grid is resized channels-first with
    align_corners=False, in fp32, and the result is cast back to the input dtype.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    num_grid, dim = grid.shape[1], grid.shape[2]
    side = int(round(num_grid**0.5))
    if side * side != num_grid:
        raise ValueError(f"pos_embed has {num_grid} grid rows, which is not a square grid")
    if (side, side) == tuple(grid_hw):
        return pos_embed
    grid = grid.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(grid_hw), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, grid_hw[0] * grid_hw[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


class InternViT(nn.Module):
    """InternViT-6B / 300M backbone. Pure: no heads, no freezing, no file I/O.

    Build on the meta device and call `init_weights()` (or load a checkpoint) to materialise quickly;
    see `internvit.model.build_model`.
    """

    def __init__(self, config: InternViTConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.embed_dim = config.embed_dim
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.empty(1, 1, config.embed_dim))
        self.pos_embed = nn.Parameter(torch.empty(1, 1 + config.grid_size**2, config.embed_dim))
        rates = torch.linspace(0, config.drop_path_rate, config.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(config, drop_path=rate) for rate in rates)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Explicit init for parts not loaded from a checkpoint: zero cls/pos (as the original), timm-style linears."""
        nn.init.zeros_(self.cls_token)
        nn.init.zeros_(self.pos_embed)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif hasattr(module, "reset_parameters") and module is not self:
                module.reset_parameters()  # RMSNorm (ones), LayerScale (init value)

    def _grid(self, x_BCHW: torch.Tensor) -> tuple[int, int]:
        if x_BCHW.ndim != 4 or x_BCHW.shape[1] != self.config.in_chans:
            raise ValueError(f"expected images of shape (B, {self.config.in_chans}, H, W), got {tuple(x_BCHW.shape)}")
        h, w = x_BCHW.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        return h // self.patch_size, w // self.patch_size

    def prepare_tokens(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Patchify, prepend cls, add position embeddings (resized on the fly when the grid differs)."""
        grid_hw = self._grid(x_BCHW)
        x = self.patch_embed(x_BCHW)
        # cat type-promotes: under autocast an fp32 cls token makes the residual stream fp32, as in the original
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + resize_pos_embed(self.pos_embed, grid_hw)

    def forward_features(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """All 1+N tokens after the last block, shape (B, 1+N, C). There is no final norm."""
        x = self.prepare_tokens(x_BCHW)
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x_BCHW)

    def resolve_indices(self, indices: int | Sequence[int]) -> list[int]:
        """Block indices (0-based, negatives from the end; an int n means the last n blocks), validated."""
        depth = len(self.blocks)
        if isinstance(indices, int):
            if not 1 <= indices <= depth:
                raise ValueError(f"asked for the last {indices} blocks of a {depth}-block model")
            return list(range(depth - indices, depth))
        resolved = []
        for i in indices:
            if not -depth <= i < depth:
                raise ValueError(f"block index {i} is out of range for a {depth}-block model")
            resolved.append(i % depth)
        return resolved

    def get_intermediate_layers(
        self,
        x_BCHW: torch.Tensor,
        indices: int | Sequence[int] = 1,
        output: Literal["tokens", "nchw"] = "tokens",
    ) -> list[torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]]:
        """Outputs of chosen blocks (taken after the block), in the order asked.

        output="tokens": a list of (B, 1+N, C) token tensors.
        output="nchw": a list of (cls_BC, feature_map_BChw) pairs, the cls token split off the patch grid.
        Blocks after the deepest index asked for are not run.
        """
        if output not in ("tokens", "nchw"):
            raise ValueError(f"output must be 'tokens' or 'nchw', got {output!r}")
        wanted = self.resolve_indices(indices)
        grid_h, grid_w = self._grid(x_BCHW)
        x = self.prepare_tokens(x_BCHW)
        taken: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks[: max(wanted) + 1]):
            x = block(x)
            if i in wanted:
                taken[i] = x
        outs = [taken[i] for i in wanted]
        if output == "tokens":
            return outs
        B, C = x.shape[0], x.shape[-1]
        return [(t[:, 0], t[:, 1:].transpose(1, 2).reshape(B, C, grid_h, grid_w)) for t in outs]


def build_model(
    config: InternViTConfig | str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    init: bool = True,
) -> InternViT:
    """Build on the meta device, then materialise on `device` in `dtype`; `init=False` leaves memory uninitialised

    (for a checkpoint that will overwrite every parameter), which makes the 6B model appear in seconds. `config` is
    an `InternViTConfig` or a preset name (e.g. "internvit-6b-224px", "debug").
    """
    if isinstance(config, str):
        config = get_config(config)
    with torch.device("meta"):
        model = InternViT(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    if init:
        model.init_weights()
    return model


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
