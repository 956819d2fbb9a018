"""Kept-alive connections from the egress proxy to servers, reused per
(address, port).

The key is the checked address the proxy connected to, never a name: two
allowed names served from one address may share a connection (each request
carries its own Host), and a connection never outlives the decision that
made it, because every request is decided before it takes one.

A connection goes back to the pool only when the response before it ended
exactly where its framing said and nothing more arrived; one that waited too
long, or that the server closed or wrote to while idle, is discarded.

The sandbox chooses how many addresses its requests go to (the names under a
wildcard have whatever addresses their DNS gives), so the pool keeps
MAX_IDLE connections in all: one more closes the one idle longest.
"""

from __future__ import annotations

import select
import socket
import threading
import time

from nsbuild.net.allowlist import IPAddress
from nsbuild.net.stream import Stream

CONNECT_TIMEOUT = 30.0
IDLE_SECONDS = 30.0  # below the keep-alive timeouts of common servers
MAX_IDLE_PER_KEY = 8
MAX_IDLE = 32  # in all: each is a descriptor of nsbuild's own

Key = tuple[str, int]


class Upstream(Stream):
    def __init__(self, sock: socket.socket, key: Key) -> None:
        super().__init__(sock)
        self.key = key
        self.reused = False
        self.idle_since = 0.0


def _still_usable(up: Upstream, now: float) -> bool:
    if now - up.idle_since > IDLE_SECONDS or up.buf:
        return False
    # Readable while idle means the server closed it or sent something unasked.
    poller = select.poll()
    poller.register(up.sock, select.POLLIN | select.POLLERR | select.POLLHUP)
    return not poller.poll(0)


class UpstreamPool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[Key, list[Upstream]] = {}
        self._closed = False

    def get(self, addrs: list[IPAddress], port: int) -> Upstream:
        """A kept-alive connection to one of `addrs` if there is a usable one,
        else a new connection (trying the addresses in order); OSError if none
        can be made."""
        now = time.monotonic()
        for addr in addrs:
            key = (str(addr), port)
            while True:
                with self._lock:
                    idle = self._idle.get(key)
                    up = idle.pop() if idle else None
                    if idle == []:
                        del self._idle[key]  # no empty lists: keys are the sandbox's choice
                if up is None:
                    break
                if _still_usable(up, now):
                    up.reused = True
                    return up
                up.sock.close()
        return self.connect(addrs, port)

    def connect(self, addrs: list[IPAddress], port: int) -> Upstream:
        last: OSError | None = None
        for addr in addrs:
            family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            s.settimeout(CONNECT_TIMEOUT)
            try:
                s.connect((str(addr), port))
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return Upstream(s, (str(addr), port))
            except OSError as e:
                s.close()
                last = e
        assert last is not None
        raise last

    def put(self, up: Upstream) -> None:
        """Keep `up` for another request (its response ended cleanly)."""
        up.idle_since = time.monotonic()
        oldest: Upstream | None = None
        with self._lock:
            idle = self._idle.get(up.key, [])
            if self._closed or up.buf or len(idle) >= MAX_IDLE_PER_KEY:
                up.sock.close()
                return
            idle.append(up)
            self._idle[up.key] = idle
            if sum(map(len, self._idle.values())) > MAX_IDLE:
                oldest = self._take_oldest()
        if oldest is not None:
            oldest.sock.close()

    def _take_oldest(self) -> Upstream:
        """Remove the connection idle longest (each key's list is oldest first)."""
        key = min((k for k, ups in self._idle.items() if ups),
                  key=lambda k: self._idle[k][0].idle_since)
        oldest = self._idle[key].pop(0)
        if not self._idle[key]:
            del self._idle[key]
        return oldest

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle = [up for ups in self._idle.values() for up in ups]
            self._idle.clear()
        for up in idle:
            up.sock.close()
