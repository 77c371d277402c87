"""Errors and warnings that tokensift raises: each message is one line naming the problem."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn


class TokensiftError(ValueError):
    """A user-facing error: bad input, unknown names, unsupported models. The CLI prints it as one line."""


class NoOpWarning(UserWarning):
    """A method was asked for but changed nothing (budget covers the prompt, prompt shorter than a window)."""


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def fail(message: str) -> NoReturn:
    """For the benchmark scripts: bad input as one line on stderr ("error: ..."), exit status 2."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    raise SystemExit(2)


def check_out_dir(path: Path, flag: str = "--out") -> None:
    """Fail before any work when an output directory cannot be created: it, or the nearest existing
    folder above it, is a file."""
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                what = "is a file" if existing == path else f"lies under {existing}, which is a file"
                raise TokensiftError(f"{flag} {path} {what}: give a directory to write into")
            return
