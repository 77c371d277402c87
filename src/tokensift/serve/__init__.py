"""`tokensift serve`: an OpenAI-compatible server with per-request methods, a KV memory pool and
guards against outputs that never end. Needs the `serve` extra: `pip install tokensift[serve]`.

Importing this package is cheap: fastapi, uvicorn and prometheus-client load only when the command
runs or `tokensift.serve.app` is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util

from tokensift.errors import TokensiftError
from tokensift.serve.config import ServeConfig

SERVE_EXTRA = ("fastapi", "uvicorn", "prometheus_client", "pydantic")

HELP = {
    "model": "embedded model name, local directory or HF id",
    "method": "server default method NAME[:key=value,...][+NAME...]",
    "allow_methods": "comma list of method names a request may choose (default: all)",
    "host": "bind address (default loopback)",
    "dtype": "model weights dtype",
    "device": "cpu (default), cuda, cuda:N or auto (cuda when torch sees a GPU)",
    "served_model_name": "model name the API reports (default: --model)",
    "replica_id": "replica name echoed in responses (default hostname:pid)",
    "kv_pool_mib": "KV memory pool in MiB: requests reserve their plan's peak KV bytes",
    "max_queue": "requests that may wait for the pool; beyond it: 429 with Retry-After",
    "max_running": "generations running at once (worker threads)",
    "max_batch": "requests sharing a plan decoded together, one forward per step (1: batching off)",
    "max_new_tokens_cap": "largest max_tokens a request may ask for",
    "default_max_tokens": "max_tokens when a request sets none",
    "max_body_bytes": "largest request body",
    "max_stop_sequences": "most stop strings per request",
    "max_logprobs": "largest logprobs a request may ask for (0: refused)",
    "request_timeout": "wall-clock seconds per request; then finish_reason length, tokensift.stop timeout",
    "eos_guard": "end-of-sequence delay guard on/off",
    "eos_guard_after": "tokens generated before the EOS guard may act",
    "eos_guard_window": "steps the EOS probability must stay below the floor",
    "eos_guard_floor": "EOS probability floor",
    "eos_guard_entropy": "mean entropy (nats) below which the window is low-entropy (0: criterion off)",
    "eos_guard_distinct": "distinct-token share at or below which the window counts as repetitive",
    "malloc_tuning": "glibc malloc tuning: off, all, or a comma list of mmap_threshold, arena_max, "
    "trim_threshold, trim (malloc_trim after each request); a bare --malloc-tuning means all",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible server with per-request methods (extra: serve)")
    for f in dataclasses.fields(ServeConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.name == "allow_methods":
            p.add_argument(flag, default=None, help=HELP[f.name])
        elif f.name == "malloc_tuning":
            text = f"{HELP[f.name]} (default {default})"
            p.add_argument(flag, nargs="?", const="all", default=default, help=text)
        elif isinstance(default, bool):
            p.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=HELP.get(f.name)
            )
        elif f.name == "port":
            p.add_argument(flag, type=int, default=default, help="port (default 8000)")
        else:
            kind = type(default) if default is not None else str
            text = HELP.get(f.name, "")
            p.add_argument(flag, type=kind, default=default, help=f"{text} (default {default})")
    p.add_argument("--log-level", default="info", help="uvicorn log level")
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="serve replicas with Ray Serve (needs tokensift[ray]): no ADDRESS starts a local Ray "
        "instance, 'auto' or ray://HOST:PORT joins a cluster",
    )
    p.add_argument("--replicas", type=int, help="Ray Serve replicas, each with its own model and KV pool")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig) if hasattr(args, f.name)}
    if values.get("allow_methods") is not None:
        values["allow_methods"] = [m.strip() for m in values["allow_methods"].split(",") if m.strip()]
    return ServeConfig(**values)


def require_extra() -> None:
    missing = [m for m in SERVE_EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        raise TokensiftError(f"tokensift serve needs {', '.join(missing)}: pip install 'tokensift[serve]'")


def run(args: argparse.Namespace) -> int:
    require_extra()
    config = config_from_args(args)
    from tokensift.methods import REGISTRY
    from tokensift.serve.engine import parse_plan

    for name in config.allow_methods or []:
        if name not in REGISTRY and name != "dense":
            raise TokensiftError(f"--allow-methods: unknown method {name!r}")
    try:
        parse_plan(config.method, None)
    except Exception as exc:
        raise TokensiftError(f"--method: {str(exc).removeprefix('tokensift.method: ')}") from None

    if getattr(args, "ray", None) is not None:
        from tokensift.serve.ray_serve import serve_on_ray

        return serve_on_ray(config, args.ray or None, args.replicas or 1)
    if getattr(args, "replicas", None) is not None:
        raise TokensiftError("--replicas needs --ray")
    import uvicorn

    from tokensift.serve.app import create_app

    app = create_app(config)
    print(f"tokensift serve: {config.model_name} on http://{config.host}:{config.port}/v1", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level=args.log_level)
    return 0
