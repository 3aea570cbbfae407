"""Applied from outside the model: the one place where models are prepared to run fast and in parallel.

`parallelize` prepares what trains, in a fixed order: activation checkpointing (each backbone block wrapped), then
compilation (each block), then data parallelism: DDP (SyncBatchNorm on GPUs), or FSDP2 (`fully_shard` per block, then
the backbone, then the root), whose sharded fp32 master weights, gradients and optimizer states make a 6B backbone
trainable where a DDP replica does not fit.

`optimize_for_inference` is the fast default for a frozen backbone (evaluation, feature extraction, probing). It
never changes what is computed beyond bf16 rounding:
- matmul weights are *stored* in the autocast dtype. Autocast would cast them to exactly these values on every
  forward anyway, so the features are the same as an fp32 model under autocast, with half the memory and no
  per-forward cast; norms, LayerScale, cls and pos_embed stay fp32, so the residual stream stays fp32 (§1.3).
- each block is compiled on its own ("regional compilation"): all blocks share one compiled graph, so the cost is
  paid once per input shape, not once per block, and far below compiling the whole 48-block model. Inductor fuses
  the RMSNorms, QK-norms, LayerScales and residual adds into a few kernels around the cuBLAS matmuls.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.nn.parallel import DistributedDataParallel

from internvit.engine.distributed import DistInfo
from internvit.engine.float8 import convert_blocks_to_float8, float8_supported
from internvit.errors import InternViTError

log = logging.getLogger(__name__)
# no mode that turns on inductor's own CUDA graphs: per-block graphs would reuse (overwrite) earlier blocks' outputs,
# and they would nest inside CudaGraphForward's capture
COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs")


def resolve_compile(setting: bool | None, device: torch.device | str) -> bool:
    """`None` (auto) compiles on CUDA, where it pays; on the CPU compiling costs more than it saves for short runs."""
    return torch.device(device).type == "cuda" if setting is None else bool(setting)


@torch.no_grad()
def cast_matmul_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store Linear and Conv weights (and biases) in `dtype`, leaving every other parameter as it is."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.to(dtype)
    return model


def compile_blocks(model: nn.Module, *, mode: str | None = None) -> nn.Module:
    """Compile each transformer block in place (regional compilation), and log what the first call of a shape costs."""
    if mode not in COMPILE_MODES:
        raise InternViTError(f"unknown compile mode {mode!r}", fix=f"use one of {COMPILE_MODES}")
    # every block is its own module but the same code: one compiled graph serves all of them for a given shape;
    # the limit bounds recompiles (a new batch size or resolution) before dynamo gives up and runs eager
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for block in model.blocks:
        block.compile(mode=mode, fullgraph=True)
    log.info(
        "compiling the %d blocks (one graph for all): the first batch of each new input shape pays for it",
        len(model.blocks),
    )
    return model


def optimize_for_inference(
    model: nn.Module,
    *,
    amp_dtype: torch.dtype | None = torch.bfloat16,
    compile: bool = True,
    fp8: bool = False,
    compile_mode: str | None = None,
) -> nn.Module:
    """The fast default for a frozen backbone, in place: eval mode, no grads, low-precision storage, fp8, compile.

    `amp_dtype` is the autocast dtype the model will run under (None: full precision, storage untouched).
    """
    model.eval().requires_grad_(False)
    device = next(model.parameters()).device
    if amp_dtype is not None:
        cast_matmul_weights(model, amp_dtype)
    if fp8:
        if not float8_supported(device):
            raise InternViTError(
                f"fp8 needs a GPU of compute capability 8.9 or newer (H100, H200, L40, RTX 4090); {device} has none",
                fix="drop the fp8 option, or run on such a GPU",
            )
        num = convert_blocks_to_float8(model.blocks, out_dtype=amp_dtype or torch.bfloat16)
        log.info("fp8: %d linear layers run as e4m3 x e4m3 matmuls with rowwise scales", num)
    if compile:
        compile_blocks(model, mode=compile_mode)
    return model


class CudaGraphForward:
    """Replays one captured forward for a fixed input shape: removes the launch gaps between small kernels.

    Pays at small batches (single-image inference), where the GPU otherwise idles between launches. The output
    tensor is reused by the next call: copy it if it must outlive that.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, warmup: int = 3) -> None:
        if example.device.type != "cuda":
            raise InternViTError("CUDA graphs need a CUDA input", fix="run on a GPU, or call the model directly")
        with torch.inference_mode(False):  # a normal tensor, so later calls may copy into it outside inference mode
            self.static_in = example.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
            for _ in range(warmup):
                fn(self.static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = fn(self.static_in)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape != self.static_in.shape:
            raise ValueError(f"this graph was captured for {tuple(self.static_in.shape)}, got {tuple(x.shape)}")
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Wrap each block of `model.blocks` so that its activations are recomputed in the backward pass.

    No numerical effect (the RNG state is replayed, so drop path draws the same), far less activation memory.
    torch's wrapper keeps the state-dict keys unchanged; parameter names gain `_checkpoint_wrapped_module`, which
    the optimizer's group rules ignore.
    """
    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    return model


@dataclass(frozen=True)
class FSDPSettings:
    """How FSDP2 shards what trains.

    `param_dtype`: the dtype the backbone computes in (its parameters all-gathered in it; None: fp32); gradients are
    reduced in fp32 and the sharded master weights, gradients and AdamW states stay fp32. `root`: the module around
    the backbone that holds the heads (sharded as one group, computing in fp32), with `root_methods` (other than
    forward) that run its parameters. `hybrid`: shard within a node, replicate across nodes (a 2-D mesh).
    `cpu_offload`: sharded parameters, gradients and optimizer states live in host memory.
    """

    root: nn.Module
    param_dtype: torch.dtype | None = None
    root_methods: tuple[str, ...] = ()
    hybrid: bool = False
    cpu_offload: bool = False


def device_mesh(dist: DistInfo, hybrid: bool) -> DeviceMesh:
    """All ranks in one shard group, or (hybrid) nodes x local ranks: replicate across, shard within a node."""
    if not hybrid:
        return init_device_mesh(dist.device.type, (dist.world_size,), mesh_dim_names=("shard",))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
    if dist.world_size % local:
        raise InternViTError(
            f"hybrid sharding needs the same number of processes on every node ({dist.world_size} over {local})",
            fix="launch the same --nproc_per_node on every node, or set train.hybrid_shard=false",
        )
    shape = (dist.world_size // local, local)
    return init_device_mesh(dist.device.type, shape, mesh_dim_names=("replicate", "shard"))


def shard(backbone: nn.Module, *, dist: DistInfo, settings: FSDPSettings) -> None:
    """`fully_shard` each block, then the backbone (patch embedding, cls and pos), then the root, in place."""
    mesh = device_mesh(dist, settings.hybrid)
    # pinned host memory needs a GPU driver
    offload = CPUOffloadPolicy(pin_memory=dist.device.type == "cuda") if settings.cpu_offload else OffloadPolicy()
    compute = MixedPrecisionPolicy(param_dtype=settings.param_dtype, reduce_dtype=torch.float32)
    for block in backbone.blocks:
        fully_shard(block, mesh=mesh, mp_policy=compute, offload_policy=offload)
    fully_shard(backbone, mesh=mesh, mp_policy=compute, offload_policy=offload)
    register_fsdp_forward_method(backbone, "get_intermediate_layers")
    fully_shard(settings.root, mesh=mesh, offload_policy=offload)  # heads: fp32, as on the DDP path
    for method in settings.root_methods:
        register_fsdp_forward_method(settings.root, method)


def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank: without SyncBatchNorm (gloo) each process
    tracks its own, so before an evaluation or an export all ranks take the ones that are saved."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, src=0)


def is_sharded(module: nn.Module) -> bool:
    return any(isinstance(m, FSDPModule) for m in module.modules())


@contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Keep every FSDP module's parameters all-gathered for a while (evaluation): ranks that run different numbers of
    forwards (each scores its own images) then run no collective. FSDP2's documented evaluation pattern; a no-op for
    modules that are not sharded."""
    fsdp = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for m in fsdp:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for i, m in enumerate(fsdp):
            m.reshard()
            if i:  # FSDP keeps the root unsharded between forward and backward: leave its setting as it was
                m.set_reshard_after_forward(True, recurse=False)


def parallelize(
    module: nn.Module,
    *,
    dist: DistInfo,
    backbone: nn.Module | None = None,
    activation_checkpointing: bool = False,
    compile: bool = False,
    sync_bn: bool = True,
    fsdp: FSDPSettings | None = None,
) -> nn.Module:
    """Prepare a trainable `module` in place (and return what to call): checkpoint, compile, data parallel.

    `backbone` is the trainable backbone inside `module` whose blocks are checkpointed and compiled (None: nothing
    of a backbone trains). With `fsdp`, the backbone and `fsdp.root` are sharded (FSDP2) and `module` is returned
    as it is; FSDP reduce-scatters the gradients of every micro-step (accumulating them unsharded would hold a
    full fp32 copy). Otherwise, across processes, BatchNorm becomes SyncBatchNorm on GPUs (with `sync_bn`; gloo has
    no SyncBatchNorm, so on CPUs each process normalises with its own batch) and the module is wrapped in DDP, whose
    `no_sync` the loop uses on accumulation micro-steps. Build the optimizer and any EMA after this call.
    """
    if backbone is not None and activation_checkpointing:
        apply_activation_checkpointing(backbone)
    if backbone is not None and compile:
        compile_blocks(backbone)
    if dist.distributed and sync_bn and dist.device.type == "cuda":
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)  # in place below a non-BN root
    elif dist.distributed and sync_bn and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        log.warning("SyncBatchNorm needs GPUs: on CPU each process normalises with its own batch statistics")
    if fsdp is not None:
        if backbone is None:
            raise InternViTError("FSDP shards a trained backbone", fix="use train.parallel=ddp for a frozen backbone")
        shard(backbone, dist=dist, settings=fsdp)
        return module
    if not dist.distributed:
        return module
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
