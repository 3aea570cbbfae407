"""The memory plan of a training run: bytes per GPU for what trains, before anything is loaded.

Exact for the stored state (computed from the parameter shapes, with FSDP2's dim-0 chunking per rank; tested
against the real shards):
- parameters: fp32 master weights (frozen ones in their storage dtype, never sharded);
- gradients: fp32, the size of the trainable parameters (sharded like them under FSDP);
- optimizer: AdamW's exp_avg and exp_avg_sq, fp32, likewise.
From the shapes, for the transient FSDP buffers:
- unsharded blocks: one block's parameters all-gathered in the compute dtype, and the next one prefetched;
- unsharded heads: the root group (heads, FPN) stays gathered in fp32 from forward to backward, with its gradients.
Estimated (a formula, not a measurement) for the backbone's activations: per image and block the tensors a pre-norm
block saves for backward, in widths of the residual stream (`_BLOCK_WIDTHS` + 2 MLP widths) x tokens x bytes,
fused attention (no tokens x tokens matrix); with activation checkpointing only each block's input is kept, plus one
block's activations while it is recomputed; a frozen backbone keeps nothing for backward. The heads' activations and
the evaluation's peak are not counted: keep a margin.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from internvit.errors import InternViTError

# norm1 in/out, qkv (3), q/k norm outputs (2), attention out, proj in, ls1 in, norm2 in/out, fc1 out (4 for the
# 4x MLP), GELU out (4), ls2 in: 23 residual widths per token for a 4x MLP (scaled with the real MLP width below)
_BLOCK_WIDTHS = 15  # everything but fc1 / GELU outputs
_GIB = 2**30


def shard_numel(shape: torch.Size, world_size: int, rank: int) -> int:
    """Elements of rank `rank`'s shard of a parameter FSDP2 splits along dim 0 into `world_size` chunks."""
    if not shape:
        return 1 if rank == 0 else 0
    rows, rest = shape[0], int(torch.Size(shape[1:]).numel())
    per = -(-rows // world_size)  # torch.chunk: equal chunks of ceil(rows / world), the last ones short or empty
    return max(0, min(per, rows - rank * per)) * rest


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU of one rank, by component."""

    components: dict[str, int]
    settings: dict[str, object]

    @property
    def total(self) -> int:
        return sum(self.components.values())

    def rows(self) -> list[dict[str, object]]:
        rows = [{"component": k, "GiB": round(v / _GIB, 3), "bytes": v} for k, v in self.components.items()]
        return rows + [{"component": "total", "GiB": round(self.total / _GIB, 3), "bytes": self.total}]


def plan_memory(
    model: nn.Module,
    *,
    blocks: nn.ModuleList,
    world_size: int,
    rank: int = 0,
    parallel: str,
    shard_size: int | None = None,
    compute_bytes: int = 2,
    batch_size: int,
    tokens: int,
    activation_checkpointing: bool,
    cpu_offload: bool = False,
    root_numel: int = 0,
) -> MemoryPlan:
    """The plan of `model` (built on the meta device: only shapes are read) for one rank.

    `parallel` is "ddp" (full replica) or "fsdp" (trainable parameters sharded over `shard_size` ranks: the world,
    or one node under hybrid sharding); `compute_bytes` is the element size of the compute dtype (2 for bf16);
    `root_numel` the parameters FSDP's root group holds (the heads around the backbone).
    """
    shards = shard_size or world_size
    trainable, frozen = 0, 0
    for p in model.parameters():
        if not p.requires_grad:
            frozen += p.numel() * p.element_size()
        elif parallel == "fsdp":
            trainable += shard_numel(p.shape, shards, rank % shards) * 4
        else:
            trainable += p.numel() * 4
    first = blocks[0] if len(blocks) else None
    block_params = sum(p.numel() for p in first.parameters()) if first is not None else 0
    width = next((p.shape[-1] for n, p in first.named_parameters() if n.endswith("norm1.weight")), 0) if first else 0
    hidden = next((p.shape[0] for n, p in first.named_parameters() if n.endswith("fc1.weight")), 0) if first else 0
    per_block = batch_size * tokens * compute_bytes * (_BLOCK_WIDTHS * width + 2 * hidden)
    trained_blocks = first is not None and any(p.requires_grad for p in first.parameters())
    if not trained_blocks:  # a frozen backbone saves nothing for backward: one block's working set at a time
        activations = per_block
    elif activation_checkpointing:
        stream = compute_bytes if parallel == "fsdp" else 4  # FSDP casts block inputs; autocast keeps them fp32
        activations = len(blocks) * batch_size * tokens * width * stream + per_block  # block inputs + one recompute
    else:
        activations = len(blocks) * per_block
    in_flight = 2 * block_params * compute_bytes if parallel == "fsdp" and trained_blocks else 0
    on_gpu = 0 if cpu_offload else trainable
    components = {
        "parameters": on_gpu + frozen,
        "gradients": on_gpu,
        "optimizer": 2 * on_gpu,
        "unsharded blocks": in_flight,
        "unsharded heads": 8 * root_numel if parallel == "fsdp" else 0,
        "activations (estimate)": activations,
    }
    settings = {
        "parallel": parallel,
        "world_size": world_size,
        "shard_size": shards if parallel == "fsdp" else 1,
        "batch_size": batch_size,
        "tokens": tokens,
        "activation_checkpointing": activation_checkpointing,
        "cpu_offload": cpu_offload,
    }
    return MemoryPlan(components, settings)


def check_fits(plan: MemoryPlan, device: torch.device) -> None:
    """On a GPU, stop before anything loads when the plan exceeds the free memory, naming what would fit."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    if plan.total <= free:
        return
    s = plan.settings
    hints = []
    if s["parallel"] == "fsdp":
        hints.append("more processes (the sharded parts shrink with them)")
        if not s["cpu_offload"]:
            hints.append("train.cpu_offload=true")
    else:
        hints.append("train.parallel=fsdp")
    if not s["activation_checkpointing"]:
        hints.append("backbone.grad_checkpointing=true")
    if s["batch_size"] > 1:
        hints.append("a smaller train.batch_size (the global batch is kept by accumulation)")
    raise InternViTError(
        f"the memory plan needs {plan.total / _GIB:.1f} GiB per GPU, {free / _GIB:.1f} GiB are free on {device}",
        fix="; or ".join(hints),
    )
