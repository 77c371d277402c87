"""`tokensift serve --ray`: the same FastAPI app as `tokensift serve`, as N Ray Serve replicas.

Each replica builds its own app from the ServeConfig when it starts (`__serve_build_asgi_app__`),
so it loads its own model and holds its own KV pool, admission limits and metrics; Ray Serve's
proxy spreads requests over the replicas. A replica admits at most `max_running + max_queue`
requests at once, the number its own pool would admit before it answers 429 itself, so the
limits of a single server hold per replica. Every response names the replica that answered
(`tokensift.replica`: the replica id, else the host name, then Ray Serve's replica tag).

Imported only for `tokensift serve --ray`: nothing else in tokensift imports Ray.
"""

from __future__ import annotations

import dataclasses
import signal
import socket
import time
from typing import Any

from tokensift.errors import TokensiftError
from tokensift.serve.config import ServeConfig

try:
    from ray import serve
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise TokensiftError("--ray needs Ray Serve: pip install 'tokensift[ray]'") from exc

from tokensift.bench.ray_executor import connect

APP_NAME = "tokensift"


@serve.ingress()
class TokensiftReplica:
    """One replica: builds `create_app(config)` (its own model and KV pool) on its Ray worker."""

    def __init__(self, config: ServeConfig) -> None:
        tag = serve.get_replica_context().replica_tag
        self.config = dataclasses.replace(
            config, replica_id=f"{config.replica_id or socket.gethostname()}/{tag}"
        )

    def __serve_build_asgi_app__(self) -> Any:
        from tokensift.serve.app import create_app

        return create_app(self.config)


def deploy(config: ServeConfig, replicas: int = 1, cpus_per_replica: float = 1.0) -> str:
    """Deploy `replicas` copies of the app on the Ray this process has joined (see `connect`);
    returns the base URL once every replica has loaded its model."""
    if replicas < 1:
        raise TokensiftError(f"--replicas must be >= 1, got {replicas}")
    deployment = serve.deployment(
        TokensiftReplica,
        name="tokensift-serve",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica},
        max_ongoing_requests=config.max_running + config.max_queue,
    )
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(deployment.bind(config), name=APP_NAME, route_prefix="/")
    return f"http://{config.host}:{config.port}"


def serve_on_ray(config: ServeConfig, address: str | None, replicas: int) -> int:
    """The blocking `tokensift serve --ray` command: serve until interrupted, then tear down."""

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM tears down like Ctrl-C: replicas, Serve, then Ray

    started = connect(address)
    try:
        url = deploy(config, replicas)
        signal.signal(signal.SIGTERM, stop)  # after ray.init, which installs its own handler
        print(f"tokensift serve: {config.model_name} on {url}/v1 ({replicas} Ray Serve replicas)", flush=True)
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        if started:
            import ray

            ray.shutdown()
