"""Keep a long-running server's resident memory steady under glibc malloc.

A server prefills prompts of many lengths on several worker threads. glibc serves each thread from
its own arena and, once a large block has been freed, raises its mmap threshold (up to 32 MiB), so
later prompt-sized tensors come from the arenas' heaps instead of fresh mappings. Freed heap
memory is returned to the system only from the top of a heap, so the process's RSS climbs with
every new mix of sizes although no object outlives its request (benchmarks/serve_load.py measured
+92% over a 170 s mixed load with glibc's defaults).

`tune_malloc` fixes the mmap threshold (blocks above it are mapped and unmapped with each tensor,
which also turns off the dynamic raise) and caps the number of arenas; `trim` hands free pages
back (`malloc_trim`), called by the server when a request ends. Both are no-ops off glibc. The
server applies them only with `--malloc-tuning` (off by default): benchmarks/serve_malloc.py
measured rounds 1.47x slower with them, for half the RSS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from typing import Any

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MMAP_THRESHOLD = 256 * 1024
ARENA_MAX = 2
TRIM_THRESHOLD = 1024 * 1024
# what tune_malloc sets: name -> (mallopt parameter, value)
SETTINGS = {
    "mmap_threshold": (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
    "arena_max": (M_ARENA_MAX, ARENA_MAX),
    "trim_threshold": (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
}


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


def tune_malloc() -> dict[str, Any]:
    """Apply the settings above; what was applied (`applied` False off glibc or if mallopt refused)."""
    if _LIBC is None:
        return {"applied": False, "reason": "not glibc"}
    ok = all(_LIBC.mallopt(param, value) == 1 for param, value in SETTINGS.values())
    values = {name: value for name, (_, value) in SETTINGS.items()}
    return {"applied": ok, "glibc": _LIBC.gnu_get_libc_version().decode(), **values}


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
