"""User-facing errors: each one is reported as a single line and a non-zero exit."""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class KdbenchError(Exception):
    """A problem with the user's input (config, data, files), reported as one line."""


class Terminated(BaseException):  # noqa: N818 - named after the signal, as KeyboardInterrupt is
    """SIGTERM, raised in the main thread by :func:`sigterm_raises`.

    A BaseException, as KeyboardInterrupt is: no ``except Exception`` on the way (a fallback
    that turns a speed-up off, say) takes it for a failure and goes on."""


def _raise_terminated(signum: int, frame: Any) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
    raise Terminated(f"stopped by {signal.Signals(signum).name}")


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Meanwhile the first SIGTERM (a batch system's time limit or cancellation, a ``kill``)
    raises :class:`Terminated` in the main thread instead of ending the process where it is,
    so that ``finally`` blocks and context managers run: a training run's last state, which
    ``kdbench.io.StateWriter`` may still be writing, lands on disk before the process exits.
    A second SIGTERM ends it at once. Outside the main thread it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
