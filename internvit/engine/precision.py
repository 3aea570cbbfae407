"""One precision vocabulary for both tasks: the `backbone.precision` field, its dtypes and the autocast it implies.

What a precision means for each regime (both follow their original):
- a frozen classification backbone runs under autocast in that dtype, its matmul weights stored in it (the values
  autocast would cast to), norms and LayerScale in fp32, so the residual stream stays fp32; the head runs under the
  same autocast, and fp16 adds a GradScaler, as the original's apex AMP;
- a frozen segmentation backbone is stored whole in that dtype (the original's pure-bf16 segmentation backbone);
- a fine-tuned backbone keeps fp32 master weights and computes in that dtype: under autocast with DDP (fp32
  residual stream), with its parameters all-gathered in it under FSDP2 (the residual stream in it too, as DeepSpeed's
  bf16 mode).
"fp32" switches reduced precision off everywhere.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = tuple(DTYPES)


def resolve_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a precision name; a ValueError names the valid ones."""
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return DTYPES[precision]


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision, or None for fp32 (no autocast)."""
    dtype = resolve_dtype(precision)
    return None if dtype == torch.float32 else dtype


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """`torch.autocast` on the device's type in the precision's dtype; a no-op for fp32."""
    dtype = autocast_dtype(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def needs_grad_scaler(precision: str) -> bool:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none."""
    return resolve_dtype(precision) == torch.float16
