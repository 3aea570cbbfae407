"""PNG pictures of a run folder: training curves from `metrics.jsonl`, per-class scores, most-confused class pairs.

Drawn with matplotlib's object-oriented API on its Agg canvas (a `Figure` of its own, never `pyplot`, so no global
state and no display), written atomically. Every function returns the data it drew, or None (and writes nothing)
when there is nothing to draw.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from internvit.atomic import atomic_path
from internvit.errors import InternViTError

log = logging.getLogger(__name__)
DPI = 120
Points = list[tuple[float, float]]


def read_metrics(path: Path) -> list[dict]:
    """The records of a `metrics.jsonl`, skipping blank lines and a truncated last line (a writer killed mid-line)."""
    lines = [(n, line) for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    records = []
    for i, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif i == len(lines) - 1:
            log.warning("%s: skipped the unreadable last line %d (an interrupted write)", path, number)
        else:
            raise InternViTError(
                f"{path}: line {number} is not a JSON object: {line[:80]!r}",
                fix="delete or repair that line (one JSON object per line)",
            )
    return records


def training_series(records: list[dict]) -> dict[str, Points]:
    """The curves in metrics records, keyed by series name: "loss" and "lr" against steps done, each classification
    `val_acc1_*` against the epoch, segmentation "mIoU" against iterations. Non-finite values are left out."""
    series: dict[str, Points] = {}

    def add(name: str, x: Any, y: Any) -> None:
        if _finite(x) and _finite(y):
            series.setdefault(name, []).append((x, float(y)))

    for record in records:
        if "step" in record:  # classification: `step` is 0-based, plotted at the number of optimizer steps done
            add("loss", record["step"] + 1, record.get("loss", record.get("head_loss")))  # head_loss: a probe sweep
            add("lr", record["step"] + 1, record.get("lr"))
        elif "iter" in record and "mIoU" in record:  # a segmentation evaluation
            add("mIoU", record["iter"], record["mIoU"])
        elif "iter" in record:  # a segmentation step line: `iter` is iterations done
            add("loss", record["iter"], record.get("loss"))
            add("lr", record["iter"], record.get("lr"))
        elif "epoch" in record:  # a classification epoch line, with validation only on epochs that evaluated
            for key, value in record.items():
                if key.startswith("val_acc1_"):
                    add(key, record["epoch"], value)
    return series


def plot_training(records: list[dict], path: Path) -> dict[str, Points] | None:
    """Training loss, learning rate and validation metric side by side (only the panels with data) into `path`."""
    series = training_series(records)
    if not series:
        return None
    segmentation = any("iter" in record for record in records)
    step_label = "iteration" if segmentation else "optimizer step"
    val = {name: points for name, points in series.items() if name == "mIoU" or name.startswith("val_acc1_")}
    panels = [
        (title, curves, xlabel, ylabel)
        for title, curves, xlabel, ylabel in (
            ("training loss", {"loss": series.get("loss")}, step_label, "loss"),
            ("learning rate", {"lr": series.get("lr")}, step_label, "learning rate"),
            ("validation", val, "iteration" if segmentation else "epoch", "mIoU (%)" if segmentation else "top-1 (%)"),
        )
        if any(curves.values())
    ]
    fig, axes = _figure(5.0 * len(panels), 3.6, ncols=len(panels))
    for ax, (title, curves, xlabel, ylabel) in zip(axes, panels, strict=True):
        for name, points in curves.items():
            xs, ys = zip(*points, strict=True)
            few = len(points) <= 30  # markers show where sparse points (evaluations, short runs) were taken
            ax.plot(xs, ys, marker="o" if few else None, markersize=3, label=name.removeprefix("val_acc1_"))
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)  # steps, iterations and epochs are counts
        ax.grid(alpha=0.3)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if title == "validation" and not segmentation:
            ax.legend(title="head", fontsize=8)
    _save(fig, path)
    return series


def plot_per_class(
    rows: list[dict], path: Path, *, metric: str = "IoU", title: str = "per-class score"
) -> list[tuple[str, float]] | None:
    """Horizontal bars of `metric` per class, best first, with their mean as a line; classes without a value
    (NaN or None: absent from the evaluation) are left out. Returns the (class, value) pairs drawn, in order."""
    bars = sorted(
        ((str(row["class"]), float(row[metric])) for row in rows if _finite(row.get(metric))),
        key=lambda pair: pair[1],
        reverse=True,
    )
    if not bars:
        return None
    names, values = zip(*bars, strict=True)
    mean = sum(values) / len(values)
    fontsize = 8 if len(bars) <= 40 else 6  # 0.16 in a row: 6 pt keeps 150 ADE20K names apart
    fig, (ax,) = _figure(8.0, max(2.5, 0.16 * len(bars) + 1.2))
    drawn = ax.barh(range(len(bars)), values, color="C0")
    ax.bar_label(drawn, fmt="%.1f", fontsize=fontsize, padding=2)
    ax.axvline(mean, color="C3", linestyle="--", label=f"mean {mean:.2f}")
    ax.set_yticks(range(len(bars)), names, fontsize=fontsize)
    ax.set_ylim(len(bars) - 0.5, -0.5)  # best at the top
    ax.set_xlim(left=min(0.0, *values))
    ax.margins(x=0.08)
    ax.set(title=f"{title} ({len(bars)} classes)", xlabel=metric)
    ax.tick_params(axis="x", top=True, labeltop=len(bars) > 40)  # a long chart gets its scale at both ends
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)
    return list(bars)


def plot_confusions(
    pairs: list[dict], path: Path, *, title: str = "most confused class pairs"
) -> list[tuple[str, int]] | None:
    """Horizontal bars of the counts of (true, predicted) class pairs, labelled "true → predicted", in the given
    order (most confused first). Returns the (label, count) pairs drawn."""
    bars = [(f"{pair['true']} → {pair['predicted']}", int(pair["count"])) for pair in pairs]
    if not bars:
        return None
    labels, counts = zip(*bars, strict=True)
    fig, (ax,) = _figure(8.0, max(2.0, 0.3 * len(bars) + 1.2))
    drawn = ax.barh(range(len(bars)), counts, color="C1")
    ax.bar_label(drawn, fontsize=8, padding=2)
    ax.set_yticks(range(len(bars)), labels, fontsize=8)
    ax.set_ylim(len(bars) - 0.5, -0.5)  # the most confused at the top
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.margins(x=0.08)
    ax.set(title=title, xlabel="images")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    return bars


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _figure(width: float, height: float, *, ncols: int = 1):
    """A new figure (tight layout) and its row of `ncols` axes."""
    from matplotlib.figure import Figure  # here, not at the top: half a second of every command's start-up

    fig = Figure(figsize=(width, height), layout="tight")
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:  # a killed write leaves no half PNG
        fig.savefig(tmp, format="png", dpi=DPI)
