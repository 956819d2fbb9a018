"""The rootless egress engine: an HTTP forward proxy with CONNECT, host side.

It accepts on a listening socket that lives in the sandbox's network
namespace (handed over by the runtime) and connects out from the host's
namespace, so it is the only way out of the sandbox. Each request is decided
on the request line alone:

1. the target (absolute http:// URL, or HOST:PORT for CONNECT) is parsed
   strictly (`httphead`); the Host header is never trusted;
2. host and port must match an allowlist rule;
3. a name is resolved here, on the host, once; addresses a name must not
   resolve to (loopback, link-local, ...) are dropped (DNS rebinding), and
   the connection goes to an address that was checked, never re-resolved.

A refusal is a 403 whose body names the rule that refused it, and a record in
the network log. One thread per client connection; each forwarded request
uses its own upstream connection (`Connection: close`), so nothing sent after
a request's declared body ever reaches a server (no smuggling).
"""

from __future__ import annotations

import _socket
import errno
import socket
import threading
from collections.abc import Callable
from typing import Any

from nsbuild.net.allowlist import Allowlist, AllowRule, IPAddress, address_refusal
from nsbuild.net.httphead import (
    REASONS,
    BadRequest,
    Request,
    error_response,
    parse_request,
    response_head,
    split_head,
    upstream_head,
)
from nsbuild.net.netlog import NetLog

BUF = 256 * 1024
PIPE_SIZE = 1024 * 1024
HEAD_TIMEOUT = 60.0
CONNECT_TIMEOUT = 30.0

Resolver = Callable[..., list[tuple[Any, ...]]]


class Denied(Exception):
    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


class EgressProxy:
    def __init__(
        self,
        listener: socket.socket | _socket.socket,
        allowlist: Allowlist,
        log: NetLog,
        resolver: Resolver = socket.getaddrinfo,
    ) -> None:
        if not isinstance(listener, socket.socket):  # as the runtime hands it over
            listener = socket.socket(fileno=listener.detach())
        self._listener = listener
        self._allowlist = allowlist
        self._log = log
        self._resolve = resolver
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._stopping = False
        self._thread = threading.Thread(target=self._accept_loop, name="nsbuild-proxy", daemon=True)

    # -- life cycle -------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        self._thread.join(timeout=2.0)
        self._listener.close()
        with self._lock:
            open_socks = list(self._open)
        for s in open_socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _track(self, s: socket.socket) -> socket.socket:
        with self._lock:
            self._open.add(s)
        return s

    def _close(self, s: socket.socket | None) -> None:
        if s is None:
            return
        with self._lock:
            self._open.discard(s)
        s.close()

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._stopping:
                client.close()
                return
            self._track(client)
            threading.Thread(target=self._serve_client, args=(client,), daemon=True).start()

    # -- one client connection -------------------------------------------

    def _serve_client(self, client: socket.socket) -> None:
        upstream = None
        try:
            client.settimeout(HEAD_TIMEOUT)
            head, rest = self._read_head(client)
            try:
                req = parse_request(head)
            except BadRequest as e:
                self._refuse(client, e.status, f"nsbuild egress proxy: {e}\n")
                self._log.add(
                    engine="proxy",
                    kind="invalid",
                    host="",
                    port=0,
                    decision="deny",
                    rule="malformed request",
                    reason=str(e),
                )
                return
            try:
                rule, addrs = self._decide(req)
            except Denied as e:
                self._refuse(client, 403, f"nsbuild egress proxy: {e}\nrefused by rule: {e.rule}\n")
                self._log.add(
                    engine="proxy",
                    kind=req.method,
                    host=req.host_text,
                    port=req.port,
                    decision="deny",
                    rule=e.rule,
                )
                return
            try:
                upstream = self._track(self._connect(addrs, req.port))
            except OSError as e:
                self._refuse(
                    client,
                    502,
                    f"nsbuild egress proxy: cannot connect to "
                    f"{req.host_text}:{req.port}: {e.strerror or e}\n",
                )
                self._log.add(
                    engine="proxy",
                    kind=req.method,
                    host=req.host_text,
                    port=req.port,
                    decision="allow",
                    rule=rule.describe(),
                    error=str(e.strerror or e),
                )
                return
            client.settimeout(None)
            upstream.settimeout(None)
            if req.is_connect:
                out_n, in_n, status = self._tunnel(client, upstream, rest)
            else:
                out_n, in_n, status = self._forward(client, upstream, req, rest)
            self._log.add(
                engine="proxy",
                kind=req.method,
                host=req.host_text,
                port=req.port,
                decision="allow",
                rule=rule.describe(),
                bytes_out=out_n,
                bytes_in=in_n,
                status=status,
            )
        except (OSError, BadRequest):
            pass
        finally:
            self._close(upstream)
            self._close(client)

    def _read_head(self, client: socket.socket) -> tuple[bytes, bytes]:
        buf = b""
        while True:
            parts = split_head(buf)
            if parts is not None:
                return parts
            chunk = client.recv(65536)
            if not chunk:
                raise BadRequest("client closed before the request head ended")
            buf += chunk

    def _refuse(self, client: socket.socket, status: int, body: str) -> None:
        try:
            client.sendall(error_response(status, REASONS.get(status, "Error"), body))
        except OSError:
            pass

    def _decide(self, req: Request) -> tuple[AllowRule, list[IPAddress]]:
        import ipaddress

        rule = self._allowlist.match(req.host, req.port)
        if rule is None:
            raise Denied(
                "default deny",
                f"{req.host_text}:{req.port} is not in the allowlist "
                f"({self._allowlist.describe()})",
            )
        if not isinstance(req.host, str):
            return rule, [req.host]
        try:
            infos = self._resolve(req.host, req.port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise Denied(rule.describe(), f"cannot resolve {req.host}: {e}") from None
        allowed: list[IPAddress] = []
        refused: list[str] = []
        for info in infos:
            addr = ipaddress.ip_address(info[4][0].split("%")[0])
            why = address_refusal(addr)
            if why is None:
                if addr not in allowed:
                    allowed.append(addr)
            else:
                refused.append(f"{why} ({addr})")
        if not allowed:
            raise Denied(
                "names may not resolve to internal addresses",
                f"{req.host} {'; '.join(refused) or 'has no address'}; only a literal address "
                "in --allow can reach such an address",
            )
        return rule, allowed

    def _connect(self, addrs: list[IPAddress], port: int) -> socket.socket:
        last: OSError | None = None
        for addr in addrs:
            family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            s.settimeout(CONNECT_TIMEOUT)
            try:
                s.connect((str(addr), port))
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return s
            except OSError as e:
                s.close()
                last = e
        assert last is not None
        raise last

    # -- relaying ---------------------------------------------------------

    def _tunnel(
        self, client: socket.socket, upstream: socket.socket, early: bytes
    ) -> tuple[int, int, int]:
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        counts = [len(early), 0]
        if early:
            upstream.sendall(early)

        def up() -> None:
            counts[0] += pump(client, upstream)

        t = threading.Thread(target=up, daemon=True)
        t.start()
        counts[1] = pump(upstream, client)
        t.join()
        return counts[0], counts[1], 200

    def _forward(
        self, client: socket.socket, upstream: socket.socket, req: Request, rest: bytes
    ) -> tuple[int, int, int]:
        head = upstream_head(req)
        body = rest[: req.content_length]
        upstream.sendall(head + body)
        sent = len(head) + len(body)
        remaining = req.content_length - len(body)
        while remaining > 0:
            chunk = client.recv(min(BUF, remaining))
            if not chunk:
                break
            upstream.sendall(chunk)
            sent += len(chunk)
            remaining -= len(chunk)
        # Whatever the client sends after the declared body is never read.
        buf = b""
        try:
            while True:
                try:
                    chunk = upstream.recv(65536)
                except OSError as e:
                    # A server that hangs up with our request unread resets the
                    # connection: for the client that is the same missing answer.
                    raise BadRequest(f"the server reset the connection ({e.strerror})",
                                     502) from None
                if not chunk:
                    raise BadRequest("the server closed without a response", 502)
                buf += chunk
                parts = split_head(buf)
                if parts is not None:
                    break
            status, client_head = response_head(parts[0])
        except BadRequest as e:
            self._refuse(client, 502, f"nsbuild egress proxy: {req.host_text}:{req.port}: {e}\n")
            return sent, len(buf), 502
        client.sendall(client_head + parts[1])
        received = len(buf)
        received += pump(upstream, client, shutdown=False)
        return sent, received, status


def pump(src: socket.socket, dst: socket.socket, shutdown: bool = True) -> int:
    """Copy src to dst until EOF; then half-close dst. Returns the bytes copied.

    Zero-copy with splice(2) through a pipe (the bytes never enter Python);
    a plain copy loop where splice is refused."""
    try:
        total = _splice_pump(src, dst)
    except OSError:
        total = 0
    if shutdown:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    return total


def _splice_pump(src: socket.socket, dst: socket.socket) -> int:
    import fcntl
    import os

    total = 0
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass
        sfd, dfd = src.fileno(), dst.fileno()
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_MORE
        while True:
            try:
                n = os.splice(sfd, w, PIPE_SIZE, flags=flags)
            except OSError as e:
                if e.errno == errno.EINVAL and total == 0:
                    return _copy_pump(src, dst)
                raise
            if n == 0:
                return total
            left = n
            while left:
                left -= os.splice(r, dfd, left, flags=flags)
            total += n
    finally:
        os.close(r)
        os.close(w)


def _copy_pump(src: socket.socket, dst: socket.socket) -> int:
    total = 0
    buf = bytearray(BUF)
    view = memoryview(buf)
    while True:
        n = src.recv_into(buf)
        if not n:
            return total
        dst.sendall(view[:n])
        total += n
