"""Keep a long-running process's resident memory steady under glibc malloc: the server, a bench.

A server prefills prompts of many lengths on several worker threads. glibc serves each thread from
its own arena and, once a large block has been freed, raises its mmap threshold (up to 32 MiB), so
later prompt-sized tensors come from the arenas' heaps instead of fresh mappings. Freed heap
memory is returned to the system only from the top of a heap, so the process's RSS climbs with
every new mix of sizes although no object outlives its request (benchmarks/serve_load.py measured
+92% over a 170 s mixed load with glibc's defaults). A bench that runs cell after cell at 4k does
the same on one arena (4 of its 4.8 GB heap free but resident after ~5 cells), so the bench calls
`release` after every cell.

`tune_malloc` applies the chosen mallopt settings: a fixed mmap threshold (blocks above it are
mapped and unmapped with each tensor, which also turns off the dynamic raise), a cap on the number
of arenas, a trim threshold; `trim` hands free pages back (`malloc_trim`), called by the server when
a request ends. All are no-ops off glibc. The server's default (`--malloc-tuning arena_max,trim`)
was chosen by benchmarks/serve_malloc.py: two arenas plus a trim per request held RSS at about
half of glibc's defaults with round times within noise of theirs (paired 0.93x and 1.05x in two
runs), while the fixed mmap threshold (256 KiB or 2 MiB) cost 17-26% of the throughput (every
large activation is then a fresh, page-faulted mapping).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
import time
from typing import Any

from tokensift.errors import TokensiftError

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MMAP_THRESHOLD = 256 * 1024
ARENA_MAX = 2
TRIM_THRESHOLD = 1024 * 1024
# the mallopt settings: name -> (mallopt parameter, value)
SETTINGS = {
    "mmap_threshold": (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
    "arena_max": (M_ARENA_MAX, ARENA_MAX),
    "trim_threshold": (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
}
TRIM = "trim"  # not a mallopt setting: `malloc_trim` when a request ends
NAMES = (*SETTINGS, TRIM)


def parse_tuning(text: str) -> tuple[str, ...]:
    """`off`, `all`, or a comma list of NAMES -> the names, in NAMES order."""
    text = text.strip().lower()
    if text in ("off", "none", ""):
        return ()
    if text == "all":
        return NAMES
    names = {n.strip() for n in text.split(",") if n.strip()}
    unknown = sorted(names - set(NAMES))
    if unknown:
        raise TokensiftError(
            f"malloc_tuning: unknown setting(s) {', '.join(unknown)}; use off, all or a comma list of "
            f"{', '.join(NAMES)}"
        )
    return tuple(n for n in NAMES if n in names)


def _glibc() -> Any | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()
_lock = threading.Lock()
_last_trim = 0.0


def tune_malloc(names: tuple[str, ...] = NAMES) -> dict[str, Any]:
    """Apply the named settings (see NAMES); what was applied (`applied` False when none was asked
    for, off glibc, or if mallopt refused)."""
    if not names:
        return {"applied": False, "reason": "off"}
    if _LIBC is None:
        return {"applied": False, "reason": "not glibc"}
    chosen = {name: SETTINGS[name] for name in names if name in SETTINGS}
    ok = all(_LIBC.mallopt(param, value) == 1 for param, value in chosen.values())
    values = {name: value for name, (_, value) in chosen.items()}
    return {
        "applied": ok,
        "glibc": _LIBC.gnu_get_libc_version().decode(),
        "settings": list(names),
        **values,
    }


def trim(min_interval: float = 0.5) -> bool:
    """Return free heap pages to the system; at most once per `min_interval` seconds. True if run."""
    global _last_trim
    if _LIBC is None:
        return False
    now = time.monotonic()
    with _lock:
        if now - _last_trim < min_interval:
            return False
        _last_trim = now
    _LIBC.malloc_trim(0)
    return True


def release() -> bool:
    """Collect whatever sits in reference cycles, then `trim` at once: what a long run does between
    units of work (the bench after every cell). True if the trim ran."""
    gc.collect()
    return trim(min_interval=0)
