"""Name resolutions of the egress proxy, kept for the life of the proxy.

apt asks for dozens of files from one mirror; resolving the name for each
request costs a resolver round trip every time, and a lost UDP answer costs
the resolver's whole timeout (5 s by default) — measured, that was most of
the time apt spent fetching through the proxy. So a name is resolved once and
its answer reused: a run is short, the cache is bounded, and a name whose
addresses all refuse connections is forgotten so that the next request asks
again. Lookups of one name by several threads at once wait for a single
resolution. Failures are not cached.

The answer is cached as the resolver gave it; the proxy checks the addresses
(DNS rebinding) on every request all the same.
"""

from __future__ import annotations

import socket
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

Resolver = Callable[..., list[tuple[Any, ...]]]

MAX_NAMES = 256


class NameCache:
    def __init__(self, resolver: Resolver = socket.getaddrinfo, max_names: int = MAX_NAMES) -> None:
        self._resolve = resolver
        self._max = max_names
        self._lock = threading.Lock()
        self._answers: OrderedDict[str, list[tuple[Any, ...]]] = OrderedDict()
        self._pending: dict[str, threading.Lock] = {}

    def resolve(self, name: str, port: int) -> list[tuple[Any, ...]]:
        """getaddrinfo(name, ..., SOCK_STREAM) results; the port in them is not used."""
        with self._lock:
            if name in self._answers:
                return self._answers[name]
            one = self._pending.setdefault(name, threading.Lock())
        with one:
            with self._lock:
                if name in self._answers:  # resolved while we waited
                    return self._answers[name]
            try:
                infos = self._resolve(name, port, type=socket.SOCK_STREAM)
            finally:
                with self._lock:
                    self._pending.pop(name, None)
            with self._lock:
                self._answers[name] = infos
                while len(self._answers) > self._max:
                    self._answers.popitem(last=False)
            return infos

    def forget(self, name: str) -> None:
        with self._lock:
            self._answers.pop(name, None)
