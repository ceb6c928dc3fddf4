"""What agctl prints: tables and key/value blocks for people, JSON for scripts."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO


def as_json(value: Any, out: TextIO = sys.stdout) -> None:
    json.dump(value, out, indent=2, sort_keys=True)
    out.write("\n")


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], out: TextIO = sys.stdout) -> None:
    if not rows:
        out.write("(none)\n")
        return
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    out.write(
        "  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip() + "\n"
    )
    for row in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n")


def fields(value: dict[str, Any], out: TextIO = sys.stdout) -> None:
    width = max((len(k) for k in value), default=0)
    for k, v in value.items():
        out.write(f"{k.ljust(width)}  {_cell(v)}\n")


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v > 1e9:  # a timestamp
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v))
    if isinstance(v, list):
        return ", ".join(_cell(x) for x in v) or "-"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_cell(x)}" for k, x in v.items()) or "-"
    return str(v)


class Progress:
    """A one-line progress bar on a terminal; silent otherwise."""

    def __init__(self, label: str, out: TextIO = sys.stderr) -> None:
        self.label = label
        self.out = out
        self.enabled = out.isatty()
        self._last = 0.0
        self._start = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and done < total:
            return
        self._last = now
        pct = done * 100 / total if total else 100.0
        rate = done / max(now - self._start, 1e-6) / (1 << 20)
        bar = "#" * int(pct / 4)
        self.out.write(f"\r{self.label} [{bar:<25}] {pct:5.1f}% {done >> 20} MiB {rate:.0f} MiB/s")
        if done >= total:
            self.out.write("\n")
        self.out.flush()
