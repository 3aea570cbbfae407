"""Backbone forward throughput, side by side: our fast path, its options and the baselines, in one run.

For each preset x resolution x batch size and each variant: forward img/s, achieved TFLOP/s, % of a bf16 matmul
ceiling measured in the same run (fp32 on a CPU), peak memory, the set-up time (weights to the device, compilation,
first call) and fidelity against references computed in the same run. Then forward+backward at 504 px with
activation checkpointing (for full tuning).

FLOPs per image: `internvit.model.count_flops` = 2 x multiply-accumulates of the patch convolution, the four linears
of every block (qkv, proj, fc1, fc2) and attention's two matmuls (QK^T and AV: 2 x 2 x T^2 x C per block, T = tokens
incl. cls). Norms, softmax, GELU and adds are not counted (< 1%). It equals torch.utils.flop_counter (tested).
6B: 3073 GFLOPs at 224 px, 11945 at 448, 15365 at 504. TFLOP/s = FLOPs/image x img/s. Training rows count 3x the
forward FLOPs (the activation-checkpointing recompute is not counted: it is overhead, as in MFU).

Variants (weights random, the same for all; inputs random):
  eager                  ours, bf16 matmul weights under bf16 autocast, eager PyTorch, SDPA attention (baseline)
  transformers           transformers' InternVLVisionModel, bf16, sdpa attention (baseline)
  transformers-compiled  the same with each layer torch.compile'd (baseline)
  compiled               OUR DEFAULT: ours with each block compiled (engine/parallelize.optimize_for_inference)
  max-autotune           compiled with inductor's max-autotune-no-cudagraphs (long compile)
  cudagraphs             compiled, then the whole forward replayed as one CUDA graph (GPU only)
  cudnn-attention        compiled, with cuDNN's fused attention instead of PyTorch's default SDPA kernel (GPU only)
  pure-bf16              compiled, every weight bf16 and no autocast (the frozen segmentation backbone's numerics)
  fp8                    compiled, block linears as e4m3 x e4m3 matmuls with rowwise scales (H100/H200)

Fidelity (on the first timing batch): rel_err = ||f - f_fp32|| / ||f_fp32|| over all output
tokens against the eager fp32 model; cos_min / cos_mean = per-image cosine of the probe input [cls, mean(patches)]
against the eager bf16 variant; top1 = share of images whose argmax under a fixed random linear head (2C -> 1000)
matches the eager bf16 variant's.

  python benchmarks/throughput.py --out throughput.json                     # on a GPU: the 6B model, see --help
  python benchmarks/throughput.py --device cpu --preset debug --resolutions 56 --batch-sizes 2 --iters 2 \\
      --ceiling-size 256 --train-resolution 56 --train-batch 2                                 # CPU smoke test
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch._functorch.config as functorch_config
import torch.nn.functional as F
from _bench import (
    ResultLog,
    ceiling_dtype,
    environment,
    guarded,
    matmul_ceiling_tflops,
    peak_memory_gib,
    reset_peak_memory,
    rounded,
    synchronize,
    time_calls,
)
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from internvit.classification.heads import cls_patch_concat
from internvit.engine.distributed import resolve_device
from internvit.engine.parallelize import (
    CudaGraphForward,
    apply_activation_checkpointing,
    cast_matmul_weights,
    compile_blocks,
    optimize_for_inference,
)
from internvit.engine.results import format_table
from internvit.model import InternViT, count_flops, get_config
from internvit.model.vit import build_model
from internvit.weights import from_native

CUDA_ONLY = ("cudagraphs", "cudnn-attention")
VARIANTS = (
    "eager",
    "transformers",
    "transformers-compiled",
    "compiled",
    "max-autotune",
    "cudagraphs",
    "cudnn-attention",
    "pure-bf16",
    "fp8",
)
DEFAULT_VARIANTS = ("eager", "transformers", "transformers-compiled", "compiled", "cudagraphs", "fp8")
TABLE = ["preset", "res", "batch", "variant", "img_s", "tflops", "pct_ceiling", "speedup", "peak_gib", "setup_s"]
TABLE += ["rel_err", "cos_min", "top1", "error"]
DIGITS = {"cos_min": 5, "top1": 3}  # decimals shown: a cosine of 0.9996 must not print as 1.0
Forward = Callable[[torch.Tensor], torch.Tensor]


def base_state(config, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """Random weights, kept on the CPU: the model's init with randomised norms, cls, pos_embed and LayerScale (so
    fidelity measures see every part; with the 0.1 LayerScale init the output would be mostly the patch embedding)."""
    torch.manual_seed(seed)
    model = build_model(config, device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "q_norm.weight", "k_norm.weight")):
                p.mul_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("gamma"):  # LayerScale near 1, not its 0.1 init: the blocks must shape the output
                p.fill_(1.0).mul_(1.0 + 0.2 * torch.randn_like(p))
            elif name.startswith(("pos_embed", "cls_token")):
                p.normal_(0.0, 0.02)
    cast_matmul_weights(model, torch.bfloat16)  # every variant sees the bf16-rounded matmul weights
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    del model
    return state


def ours(config, state, device, *, pure_bf16: bool = False, fp32: bool = False) -> InternViT:
    with torch.device("meta"):
        model = InternViT(config)
    if pure_bf16:
        model.to(torch.bfloat16)
    elif not fp32:
        cast_matmul_weights(model, torch.bfloat16)
    model.to_empty(device=device).load_state_dict(state)
    return model.eval().requires_grad_(False)


def build_variant(name: str, config, state, device: torch.device, example: torch.Tensor) -> Forward:
    """A forward for one variant: images (B, 3, H, W) -> all output tokens (B, 1+N, C)."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    if name in ("transformers", "transformers-compiled"):
        from internvit.weights.convert import build_transformers_model

        hf = build_transformers_model(config.replace(img_size=example.shape[-1]), attn_implementation="sdpa")
        hf_state = {k: v.to(torch.bfloat16) for k, v in from_native(state, "transformers").items()}
        hf.load_state_dict(hf_state, assign=True)
        hf = hf.to(device).eval().requires_grad_(False)
        if name == "transformers-compiled":
            for layer in hf.encoder.layer:
                layer.compile()
        return lambda x: hf(pixel_values=x.to(torch.bfloat16)).last_hidden_state
    if name == "pure-bf16":
        model = optimize_for_inference(ours(config, state, device, pure_bf16=True), amp_dtype=None)
        return lambda x: model(x.to(torch.bfloat16))
    model = ours(config, state, device)
    if name != "eager":  # compiled, max-autotune, cudagraphs, cudnn-attention, fp8
        mode = "max-autotune-no-cudagraphs" if name == "max-autotune" else None
        optimize_for_inference(model, compile=True, fp8=name == "fp8", compile_mode=mode)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with autocast:
            return model(x)

    if name == "cudagraphs":
        return CudaGraphForward(forward, example)
    return forward


@contextmanager
def attention_backend(variant: str) -> Iterator[None]:
    """cuDNN's attention for the cudnn-attention variant. The kernel is chosen while compiling, and the AOTAutograd
    cache key does not record that choice: with the cache on, this variant could reuse the `compiled` variant's
    flash-attention graph (or leave a cuDNN graph for later runs), so the cache is off for it."""
    if variant != "cudnn-attention":
        yield
        return
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION), functorch_config.patch(enable_autograd_cache=False):
        yield


def release_compiled() -> None:
    """Drop compiled code (its guards can keep the last variant's weights alive on the GPU) and free memory."""
    torch._dynamo.reset()
    gc.collect()


def fidelity(out: torch.Tensor, ref32: torch.Tensor, ref16: torch.Tensor, head: torch.Tensor) -> dict[str, float]:
    out = out.float()
    probe_in, probe_ref = cls_patch_concat(out), cls_patch_concat(ref16.float())  # what a linear probe sees
    cos = F.cosine_similarity(probe_in, probe_ref, dim=-1)
    agree = (probe_in @ head).argmax(-1) == (probe_ref @ head).argmax(-1)
    return {
        "rel_err": ((out - ref32).norm() / ref32.norm()).item(),
        "cos_min": cos.min().item(),
        "cos_mean": cos.mean().item(),
        "top1": agree.float().mean().item(),
    }


def reference_fp32(config, state, device, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """The eager fp32 model's output tokens for x (in chunks, to bound activation memory)."""
    model = ours(config, state, device, fp32=True)
    # no TF32 anywhere: matmuls default to full fp32, cuDNN convolutions (the patch embedding) do not
    with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        out = torch.cat([model(part).float() for part in x.split(chunk)])
    del model
    gc.collect()
    return out


def measure_forward(args, name: str, setting: dict, device: torch.device, refs: dict) -> dict[str, object]:
    """Build one variant, time it, and compare its output on the first timing batch with the references."""
    config, state, inputs, batch = setting["config"], setting["state"], setting["inputs"], setting["batch"]
    reset_peak_memory(device)
    with torch.inference_mode(), attention_backend(name):
        start = time.perf_counter()
        forward = build_variant(name, config, state, device, inputs[0])
        synchronize(device)
        build_s = time.perf_counter() - start
        timing = time_calls(lambda i: forward(inputs[i % 2]), device=device, warmup=args.warmup, iters=args.iters)
        peak = peak_memory_gib(device)
        out = forward(inputs[0]).float()
    img_s = batch / timing["median_s"]
    tflops = img_s * setting["flops"] / 1e12
    row = {"img_s": img_s, "tflops": tflops, "pct_ceiling": 100 * tflops / setting["ceiling"], "peak_gib": peak}
    row |= {"setup_s": build_s + timing["first_s"], "build_s": build_s, "timing": timing}
    if name == "eager":
        refs["eager"], refs["eager_img_s"] = out, img_s
    row["speedup"] = img_s / refs["eager_img_s"] if "eager_img_s" in refs else None
    if "eager" in refs:
        row |= fidelity(out, refs["fp32"], refs["eager"], refs["head"])
    return row


def run_resolution(args, preset: str, res: int, batch: int, device: torch.device, log: ResultLog) -> None:
    """Every variant at one resolution and batch size, eager first (the reference for speed-up and fidelity)."""
    config = get_config(preset).replace(img_size=res)  # pos_embed at this grid, as a segmentation backbone
    flops = count_flops(config, res)
    key = {"preset": preset, "res": res}
    log.add(key | {"batch": "-", "variant": "ceiling / FLOPs", "img_s": log.ceiling * 1e12 / flops})
    log.rows[-1] |= {"tflops": log.ceiling, "pct_ceiling": 100.0}
    gen = torch.Generator().manual_seed(args.seed + 1)
    setting = {"config": config, "state": base_state(config, device, args.seed), "batch": batch, "flops": flops}
    setting |= {"inputs": [torch.randn(batch, 3, res, res, generator=gen).to(device) for _ in range(2)]}
    setting["ceiling"] = log.ceiling
    refs = {"head": torch.randn(2 * config.embed_dim, 1000, generator=gen).to(device) / (2 * config.embed_dim) ** 0.5}
    refs["fp32"] = reference_fp32(config, setting["state"], device, setting["inputs"][0], args.fidelity_chunk)
    for name in sorted(args.variants, key=lambda v: v != "eager"):
        row = key | {"batch": batch, "variant": name}
        if name in CUDA_ONLY and device.type != "cuda":
            logging.info("skip %s: needs a GPU", name)
            continue
        if name.startswith("transformers") and importlib.util.find_spec("transformers") is None:
            log.add(row | {"error": "transformers is not installed"})
            continue
        log.add(row | guarded(measure_forward, args, name, setting, device, refs))
        logging.info("%s %d px b%d %s: %s img/s", preset, res, batch, name, log.rows[-1].get("img_s"))
        release_compiled()


def train_step(model: nn.Module, inputs: list[torch.Tensor], device: torch.device) -> Callable[[int], None]:
    def step(i: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(inputs[i % 2]).float().square().mean()
        loss.backward()
        model.zero_grad(set_to_none=False)

    return step


def measure_training(args, name: str, config, state, device: torch.device, ceiling: float) -> dict[str, object]:
    res, batch = args.train_resolution, args.train_batch
    reset_peak_memory(device)
    with torch.device("meta"):
        model = InternViT(config)
    model.to_empty(device=device).load_state_dict(state)
    apply_activation_checkpointing(model.train())
    if name == "compiled":
        compile_blocks(model)
    inputs = [torch.randn(batch, 3, res, res, device=device) for _ in range(2)]
    timing = time_calls(train_step(model, inputs, device), device=device, warmup=args.warmup, iters=args.iters)
    img_s = batch / timing["median_s"]
    tflops = img_s * 3 * count_flops(config, res) / 1e12
    row = {"img_s": img_s, "tflops": tflops, "pct_ceiling": 100 * tflops / ceiling, "setup_s": timing["first_s"]}
    return row | {"peak_gib": peak_memory_gib(device), "timing": timing}


def run_training(args, preset: str, device: torch.device, log: ResultLog) -> None:
    """Forward + backward with activation checkpointing: fp32 master weights under bf16 autocast (full tuning)."""
    res, batch = args.train_resolution, args.train_batch
    config = get_config(preset).replace(img_size=res)
    state = base_state(config, device, args.seed)
    for name in args.train_variants:
        row = {"preset": preset, "res": res, "batch": batch, "variant": f"train-{name} (fwd+bwd, AC)"}
        log.add(row | guarded(measure_training, args, name, config, state, device, log.ceiling))
        logging.info("train %s %d px b%d: %s img/s", name, res, batch, log.rows[-1].get("img_s"))
        release_compiled()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--preset", nargs="+", default=["internvit-6b-224px"], dest="presets")
    p.add_argument("--resolutions", nargs="+", type=int, default=[224, 448, 504])
    p.add_argument(
        "--batch-sizes", nargs="+", type=int, default=None, help="1 value, or one per resolution (default: ~32k tokens)"
    )
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    p.add_argument("--iters", type=int, default=10, help="timed calls (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after the first")
    p.add_argument("--fidelity-chunk", type=int, default=16, help="batch of the fp32 reference forward")
    p.add_argument("--ceiling-size", type=int, default=8192, help="n for the n^3 bf16 matmul ceiling")
    p.add_argument("--train-resolution", type=int, default=504)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-variants", nargs="*", default=["eager", "compiled"], choices=["eager", "compiled"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--warm-cache",
        action="store_true",
        help="reuse inductor's on-disk cache (default: a fresh one per run, so setup_s shows a cold compile)",
    )
    p.add_argument("--out", default="throughput.json", help="JSON with every number, the timings and the environment")
    args = p.parse_args(argv)
    if args.batch_sizes is None:  # 128 at 224 px, 32 at 448, 24 at 504: about 32k tokens, enough to fill an H100
        args.batch_sizes = [max(1, 128 * 224**2 // r**2 // 8 * 8) for r in args.resolutions]
    if len(args.batch_sizes) not in (1, len(args.resolutions)):
        p.error("--batch-sizes takes one value, or one per resolution")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    device = resolve_device(args.device)
    env = environment(device)
    cache = None if args.warm_cache else tempfile.mkdtemp(prefix="internvit-inductor-")
    if cache:  # read lazily by inductor and Triton, so setting them before the first compile suffices
        os.environ["TORCHINDUCTOR_CACHE_DIR"], os.environ["TRITON_CACHE_DIR"] = cache, os.path.join(cache, "triton")
    env["compile_cache"] = "warm (reused)" if args.warm_cache else "cold (fresh per run)"
    logging.info("environment: %s", env)
    ceiling = matmul_ceiling_tflops(device, args.ceiling_size)
    kind = str(ceiling_dtype(device)).removeprefix("torch.")
    logging.info("%s matmul ceiling: %.1f TFLOP/s (%d^3)", kind, ceiling, args.ceiling_size)
    batches = args.batch_sizes * len(args.resolutions) if len(args.batch_sizes) == 1 else args.batch_sizes
    log = ResultLog(args.out, environment=env, ceiling_tflops=ceiling, ceiling_size=args.ceiling_size)
    log.context["ceiling_dtype"] = kind
    for preset in args.presets:
        for res, batch in zip(args.resolutions, batches, strict=True):
            run_resolution(args, preset, res, batch, device, log)
        if args.train_variants:
            run_training(args, preset, device, log)
    log.finish()
    if cache:
        shutil.rmtree(cache, ignore_errors=True)
    rows = log.rows
    print(f"\n{env['device_name']} ({env['device']}), torch {env['torch']}, {env['date']}")
    print(f"{kind} matmul ceiling {ceiling:.4g} TFLOP/s, measured in this run ({args.ceiling_size}^3)\n")
    print(format_table([rounded({c: row.get(c) for c in TABLE}, digits=DIGITS) for row in rows]))
    print(f"\nwrote {args.out}")
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
