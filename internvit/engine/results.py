"""Result tables: printed as Markdown, saved as JSON + CSV + Markdown (atomically)."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from internvit.atomic import atomic_path, write_json


def columns(rows: list[dict[str, object]]) -> list[str]:
    """Every key of every row, in first-seen order (rows may differ, e.g. epochs with and without evaluation)."""
    return list(dict.fromkeys(key for row in rows for key in row))


def format_table(rows: list[dict[str, object]]) -> str:
    """A Markdown table (readable in a terminal and pasteable into docs)."""
    if not rows:
        return "(no rows)"
    headers = columns(rows)
    widths = [max(len(str(h)), *(len(str(r.get(h, ""))) for r in rows)) for h in headers]

    def line(cells) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    body = [line(r.get(h, "") for h in headers) for r in rows]
    return "\n".join([line(headers), line("-" * w for w in widths), *body])


def format_record(record: dict[str, object]) -> str:
    """A record as one readable log line: `key value` pairs, floats to 4 significant digits (files keep them all)."""
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())


def log_done(command: str, best: str, out_dir: str | Path) -> None:
    """The last line of every command that writes a folder: what ran, its headline figure, where the results are."""
    logging.getLogger("internvit").info("%s done: %s; results in %s", command, best, out_dir)


def save_results(rows: list[dict[str, object]], out_dir: str | Path, stem: str) -> list[Path]:
    """Write `stem.json`, `stem.csv` and `stem.md` into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    paths = [out_dir / f"{stem}.{ext}" for ext in ("json", "csv", "md")]
    write_json(paths[0], rows)
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=columns(rows))
        writer.writeheader()
        writer.writerows(rows)
    for path, text in ((paths[1], buffer.getvalue()), (paths[2], format_table(rows) + "\n")):
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return paths
