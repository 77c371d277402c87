"""results.jsonl: one row per (sample, method), appended and fsynced so a killed run loses nothing."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokensift.errors import TokensiftError

KEY_FIELDS = ("model", "task", "method_spec", "length", "depth", "index", "seed")


def chunk_label(chunk: int, lookahead: int = 0) -> str:
    """The suffix a chunked-prefill row's method label carries ('' for a one-forward prefill)."""
    if not chunk:
        return ""
    return f" [prefill-chunk {chunk}" + (f", lookahead {lookahead}]" if lookahead else "]")


def row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    # Rows written before protocols (dtypes) existed were query-aware (float32).
    return (
        *(row.get(f) for f in KEY_FIELDS),
        row.get("protocol") or "query-aware",
        row.get("dtype") or "float32",
        row.get("prefill_chunk") or 0,
        row.get("prefill_lookahead") or 0,
    )


def read_rows(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """All complete rows. A truncated last line (a run killed mid-write: no final newline) is dropped,
    and with `repair` the file is rewritten without it so appends start on a clean line. Any other
    line that is not a JSON object is corruption: a TokensiftError names it, and nothing is rewritten."""
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TokensiftError(
            f"{path} is not UTF-8 text (byte {exc.start}): restore it or move it away to start afresh"
        ) from None
    rows, lines = [], text.splitlines()
    truncated = bool(lines) and not text.endswith("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            problem = "" if isinstance(row, dict) else f"a JSON {type(row).__name__}, not an object"
        except json.JSONDecodeError as exc:
            row, problem = None, f"not JSON: {exc.msg} at column {exc.colno}"
        if not problem:
            rows.append(row)
        elif not (truncated and i == len(lines) - 1):
            raise TokensiftError(
                f"{path}:{i + 1} is not a results row ({problem}); fix or delete that line and rerun "
                "(a killed run only ever truncates the last line)"
            )
    if truncated and repair:
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


def read_meta(path: Path) -> dict[str, Any]:
    """meta.json of a results directory ({} when absent); a corrupt one is a TokensiftError."""
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        problem = "" if isinstance(meta, dict) and isinstance(meta.get("runs", []), list) else "no run list"
    except UnicodeDecodeError as exc:
        problem = f"not UTF-8 at byte {exc.start}"
    except json.JSONDecodeError as exc:
        problem = f"not JSON: {exc.msg} at line {exc.lineno}"
    if problem:
        raise TokensiftError(
            f"{path} is corrupt ({problem}): restore it, or delete it to keep the results but lose the "
            "record of past runs"
        )
    return meta
