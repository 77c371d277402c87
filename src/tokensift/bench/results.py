"""results.jsonl: one row per (sample, method), appended and fsynced so a killed run loses nothing."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

KEY_FIELDS = ("model", "task", "method_spec", "length", "depth", "index", "seed")


def row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    # Rows written before protocols (dtypes) existed were query-aware (float32).
    return (
        *(row.get(f) for f in KEY_FIELDS),
        row.get("protocol") or "query-aware",
        row.get("dtype") or "float32",
    )


def read_rows(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """All complete rows. A truncated last line (a run killed mid-write) is dropped, and with
    `repair` the file is rewritten without it so appends start on a clean line."""
    if not path.exists():
        return []
    rows, bad = [], False
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON") from None
            bad = True
    if (bad or (lines and not path.read_text().endswith("\n"))) and repair:
        write_rows(path, rows)
    return rows


def write_rows(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def append_row(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
