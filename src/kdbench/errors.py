"""User-facing errors: each one is reported as a single line and a non-zero exit."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class KdbenchError(Exception):
    """A problem with the user's input (config, data, files), reported as one line."""


def one_line(exc: BaseException) -> str:
    """The exception as a single line (newlines folded)."""
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def exit_on_error(func: F) -> F:
    """Run ``func``; a KdbenchError becomes one line on stderr and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except KdbenchError as exc:
            print(f"kdbench: error: {one_line(exc)}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None

    return wrapper  # type: ignore[return-value]
