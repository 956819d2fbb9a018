"""Local servers for the network tests: every one listens on 127.0.0.1 only.

Named uniquely (not `helpers.py`): tests import it by module name (pyproject's
pytest pythonpath).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from nsbuild.net.allowlist import Allowlist
from nsbuild.net.netlog import NetLog
from nsbuild.net.proxy import EgressProxy


def pattern(n: int) -> bytes:
    """n bytes that are not all alike, so a misplaced byte shows."""
    return bytes(i * 7 % 251 for i in range(n))


class OriginServer:
    """An HTTP/1.1 server on 127.0.0.1 that answers `NAME PATH`, keeps connections
    alive, records requests and counts the connections it accepted.

    Paths: /big/N (N bytes of x), /chunked/N (pattern(N) in chunks), /te-and-cl/N
    (the same, with a Content-Length too), /close/N
    (pattern(N), no length: the body ends when the server closes), /drop (an
    answer, then the connection closed without a word). A request body is
    never read (as some servers do): only closing the connection keeps it from
    being read as the next request."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Host header)
        self.connections = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                server.connections += 1
                super().setup()

            def do_GET(self) -> None:
                server.requests.append((self.command, self.path, self.headers.get("Host", "")))
                body = f"{server.name} {self.path}\n".encode()
                if self.path.startswith("/big/"):
                    body = b"x" * int(self.path.split("/")[2])
                if self.path.startswith("/chunked/"):
                    return self._chunked(pattern(int(self.path.split("/")[2])))
                if self.path.startswith("/te-and-cl/"):  # contradictory framing
                    return self._chunked(pattern(int(self.path.split("/")[2])), length=5)
                self.send_response(200)
                if self.path.startswith("/close/"):
                    self.close_connection = True
                    self.end_headers()
                    self.wfile.write(pattern(int(self.path.split("/")[2])))
                    return
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                if self.path == "/drop":
                    self.close_connection = True

            def _chunked(self, body: bytes, length: int | None = None) -> None:
                self.send_response(200)
                if length is not None:
                    self.send_header("Content-Length", str(length))
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i in range(0, len(body), 1000):
                    part = body[i : i + 1000]
                    self.wfile.write(b"%x;ext=1\r\n%s\r\n" % (len(part), part))
                self.wfile.write(b"0\r\nX-Trailer: done\r\n\r\n")

            do_POST = do_HEAD = do_GET

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextmanager
def origin(name: str) -> Iterator[OriginServer]:
    server = OriginServer(name)
    try:
        yield server
    finally:
        server.close()


@contextmanager
def running_proxy(entries: list[str]) -> Iterator[tuple[int, NetLog]]:
    """An EgressProxy on a listening socket of our own (as the runtime would hand
    over from inside a sandbox); yields its port and its log."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    log = NetLog()
    proxy = EgressProxy(listener, Allowlist.parse(entries), log)
    proxy.start()
    try:
        yield listener.getsockname()[1], log
    finally:
        proxy.stop()


def exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes to the proxy, half-close, return everything it answers."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@contextmanager
def static_server(directory: str) -> Iterator[int]:
    """Serve `directory` over HTTP on 127.0.0.1; yields the port."""
    from functools import partial
    from http.server import SimpleHTTPRequestHandler

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    with serving(partial(Quiet, directory=directory)) as port:
        yield port


@contextmanager
def serving(handler: Any) -> Iterator[int]:
    """A threading HTTP server on 127.0.0.1 with request handler `handler`
    (a class or factory); yields the port."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
