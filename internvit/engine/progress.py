"""Progress for long work: a tqdm bar on a terminal, plain periodic log lines elsewhere (a cluster job's log).

Off a terminal tqdm redraws one line with carriage returns forever (an 80k-iteration run would leave megabytes on
a single line); `progress` then gives `PlainProgress`, which logs `desc: n/total (rate, postfix)` every
`PLAIN_EVERY_S` seconds and at the end. Log records go through `tqdm.write` on a terminal, so they never tear a bar.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm import tqdm

log = logging.getLogger("internvit.progress")
PLAIN_EVERY_S = 30.0


def on_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class PlainProgress:
    """The part of tqdm's interface the package uses, as log lines at most every `every_s` seconds."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        every_s: float = PLAIN_EVERY_S,
    ) -> None:
        self.iterable, self.desc, self.unit, self.every_s = iterable, desc, unit, every_s
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n = self.start_n = initial
        self.start = self.last = time.perf_counter()
        self.postfix: dict[str, Any] = {}
        self.closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self._line()

    def _line(self) -> None:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = (self.n - self.start_n) / elapsed
        of = f"/{self.total}" if self.total is not None else ""
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        log.info("%s: %d%s %s (%.3g %s/s%s)", self.desc, self.n, of, self.unit, rate, self.unit, extra)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n > self.start_n:
                self._line()


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    disable: bool = False,
    leave: bool = True,
):
    """A progress bar (tqdm) on a terminal, `PlainProgress` log lines elsewhere, nothing when `disable`."""
    if disable or on_terminal():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, leave=leave)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, initial=initial)


class TqdmHandler(logging.StreamHandler):
    """Writes records with `tqdm.write` on a terminal, so a line never lands inside a bar being drawn."""

    def emit(self, record: logging.LogRecord) -> None:
        if not on_terminal():
            super().emit(record)
            return
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)
