"""FP8 (e4m3) inference linears: per-output-channel weight scales, per-token activation scales, `torch._scaled_mm`.

Rowwise scaling keeps one outlier token or channel from flattening everyone else's resolution. The weights are
quantised once; activations are quantised on the fly (under torch.compile the amax, divide and cast fuse into one
pass). The matmul writes bf16; on Hopper it uses the fast-accumulation mode by default, as torchao's fp8 inference
does (the benchmark's fidelity columns show what that costs). Runs on Hopper/Ada GPUs (compute capability >= 8.9) and
on the CPU (slowly, for tests), where older torch releases lack rowwise `_scaled_mm` and the same product is computed
from the dequantised operands.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
_MIN_AMAX = 1e-12  # an all-zero row gets a tiny scale instead of a division by zero


def quantize_rowwise(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> e4m3 values and an (M, 1) fp32 scale with x ~= values * scale; each row's amax maps to 448."""
    x32 = x_MK.float()
    scale_M1 = x32.abs().amax(dim=-1, keepdim=True).clamp_min(_MIN_AMAX) / FP8_MAX
    return (x32 / scale_M1).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale_M1


@functools.cache
def _cpu_rowwise_scaled_mm() -> bool:
    """Whether this torch's CPU `_scaled_mm` takes rowwise scales (2.13 does; 2.11 takes one scale per tensor only)."""
    a = torch.ones(16, 16).to(FP8_DTYPE)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


def float8_supported(device: torch.device | str) -> bool:
    """FP8 matmuls need a GPU of compute capability 8.9+ (Ada, Hopper, Blackwell); the CPU path is for tests."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type == "cpu"


class Float8Linear(nn.Module):
    """A frozen nn.Linear computed as fp8 x fp8 -> bf16 with rowwise scales (inference only)."""

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool, out_dtype: torch.dtype, fast_accum: bool = True
    ) -> None:
        super().__init__()
        self.fast_accum = fast_accum
        if in_features % 16 or out_features % 16:
            raise ValueError(f"fp8 matmuls need sizes divisible by 16, got {in_features} -> {out_features}")
        self.in_features, self.out_features, self.out_dtype = in_features, out_features, out_dtype
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8_DTYPE))
        self.register_buffer("weight_scale", torch.empty(1, out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.empty(out_features, dtype=out_dtype) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, out_dtype: torch.dtype = torch.bfloat16) -> Float8Linear:
        """Quantise `linear`'s weight once, one scale per output channel (row of the (N, K) weight)."""
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, out_dtype=out_dtype)
        module.to(linear.weight.device)
        weight, scale_N1 = quantize_rowwise(linear.weight)
        module.weight.copy_(weight)
        module.weight_scale.copy_(scale_N1.reshape(1, -1))
        if linear.bias is not None:
            module.bias.copy_(linear.bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x_fp8, scale_M1 = quantize_rowwise(x.reshape(-1, self.in_features))
        if x.device.type == "cpu" and not _cpu_rowwise_scaled_mm():
            weight = self.weight.float() * self.weight_scale.t()
            bias = self.bias.float() if self.bias is not None else None
            out = F.linear(x_fp8.float() * scale_M1, weight, bias).to(self.out_dtype)
        else:
            out = torch._scaled_mm(  # the (N, K) row-major weight, transposed, is the column-major operand cuBLAS wants
                x_fp8,
                self.weight.t(),
                scale_a=scale_M1,
                scale_b=self.weight_scale,
                bias=self.bias,
                out_dtype=self.out_dtype,
                use_fast_accum=self.fast_accum,
            )
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, out_dtype={self.out_dtype}, "
            f"fast_accum={self.fast_accum}"
        )


def convert_blocks_to_float8(blocks: nn.ModuleList, out_dtype: torch.dtype = torch.bfloat16) -> int:
    """Swap every nn.Linear inside the transformer blocks for a Float8Linear, in place; returns how many.

    The patch embedding (a conv, 0.2% of the FLOPs) stays in its dtype: fp8 pays only on the big matmuls.
    """
    swapped = 0
    for block in blocks:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, Float8Linear.from_linear(child, out_dtype))
                    swapped += 1
    return swapped
