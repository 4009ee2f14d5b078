"""Registry of distillation methods: one module per method in this package.

Every module here is imported on first use; classes decorated with :func:`register` become
available by name. A new method is one new module (plus its config block), nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil

from kdbench.errors import KdbenchError
from kdbench.methods.base import Method

_REGISTRY: dict[str, type[Method]] = {}
_LOADED = False


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    _LOADED = True


def available() -> list[str]:
    """Registered method names, in registration order."""
    _load_all()
    return list(_REGISTRY)


def get(name: str) -> type[Method]:
    """The method class registered as ``name``."""
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KdbenchError(f"unknown method {name!r} (known: {', '.join(_REGISTRY)})") from None


__all__ = ["Method", "available", "get", "register"]
