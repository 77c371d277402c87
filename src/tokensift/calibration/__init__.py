"""Offline calibration: per-model artefacts some methods need (searched once, shipped as JSON).

Each calibrator lives in its own module of this package and exposes `CALIBRATOR`; they are found
by discovery, so `tokensift calibrate NAME` lists every one. Artefacts for the embedded models ship
in `calibration/data/<method>/<model>.json`; artefacts a user builds go to the cache directory and
take precedence. A method whose artefact is missing fails with an error naming the command.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import pkgutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from tokensift.errors import TokensiftError, check_out_dir
from tokensift.models import Model, cache_dir

ARTEFACT_FORMAT = 1


@dataclass(frozen=True)
class Calibrator:
    """A named offline search: `add_arguments` extends its CLI parser, `run` returns the artefact payload."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[Model, argparse.Namespace], dict[str, Any]]
    keys: tuple[str, ...] = ()  # the payload entries its method reads: an artefact without one is corrupt


def calibrators() -> dict[str, Calibrator]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        calibrator = getattr(module, "CALIBRATOR", None)
        if isinstance(calibrator, Calibrator):
            found[calibrator.name] = calibrator
    return dict(sorted(found.items()))


# Dtypes a float32 artefact also serves: the same weights loaded in them are its weights rounded.
ROUNDED_DTYPES = (torch.bfloat16, torch.float16)


def _first_matrix(model: Model) -> torch.Tensor:
    """The weight the checksums are of: the first layer's first matrix."""
    return next(p for n, p in model.model.named_parameters() if "layers.0." in n and p.dim() == 2)


def _checksum(weight: torch.Tensor) -> str:
    return hashlib.sha256(weight.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def fingerprint(model: Model) -> dict[str, Any]:
    """Identifies the weights an artefact was computed on: name, GGUF hash, shape and a checksum of
    the first layer's first matrix as loaded. A float32 model also records the checksums the same
    weights give loaded in bfloat16 and float16 (`weights_checksums`), so one calibration serves
    every dtype of the same weights."""
    first = _first_matrix(model)
    found = {
        "model": model.name,
        "sha256": model.sha256,
        "layers": model.num_layers,
        "kv_heads": model.num_kv_heads,
        "q_heads": int(model.config.num_attention_heads),
        "head_dim": model.head_dim,
        "weights_checksum": _checksum(first),
    }
    if first.dtype == torch.float32:
        found["weights_checksums"] = {
            str(d).removeprefix("torch."): _checksum(first.to(d)) for d in ROUNDED_DTYPES
        }
    return found


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in name)


def user_path(method: str, model_name: str) -> Path:
    return cache_dir() / "calibration" / method / f"{_slug(model_name)}.json"


def shipped_path(method: str, model_name: str) -> Path:
    return Path(str(resources.files(__name__).joinpath(f"data/{method}/{_slug(model_name)}.json")))


def save_artefact(
    method: str, model: Model, payload: dict[str, Any], command: str, out: Path | None = None
) -> Path:
    """Write an artefact atomically (fingerprint, command and versions included)."""
    import transformers

    path = out or user_path(method, model.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "format": ARTEFACT_FORMAT,
        "method": method,
        "fingerprint": fingerprint(model),
        "command": command,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        **payload,
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        json.dump(document, fh, indent=1)
    os.replace(tmp, path)
    return path


def load_artefact(method: str, model: Model, path: str | Path | None = None) -> dict[str, Any]:
    """The artefact for this model: an explicit path, else the user's, else the shipped one."""
    candidates = [Path(path)] if path else [user_path(method, model.name), shipped_path(method, model.name)]
    for candidate in candidates:
        if candidate.is_file():
            document = read_artefact(method, candidate, model.name)
            got = document["fingerprint"]
            rounded = got.get("weights_checksums")
            accepted = {got.get("weights_checksum"), *(rounded.values() if isinstance(rounded, dict) else ())}
            # Only the loaded weights' own checksum: the rounded ones are for saving.
            if got.get("layers") != model.num_layers or _checksum(_first_matrix(model)) not in accepted:
                raise TokensiftError(
                    f"{method} calibration {candidate} was made for {got.get('model')!r}, not for these "
                    f"weights ({str(model.dtype).removeprefix('torch.')}); "
                    f"run `tokensift calibrate {method} --model {model.name}`"
                )
            return document
    if path:
        raise TokensiftError(f"{method} calibration file {path} does not exist")
    raise TokensiftError(
        f"{method} needs a calibration for {model.name!r}: "
        f"run `tokensift calibrate {method} --model {model.name}`"
    )


def read_artefact(method: str, path: Path, model_name: str) -> dict[str, Any]:
    """The JSON document of a calibration file, checked for the entries `method` reads."""
    redo = f"rerun `tokensift calibrate {method} --model {model_name}` (or restore the file)"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f"line {exc.lineno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise TokensiftError(f"{method} calibration {path} is not valid JSON ({where}): {redo}") from None
    if not isinstance(document, dict):
        raise TokensiftError(f"{method} calibration {path} is not a JSON object: {redo}")
    if document.get("method", method) != method:
        raise TokensiftError(
            f"{path} is a {document['method']} calibration, not a {method} one: give a {method} file"
        )
    calibrator = calibrators().get(method)
    missing = [k for k in ("fingerprint", *(calibrator.keys if calibrator else ())) if k not in document]
    if missing or not isinstance(document["fingerprint"], dict):
        raise TokensiftError(
            f"{method} calibration {path} lacks {', '.join(missing) or 'a valid fingerprint'}: {redo}"
        )
    return document


def positive(args: argparse.Namespace, *names: str) -> None:
    """Calibration options that count something must be at least 1."""
    for name in names:
        value = getattr(args, name)
        if value < 1:
            raise TokensiftError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("calibrate", help="run a method's offline calibration for a model")
    methods = parser.add_subparsers(dest="calibrator", metavar="METHOD", required=True)
    for calibrator in calibrators().values():
        p = methods.add_parser(calibrator.name, help=calibrator.help)
        p.add_argument("--model", required=True, help="embedded model name, local directory or HF id")
        p.add_argument("--out", type=Path, help="artefact path (default: the user cache directory)")
        p.add_argument(
            "--device", default="cpu", help="cpu (default), cuda, cuda:N, or auto (cuda when torch has a GPU)"
        )
        calibrator.add_arguments(p)
        p.set_defaults(func=_run, _calibrator=calibrator)


def _run(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from tokensift.models import load

    calibrator: Calibrator = args._calibrator
    if args.out is not None and args.out.is_dir():
        raise TokensiftError(
            f"--out {args.out} is a directory: give the artefact's file name, e.g. {args.out}/x.json"
        )
    if args.out is not None:
        check_out_dir(args.out.parent, "the folder of --out")
    model = load(args.model, device=args.device)
    payload = calibrator.run(model, args)
    command = shlex.join(["tokensift", *sys.argv[1:]])
    path = save_artefact(calibrator.name, model, payload, command, args.out)
    print(f"wrote {path}")
    return 0
