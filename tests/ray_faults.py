"""Fault injection for the Ray bench executor (tests/test_ray_bench.py, benchmarks/ray_scaling.py)."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import ray

from tokensift.bench.ray_executor import WORKER_PREFIX


def kill_busy_workers(finished: threading.Event, killed: list[dict[str, Any]], timeout: float = 300) -> None:
    """End the first bench worker seen running a cell with ray.kill, then the next one seen running
    a cell with SIGKILL to its process; each kill is appended to `killed` (its info() and how)."""
    deadline = time.monotonic() + timeout
    while len(killed) < 2 and time.monotonic() < deadline and not finished.is_set():
        for name in ray.util.list_named_actors():
            if not name.startswith(WORKER_PREFIX) or any(k["name"] == name for k in killed):
                continue
            try:
                handle = ray.get_actor(name)
                # A short wait: a worker still starting (loading the model) must not hold the scan up
                # while the other worker finishes the remaining cells unseen.
                info = ray.get(handle.info.remote(), timeout=0.1)
            except (ray.exceptions.RayError, ValueError):
                continue
            if info["cell"] is None:
                continue
            how = "ray.kill" if not killed else "SIGKILL"
            if how == "ray.kill":
                ray.kill(handle)
            else:
                os.kill(info["pid"], signal.SIGKILL)
            killed.append({**info, "name": name, "how": how})
            break
        time.sleep(0.01)
