"""Per-iteration learning-rate schedules (timm cosine, mmcv poly) and the scheduler that applies them to an optimizer.

Everything here is a pure function of the global optimizer step, so resuming needs only the last step seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["StepScheduler", "cosine_lr", "poly_lr"]


def _check_steps(total_steps: int, warmup_steps: int) -> None:
    """Raise ValueError on a schedule length that makes no sense."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")


def cosine_lr(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int,
    warmup_lr: float = 0.0,
    min_lr: float = 0.0,
) -> float:
    """LR at global step `step` of timm's CosineLRScheduler (t_in_epochs=False, cycle_limit=1, warmup_prefix=False).

    step < warmup_steps: warmup_lr + step * (base_lr - warmup_lr) / warmup_steps (linear, reaches base_lr only at the
    end); step < total_steps: min_lr + 0.5 (base_lr - min_lr)(1 + cos(pi step / total_steps)), i.e. the cosine is NOT
    shifted by the warmup, so the LR jumps down when warmup ends (docs/protocol.md §4.1); later: min_lr. The operation
    order copies timm's `_get_lr` so values are bit-identical.
    """
    _check_steps(total_steps, warmup_steps)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return warmup_lr + step * ((base_lr - warmup_lr) / warmup_steps)
    if step >= total_steps:
        return min_lr
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * step / total_steps))


def poly_lr(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    power: float = 1.0,
    min_lr: float = 0.0,
    warmup_steps: int = 0,
    warmup_ratio: float = 1e-6,
) -> float:
    """LR at iteration `step` (0-based, as mmcv's runner.iter) of mmcv's PolyLrUpdaterHook with linear warmup.

    regular = (base_lr - min_lr) * (1 - step / total_steps) ** power + min_lr; for step < warmup_steps the warmup is
    multiplicative on the decayed value: regular * (1 - (1 - step / warmup_steps) * (1 - warmup_ratio)) (mmcv 1.x
    `get_warmup_lr`, linear). mmcv evaluates this before each iteration, so pair it with `lag_one_step=False`.
    For step >= total_steps (never reached by mmcv) this returns min_lr.
    """
    _check_steps(total_steps, warmup_steps)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step >= total_steps:
        return min_lr
    regular = (base_lr - min_lr) * (1 - step / total_steps) ** power + min_lr
    if step < warmup_steps:
        k = (1 - step / warmup_steps) * (1 - warmup_ratio)
        return regular * (1 - k)
    return regular


class StepScheduler:
    """Sets every param group's LR to `lr_fn(step) * group.get("lr_scale", 1.0)` once per optimizer step.

    Protocol (as the original's timm scheduler): the constructor sets lr_fn(0); after the optimizer step with 0-based
    global index s, call `step_update(s)`.

    - `lag_one_step=True` (default, the original InternVL classification order, docs/protocol.md §4.1): `step_update(s)`
      sets lr_fn(s), so the optimizer step s runs with lr_fn(max(s - 1, 0)) -- steps 0 and 1 both use lr_fn(0)
      (0 with warmup_lr 0), and the LR logged right after step s is lr_fn(s).
    - `lag_one_step=False` (textbook order, also mmcv's before-iteration hook): `step_update(s)` sets lr_fn(s + 1), so
      optimizer step s runs with lr_fn(s).

    `lr_used_at(s)` gives the LR that optimizer step s runs with under the chosen order. State is only the last
    step seen, so `state_dict()` / `load_state_dict()` resume exactly (lr_fn itself is code, not state).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, lr_fn: Callable[[int], float], *, lag_one_step: bool = True
    ) -> None:
        self.optimizer = optimizer
        self.lr_fn = lr_fn
        self.lag_one_step = lag_one_step
        self.last_step: int | None = None  # last value passed to step_update; None before the first step
        self._apply(0)

    def _apply(self, t: int) -> None:
        """Write lr_fn(t), scaled per group by its optional `lr_scale`, into every param group."""
        lr = self.lr_fn(t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr

    def _target_step(self, step: int | None) -> int:
        """The schedule index whose LR is active after `step_update(step)` (0 before any update)."""
        if step is None:
            return 0
        return step if self.lag_one_step else step + 1

    def step_update(self, step: int) -> None:
        """Call after the optimizer step with 0-based global index `step`; sets the LR for the next step."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self.last_step = step
        self._apply(self._target_step(step))

    def lr_used_at(self, step: int) -> float:
        """Unscaled LR that the optimizer step with 0-based global index `step` runs with under this order."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self.lr_fn(self._target_step(step - 1 if step > 0 else None))

    def get_last_lr(self) -> list[float]:
        """Current LR of every param group (what the next optimizer step will use)."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Resumable state: the last step seen and the update order (plain Python values, weights_only-safe)."""
        return {"last_step": self.last_step, "lag_one_step": self.lag_one_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the last step seen and re-apply its LR to the optimizer; the update order must match."""
        if set(state) != {"last_step", "lag_one_step"}:
            raise ValueError(f"StepScheduler state must have keys last_step, lag_one_step; got {sorted(state)}")
        if bool(state["lag_one_step"]) != self.lag_one_step:
            raise ValueError(
                f"lag_one_step mismatch: checkpoint has {state['lag_one_step']}, scheduler has {self.lag_one_step}"
            )
        last = state["last_step"]
        self.last_step = None if last is None else int(last)
        self._apply(self._target_step(self.last_step))
