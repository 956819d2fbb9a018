"""Backends: where a build runs. A registry of names, looked up at run time.

The build driver asks for a backend by name and never imports a backend
module itself; each entry names its module and factory, imported only when
that backend is opened, so adding one is a single `register()` line.

    backend = open_backend("local", BackendOptions(env="bookworm"))
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from nsbuild.backends.base import (
    STDOUT,
    Backend,
    BackendError,
    BackendOptions,
    Capabilities,
    CopyRefused,
    Network,
)

Factory = Callable[[BackendOptions], Backend]

# name -> "module:callable" (imported lazily) or the factory itself.
_REGISTRY: dict[str, str | Factory] = {
    "local": "nsbuild.backends.local:LocalBackend",
    "autopkgtest": "nsbuild.backends.autopkgtest:AutopkgtestBackend",
}


class UnknownBackend(BackendError):
    """No backend of that name is registered: a usage error."""


def register(name: str, factory: str | Factory) -> None:
    """Add a backend: a factory, or "package.module:function" to import on first use."""
    _REGISTRY[name] = factory


def names() -> list[str]:
    return sorted(_REGISTRY)


def factory(name: str) -> Factory:
    entry = _REGISTRY.get(name)
    if entry is None:
        raise UnknownBackend(f"unknown backend {name!r} (known: {', '.join(names())})")
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        found: Factory = getattr(importlib.import_module(module), attr)
        _REGISTRY[name] = found
        return found
    return entry


def open_backend(name: str, options: BackendOptions) -> Backend:
    return factory(name)(options)


__all__ = [
    "STDOUT",
    "Backend",
    "BackendError",
    "BackendOptions",
    "Capabilities",
    "CopyRefused",
    "Factory",
    "Network",
    "UnknownBackend",
    "factory",
    "names",
    "open_backend",
    "register",
]
