"""Applied from outside the model: the one place where models are prepared to run fast and in parallel.

`parallelize` prepares what trains, in a fixed order: activation checkpointing (each backbone block wrapped), then
compilation (each block), then data parallelism (SyncBatchNorm on GPUs + DDP today; FSDP2 slots in here).

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
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
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


def parallelize(
    module: nn.Module,
    *,
    dist: DistInfo,
    backbone: nn.Module | None = None,
    activation_checkpointing: bool = False,
    compile: bool = False,
    sync_bn: bool = True,
) -> nn.Module:
    """Prepare a trainable `module` in place (and return what to call): checkpoint, compile, data parallel.

    `backbone` is the trainable backbone inside `module` whose blocks are checkpointed and compiled (None: nothing
    of a backbone trains). Across processes, BatchNorm becomes SyncBatchNorm on GPUs (with `sync_bn`; gloo has no
    SyncBatchNorm, so on CPUs each process normalises with its own batch) and the module is wrapped in DDP, whose
    `no_sync` the loop uses on accumulation micro-steps. Build the optimizer and any EMA after this call.
    """
    if backbone is not None and activation_checkpointing:
        apply_activation_checkpointing(backbone)
    if backbone is not None and compile:
        compile_blocks(backbone)
    if not dist.distributed:
        return module
    if sync_bn and dist.device.type == "cuda":
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    elif sync_bn and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        log.warning("SyncBatchNorm needs GPUs: on CPU each process normalises with its own batch statistics")
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
