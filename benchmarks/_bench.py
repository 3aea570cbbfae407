"""Shared pieces of the benchmark scripts: device timing, the matmul ceiling, memory, the environment header."""

from __future__ import annotations

import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from internvit.atomic import write_json


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[int], object], *, device: torch.device, warmup: int, iters: int) -> dict[str, float]:
    """Seconds per call of fn(i): the first call alone (compilation, autotuning), then the median of `iters` timed
    calls after `warmup` more. GPU calls are timed with CUDA events around each call, CPU ones with a synced clock."""
    start = time.perf_counter()
    fn(0)
    synchronize(device)
    first = time.perf_counter() - start
    for i in range(warmup):
        fn(1 + i)
    synchronize(device)
    times = []
    for i in range(iters):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            begin_s = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - begin_s)
    return {"first_s": first, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def ceiling_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs; fp32 on CPUs, most of which have no native bf16 matmul (it would understate the ceiling)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def matmul_ceiling_tflops(device: torch.device, size: int, iters: int = 20) -> float:
    """Achieved matmul rate (TFLOP/s) for a size^3 product on random data, two operand pairs alternating."""
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = ceiling_dtype(device)
    pairs = [
        (
            torch.randn(size, size, device=device, generator=gen).to(dtype),
            torch.randn(size, size, device=device, generator=gen).to(dtype),
        )
        for _ in range(2)
    ]
    timing = time_calls(lambda i: pairs[i % 2][0] @ pairs[i % 2][1], device=device, warmup=3, iters=iters)
    return 2 * size**3 / timing["median_s"] / 1e12


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated device memory since the last reset (None on the CPU, where it is not tracked per phase)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def environment(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "host_cpus": os.cpu_count(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        info["device_name"] = platform.processor() or platform.machine()
    for name in ("transformers", "torchvision", "PIL"):
        module = sys.modules.get(name)
        if module is not None:
            info[name] = getattr(module, "__version__", "?")
    return info


def rounded(row: dict[str, object], digits: dict[str, int] | None = None) -> dict[str, object]:
    """Floats to 3 significant figures (whole numbers above 1000), or to `digits[key]` decimals; None as '-'."""
    digits = digits or {}

    def cell(key: str, value: object) -> object:
        if value is None:
            return "-"
        if isinstance(value, float) and key in digits:
            return f"{value:.{digits[key]}f}"
        if isinstance(value, float):
            return round(value) if abs(value) >= 1000 else float(f"{value:.3g}")
        return value

    return {k: cell(k, v) for k, v in row.items()}


class ResultLog:
    """Result rows plus their context, rewritten atomically after every row: an interrupted or killed run keeps
    everything it measured so far (`complete` says whether the run finished)."""

    def __init__(self, path: str | Path, **context: object) -> None:
        self.path, self.context, self.rows = Path(path), dict(context), []

    def add(self, row: dict[str, object]) -> None:
        self.rows.append(row)
        self._write(complete=False)

    @property
    def ceiling(self) -> float:
        return float(self.context["ceiling_tflops"])

    def finish(self) -> None:
        self._write(complete=True)

    def _write(self, complete: bool) -> None:
        write_json(self.path, {**self.context, "complete": complete, "rows": self.rows})


def guarded(measure: Callable[..., dict], *args) -> dict[str, object]:
    """One variant's failure (out of memory, an unsupported kernel) is recorded in its row; the run goes on."""
    try:
        return measure(*args)
    except Exception as e:  # noqa: BLE001 - a benchmark run must survive one variant; CI asserts no row has an error
        logging.exception("variant failed")
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()  # a sticky CUDA error (illegal address) raises here and ends the run
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
