"""Backends: where a build runs. A registry of names, looked up at run time.

The build driver asks for a backend by name and never imports a backend
module itself; each entry names its module and class, imported only when
that backend is opened, so adding one is a single line in _REGISTRY.

    backend = open_backend("local", BackendOptions(env="bookworm"))
"""

from __future__ import annotations

import importlib

from nsbuild.backends.base import (
    STDOUT,
    Backend,
    BackendOptions,
    Capabilities,
    Network,
)
from nsbuild.backends.errors import BackendError, CopyRefused

# name -> "module:class", the class taking the BackendOptions.
_REGISTRY = {
    "local": "nsbuild.backends.local:LocalBackend",
    "autopkgtest": "nsbuild.backends.autopkgtest:AutopkgtestBackend",
}


class UnknownBackend(BackendError):
    """No backend of that name is registered: a usage error."""


def open_backend(name: str, options: BackendOptions) -> Backend:
    entry = _REGISTRY.get(name)
    if entry is None:
        raise UnknownBackend(f"unknown backend {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    module, _, cls = entry.partition(":")
    backend: Backend = getattr(importlib.import_module(module), cls)(options)
    return backend


__all__ = [
    "STDOUT",
    "Backend",
    "BackendError",
    "BackendOptions",
    "Capabilities",
    "CopyRefused",
    "Network",
    "UnknownBackend",
    "open_backend",
]
