"""Printing results: a human table by default, JSON with ``--json``."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Iterable


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if hasattr(value, "value") and not isinstance(value, (int, float, str)):
        return value.value
    if isinstance(value, (os.PathLike,)):
        return os.fspath(value)
    return str(value)


def emit_json(obj: Any, stream=None) -> None:
    print(json.dumps(obj, default=_jsonable, ensure_ascii=False), file=stream or sys.stdout)


def table(rows: Iterable[dict], columns: list[str], stream=None) -> None:
    """Aligned columns with a header; values are shown with str()."""
    rows = list(rows)
    cells = [[_display(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    out = stream or sys.stdout
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip(), file=out)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip(), file=out)


def pairs(obj: dict, stream=None) -> None:
    """One 'key: value' line per item."""
    width = max((len(k) for k in obj), default=0)
    for k, v in obj.items():
        print(f"{k.ljust(width)}  {_display(v)}", file=stream or sys.stdout)


def _display(value: Any) -> str:
    if value is None:
        return "-"
    text = _jsonable(value) if not isinstance(value, (int, float, str)) else str(value)
    # Odd names (newlines, escapes) must not break the table layout.
    return text.encode("unicode_escape").decode("ascii") if any(ch < " " for ch in text) else text


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
