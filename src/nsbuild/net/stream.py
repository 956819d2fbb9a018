"""A socket with a read buffer, for the egress proxy: heads and chunk lines are
parsed from the buffer, bodies are copied through by exact counts.

Exact counts are what keep a kept-alive connection in step: a body ends where
its framing says, and whatever follows stays in the buffer as the start of
the next message, to be parsed and decided on its own.

Bodies are copied through a large user-space buffer, one per relaying thread
(a client connection's, a tunnel's second one; server connections waiting in
the pool hold none). Measured on loopback (bench/egress, 2 CPUs shared by
server, proxy and client, quiet machine), the size matters: with 4 MiB reads
and writes the proxied path costs 0.49-0.50 CPU-seconds per GB (a direct
download 0.46-0.47), with 1 MiB 0.69 — the proxy then wakes three times as
often and moves less each time. splice(2) costs the proxy itself less but
passes on the server's page-sized pieces, which the receiver reads more
slowly. One loop serves every body: Content-Length, chunked, to EOF,
tunnels.

How many connections copy at once is the sandbox's choice, so the large
buffers are shared: at most BIG_BUFFERS in the whole process, each taken
for one read and write and given back, and taken only once the socket is
readable (an idle connection or tunnel holds none). A copy that finds none
free uses its thread's small one: slower, and bounded.
"""

from __future__ import annotations

import mmap
import select
import socket
import threading

from nsbuild.net.httphead import MAX_HEAD, BadRequest, chunk_size

COPY_BUF = 4 * 1024 * 1024  # see above; 2 MiB gained nothing, 8 and 16 MiB no more than 4
BIG_BUFFERS = 6  # COPY_BUF buffers in the process, at most
SMALL_BUF = 64 * 1024  # a thread's own, when every big one is taken
MAX_LINE = 4096  # a chunk-size or trailer line


class _Buffers:
    """The shared copy buffers: take() one, give() it back after one write."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[memoryview] = []
        self._made = 0
        self._small = threading.local()

    def take(self) -> memoryview:
        with self._lock:
            if self._free:
                return self._free.pop()
            make = self._made < BIG_BUFFERS
            self._made += make
        if make:
            # Anonymous memory, not a bytearray (which fills all 4 MiB with
            # zeros): a page costs memory only once a read was that long.
            return memoryview(mmap.mmap(-1, COPY_BUF))
        small: memoryview | None = getattr(self._small, "buf", None)
        if small is None:
            small = self._small.buf = memoryview(bytearray(SMALL_BUF))
        return small

    def give(self, buf: memoryview) -> None:
        if len(buf) == COPY_BUF:
            with self._lock:
                self._free.append(buf)


_buffers = _Buffers()


def _wait_readable(sock: socket.socket) -> None:
    """Block until `sock` has something to read (or EOF), as recv would,
    within the socket's timeout."""
    timeout = sock.gettimeout()
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLPRI)
    if not poller.poll(None if timeout is None else int(timeout * 1000)):
        raise TimeoutError("timed out")


class Truncated(BadRequest):
    """The peer closed in the middle of a message."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 502)


class Stream:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def read_head(self) -> bytes | None:
        """The next head without its blank line; None if the peer closed cleanly
        between messages; Truncated if it closed inside one; BadRequest (431)
        if it is too long."""
        scanned = 0
        while True:
            end = self.buf.find(b"\r\n\r\n", max(0, scanned - 3))
            if end >= 0:
                head = bytes(self.buf[:end])
                del self.buf[: end + 4]
                return head
            if len(self.buf) > MAX_HEAD:
                raise BadRequest("head too large", 431)
            scanned = len(self.buf)
            if not self._fill():
                if not self.buf:
                    return None
                raise Truncated("the connection closed inside a head")

    def read_line(self) -> bytes:
        """One CRLF-terminated line (with the CRLF), for chunked bodies."""
        scanned = 0
        while True:
            end = self.buf.find(b"\r\n", max(0, scanned - 1))
            if end >= 0:
                line = bytes(self.buf[: end + 2])
                del self.buf[: end + 2]
                return line
            if len(self.buf) > MAX_LINE:
                raise BadRequest("overlong line in a chunked body", 502)
            scanned = len(self.buf)
            if not self._fill():
                raise Truncated("the connection closed inside a chunked body")

    def copy_to(self, dst: socket.socket, n: int | None, prefix: bytes = b"") -> int:
        """Send exactly `n` bytes of this stream to dst (None: up to EOF), after
        `prefix` (a head: one write with what is buffered, not two small ones).
        Returns the count without the prefix; Truncated if the stream ends early."""
        total = 0
        if self.buf or prefix:
            part = self.buf if n is None else self.buf[:n]
            dst.sendall(prefix + part)
            total = len(part)
            del self.buf[:total]
        if n is not None and total == n:
            return total
        recv_into, sendall = self.sock.recv_into, dst.sendall
        while n is None or total < n:
            view = _buffers.take()
            try:
                want = len(view) if n is None else min(len(view), n - total)
                try:
                    got = recv_into(view, want, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    got = -1  # nothing yet: wait without holding the buffer
                if got > 0:
                    sendall(view[:got])
            finally:
                _buffers.give(view)
            if got < 0:
                _wait_readable(self.sock)
                continue
            if not got:
                if n is None:
                    return total
                raise Truncated("the connection closed inside a body")
            total += got
        return total

    def copy_chunked(self, dst: socket.socket) -> int:
        """Relay a chunked body as it is, up to its last chunk and trailers."""
        total = 0
        while True:
            line = self.read_line()
            size = chunk_size(line)
            dst.sendall(line)
            total += len(line)
            if size == 0:
                break
            total += self.copy_to(dst, size)
            end = self.read_line()
            if end != b"\r\n":
                raise BadRequest("malformed chunk in the response", 502)
            dst.sendall(end)
            total += 2
        while True:  # trailer fields, then the empty line
            line = self.read_line()
            dst.sendall(line)
            total += len(line)
            if line == b"\r\n":
                return total
