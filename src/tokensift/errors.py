"""Errors and warnings that tokensift raises: each message is one line naming the problem."""

from __future__ import annotations


class TokensiftError(ValueError):
    """A user-facing error: bad input, unknown names, unsupported models. The CLI prints it as one line."""


class NoOpWarning(UserWarning):
    """A method was asked for but changed nothing (budget covers the prompt, prompt shorter than a window)."""


def one_line(message: str) -> str:
    return " ".join(str(message).split())
