"""The one training step loop of both tasks: accumulation to a global batch, clipping, schedule, logs, checkpoints.

A task hands over a recipe (`TrainTask`): its micro-batches, its forward + loss, and its hooks (per-step set-up,
after-step updates such as EMA, evaluation, the history record). Everything else happens here, once:
- a step of `accum_steps` micro-batches, gradients synchronised on the last one only (`no_sync` before it);
- loss scaling for fp16, the total-norm clip (also measured when off), the optimizer and schedule steps;
- the progress bar, metrics lines (`metrics.jsonl`, rank 0), periodic evaluation and checkpoints, the history of
  records that a resumed run continues, and the picture of the curves (`training.png`) when training ends;
- SIGTERM / SIGINT (a cluster's preemption notice, Ctrl-C): the current step finishes, a checkpoint is written and
  `TrainingInterrupted` is raised (the CLI exits with status 3); a second signal exits at once. A rerun resumes
  bit-identically, the unfinished interval's loss sums included.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from internvit.engine.checkpoint import Checkpointer, ResumePoint, ShardedOptimizerState, Stateful
from internvit.engine.parallelize import is_sharded
from internvit.engine.plots import plot_training, read_metrics
from internvit.engine.progress import progress
from internvit.engine.results import format_record
from internvit.engine.schedule import StepScheduler
from internvit.errors import InternViTError

log = logging.getLogger(__name__)


class TrainTask(Protocol):
    """What a task supplies to `train`: what trains, its data, its step function and its hooks.

    `model` is the module `loss` calls (wrapped for data parallelism; its trainable parameters are the ones clipped),
    `optimizer` and `scheduler` step once per optimizer step.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: StepScheduler

    def batches(self, start_step: int) -> Iterator[Any]:
        """Micro-batches from optimizer step `start_step` on, in the order an uninterrupted run sees them."""

    def begin_step(self, step: int) -> None:
        """Before step `step` (0-based): per-step seeding, train/eval modes."""

    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """Forward + loss of one micro-batch: (loss to back-propagate, detached values to log, images in it)."""

    def after_step(self, step: int) -> None:
        """After the optimizer and schedule steps of step `step` (e.g. the EMA update)."""

    def log_record(self, step: int, info: dict[str, float]) -> dict[str, Any] | None:
        """The metrics line of step `step` from the loop's `info` (loss, logged values, grad_norm, lr, img_s,
        s_per_step), or None for no line."""

    def evaluate(self, done: int) -> dict[str, Any]:
        """Evaluation after `done` steps; returns its summary."""

    def summarize(self, done: int, train: dict[str, Any], evaluation: dict[str, Any] | None) -> dict[str, Any] | None:
        """The history record at a save or evaluation point (None for none), from the train statistics since the
        previous such point and the evaluation just run (None if none ran)."""

    def state_objects(self) -> Mapping[str, Stateful]:
        """The task's own resumable state (model parts, EMA, ...), by name."""


@dataclass(frozen=True)
class LoopSettings:
    """One run's fixed loop settings, in optimizer steps."""

    total_steps: int
    accum_steps: int
    eval_every: int
    save_every: int
    clip_grad: float = 0.0  # total-norm clip; 0 = off (the norm is still measured and logged)
    grad_scaler: bool = False  # fp16 loss scaling
    tensorboard: bool = False  # every metrics record also as TensorBoard scalars in RUN/tensorboard/


EXIT_INTERRUPTED = 3  # the exit status of a run stopped by a signal after writing its checkpoint


class TrainingInterrupted(Exception):
    """Training stopped on SIGTERM / SIGINT after `step` steps, with a checkpoint of that step in `run_dir`."""

    def __init__(self, signum: int, step: int, run_dir: Path) -> None:
        self.signum, self.step, self.run_dir = signum, step, run_dir
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint in {run_dir}")


class StopSignals:
    """While active (main thread only): the first SIGTERM / SIGINT is recorded for the loop to act on at the end of
    the step; a second one ends the process at once (status 128 + signal, as a shell reports a signal)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            print(f"internvit: second {name}: exiting now, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(
            f"internvit: {name}: finishing this step, then writing a checkpoint and stopping "
            f"(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )


def _agree_stop(signals: StopSignals, device: torch.device) -> int | None:
    """The signal any process received (every process stops at the same step), or None."""
    signum = signals.signum or 0
    if torch.distributed.is_initialized():
        flag = torch.tensor([signum], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        signum = int(flag.item())
    return signum or None


class LoopState:
    """The loop's own resumable state: steps done, the history of records, how much of `metrics.jsonl` they
    account for (a resumed run cuts the file there, so every record appears once), and, for a checkpoint written
    between two records, every process's loss sums of the unfinished interval."""

    def __init__(self, metrics: Path | None) -> None:  # None: not the rank that writes metrics.jsonl
        self.step, self.history, self.metrics = 0, [], metrics
        self.interval: list[list[float]] | None = None

    def state_dict(self) -> dict[str, Any]:
        size = self.metrics.stat().st_size if self.metrics and self.metrics.is_file() else 0
        return {"step": self.step, "history": self.history, "metrics_bytes": size, "interval": self.interval}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.history = int(state["step"]), list(state["history"])
        self.interval = state.get("interval")
        size = int(state.get("metrics_bytes", 0))
        if self.metrics and self.metrics.is_file() and self.metrics.stat().st_size > size:
            os.truncate(self.metrics, size)  # records of steps after the checkpoint are replayed: drop them


class _Totals:
    """Loss x images and images since the last record, plus the clock of that interval (one sync per record)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.images, self.start = 0, time.perf_counter()

    def gather(self) -> list[list[float]]:
        """Every process's sums (a collective when distributed), to checkpoint an unfinished interval."""
        if not torch.distributed.is_initialized():
            return [self.sums.tolist()]
        parts = [torch.zeros_like(self.sums) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, self.sums)
        return [part.tolist() for part in parts]

    def restore(self, interval: list[list[float]], rank: int) -> None:
        """This process's sums of a checkpointed interval (all of them on rank 0 when the process count changed)."""
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if len(interval) == world:
            mine = interval[rank]
        else:
            mine = [sum(part[i] for part in interval) for i in range(2)] if rank == 0 else [0.0, 0.0]
        self.sums = torch.tensor(mine, dtype=torch.float64, device=self.device)
        self.images = int(mine[1])

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.sums += torch.stack([loss.detach().double() * images, torch.tensor(images, device=self.device)])
        self.images += images

    def reduce(self) -> dict[str, float]:
        """Mean loss and image count over all processes, and this process's seconds, since the last reset."""
        sums = self.sums.clone()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        return {
            "train_loss": (sums[0] / sums[1].clamp(min=1)).item(),
            "train_images": int(sums[1].item()),
            "seconds": round(time.perf_counter() - self.start, 2),
        }


def append_jsonl(path: Path, record: dict) -> None:
    """One JSON object per line (appends are line-atomic enough for a log of metrics)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


class MetricsLog:
    """Where the main process's metrics records go: `metrics.jsonl`, and with `tensorboard` the numeric fields as
    scalars at the optimizer step (RUN/tensorboard/, one event file per start; a resumed run continues the steps)."""

    def __init__(self, run_dir: Path, *, tensorboard: bool, resumed_at: int = 0) -> None:
        self.path, self.writer = run_dir / "metrics.jsonl", None
        if tensorboard:  # the package's presence is checked when the config is built (engine.config)
            from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package

            # a resumed run replays the steps after its checkpoint: their old events go, as in metrics.jsonl
            purge = {"purge_step": resumed_at + 1} if resumed_at else {}
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), **purge)

    def write(self, record: dict[str, Any], step: int) -> None:
        """The record in metrics.jsonl (and TensorBoard), and as one rounded log line."""
        append_jsonl(self.path, record)
        log.info("%s", format_record(record))
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and not isinstance(value, bool) and key not in ("step", "iter"):
                    self.writer.add_scalar(key, value, global_step=step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def train(
    task: TrainTask, *, settings: LoopSettings, checkpointer: Checkpointer, resume: ResumePoint | None
) -> list[dict[str, Any]]:
    """Run steps from the resume point (or 0) to `settings.total_steps`; returns the history of records.

    Records are written at every evaluation point and every save point; a checkpoint of the loop, the optimizer,
    the schedule, the scaler and the task's objects at every save point and at the end.
    """
    model, optimizer, scheduler = task.model, task.optimizer, task.scheduler
    dist, run_dir = checkpointer.dist, checkpointer.run_dir
    scaler = torch.amp.GradScaler(dist.device.type, enabled=settings.grad_scaler)
    state = LoopState(run_dir / "metrics.jsonl" if dist.is_main else None)
    objects = {
        **task.state_objects(),
        "optimizer": ShardedOptimizerState(model, optimizer) if is_sharded(model) else optimizer,
        "scheduler": scheduler,
        "scaler": scaler,
        "loop": state,
    }
    if resume is not None:
        checkpointer.restore(resume, objects)
        log.info("resumed from %s at step %d of %d", run_dir, state.step, settings.total_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = task.batches(state.step)
    totals = _Totals(dist.device)
    if state.interval is not None:
        totals.restore(state.interval, dist.rank)
        state.interval = None
    metrics = MetricsLog(run_dir, tensorboard=settings.tensorboard, resumed_at=state.step) if dist.is_main else None
    try:
        with StopSignals() as signals:
            _steps(task, settings, checkpointer, objects, state, totals, batches, params, scaler, signals, metrics)
    finally:  # finished, interrupted or diverged: the curves so far
        if metrics is not None:
            metrics.close()
            _draw_curves(metrics.path, run_dir / "training.png")
    return state.history


def _draw_curves(metrics: Path, picture: Path) -> None:
    """training.png from metrics.jsonl; a failure to draw is a warning, never the run's outcome (which may be an
    exception in flight)."""
    if not metrics.is_file():
        return
    try:
        plot_training(read_metrics(metrics), picture)
    except Exception as e:  # noqa: BLE001 - a picture must not hide the run's own result or error
        log.warning("could not draw %s: %s", picture, e)


def _steps(task, settings, checkpointer, objects, state, totals, batches, params, scaler, signals, metrics) -> None:
    """The steps from state.step on; on a signal, a checkpoint of the step just done, then TrainingInterrupted."""
    model, optimizer, scheduler = task.model, task.optimizer, task.scheduler
    dist, run_dir = checkpointer.dist, checkpointer.run_dir
    start_step, start = state.step, time.perf_counter()
    bar = progress(total=settings.total_steps, initial=state.step, desc="train", disable=not dist.is_main)
    for step in range(state.step, settings.total_steps):
        task.begin_step(step)
        logs = _accumulate(task, model, batches, scaler, totals, settings.accum_steps)
        lr = optimizer.param_groups[-1]["lr"]  # the rate this step uses
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, settings.clip_grad if settings.clip_grad > 0 else math.inf)
        norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)  # sharded: the global norm
        _check_finite(step, logs["loss"], norm, scaler.is_enabled(), run_dir)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step_update(step)
        task.after_step(step)
        done = step + 1
        state.step = done
        elapsed = time.perf_counter() - start
        info = {
            **logs,
            "grad_norm": norm,
            "lr": lr,
            "img_s": totals.images / (time.perf_counter() - totals.start),
            "s_per_step": elapsed / (done - start_step),
        }
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss']:.3f}", lr=f"{lr:.3g}")
        record = task.log_record(step, info)
        if record is not None and metrics is not None:
            metrics.write(record, done)
        saved = _boundary(task, done, settings, state, totals, checkpointer, objects, metrics)
        signum = _agree_stop(signals, dist.device)
        if signum is not None:
            bar.close()
            if not saved:
                state.interval = totals.gather()
                checkpointer.save(objects)
                state.interval = None
            raise TrainingInterrupted(signum, done, run_dir)
    bar.close()


def _check_finite(step: int, loss: float, norm: float, scaled: bool, run_dir: Path) -> None:
    """Stop at a non-finite loss or gradient norm (the same figures on every rank, so all stop together), before
    the step is applied and before anything is saved: the last good checkpoint stays. With fp16 loss scaling an
    infinite norm is expected now and then (the scaler skips that step)."""
    if math.isfinite(loss) and (math.isfinite(norm) or scaled):
        return
    raise InternViTError(
        f"training diverged at step {step + 1}: loss {loss}, gradient norm {norm}",
        fix=f"lower the learning rate (or check the data); {run_dir} keeps the last good checkpoint",
    )


def _accumulate(task, model, batches, scaler, totals: _Totals, accum: int) -> dict[str, float]:
    """Forward + backward of `accum` micro-batches, gradients synchronised on the last; the logged values' means over
    the micro-batches and processes."""
    logs: dict[str, torch.Tensor] = {}
    for micro in range(accum):
        batch = next(batches)
        sync = micro == accum - 1
        with nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync():
            loss, values, images = task.loss(batch)
            scaler.scale(loss / accum).backward()
        totals.add(loss, images)
        for key, value in {"loss": loss, **values}.items():
            logs[key] = logs.get(key, 0.0) + value.detach().double() / accum
    values = torch.stack(list(logs.values()))
    if torch.distributed.is_initialized():  # the mean over all processes: the same figures on any number of them
        torch.distributed.all_reduce(values)
        values /= torch.distributed.get_world_size()
    return dict(zip(logs, values.tolist(), strict=True))  # one device sync per step


def _boundary(task, done, settings, state, totals, checkpointer, objects, metrics) -> bool:
    """Evaluation, the history record and the checkpoint due after `done` steps; whether a checkpoint was written."""
    last = done == settings.total_steps
    evaluate = done % settings.eval_every == 0 or last
    save = done % settings.save_every == 0 or last
    if not (evaluate or save):
        return False
    evaluation = task.evaluate(done) if evaluate else None
    record = task.summarize(done, totals.reduce(), evaluation)
    if record is not None:
        state.history.append(record)
        if metrics is not None:
            metrics.write(record, done)
    if save:
        checkpointer.save(objects)
    totals.reset()  # the next interval's clock starts after the checkpoint is written
    return save
