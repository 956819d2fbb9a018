"""The rootless egress engine: an HTTP forward proxy with CONNECT, host side.

It accepts on a listening socket that lives in the sandbox's network
namespace (handed over by the runtime) and connects out from the host's
namespace, so it is the only way out of the sandbox. Each request is decided
on its request line alone, one by one also when many come on one connection:

1. the target (absolute http:// URL, or HOST:PORT for CONNECT) is parsed
   strictly (`httphead`); the Host header is never trusted;
2. host and port must match an allowlist rule;
3. a name is resolved here, on the host (`namecache`: once for the life of
   the proxy); addresses a name must not resolve to (loopback, link-local,
   ..., and for a name allowed by a wildcard or an apt source anything not
   global: see `allowlist.address_refusal`) are dropped (DNS rebinding), and
   the connection goes to an address that was checked, never re-resolved. A
   literal address entry (in --allow or Mirror:, not in the apt sources) is
   the only way to such an address, asked for by that address: a name never
   borrows it.

A refusal is a 403 whose body names the rule that refused it, and a record in
the network log; every request, allowed or not, is one record.

Connections are kept alive on both sides, as apt expects (it asks for dozens
of files on one connection): a client may send several requests, and a
server connection is reused for later requests to the same checked address
and port (`upstream`). What keeps that safe is exact framing: a request's
body is its Content-Length (Transfer-Encoding on requests is refused, and so
is more than one Content-Length), so nothing after a request's declared body
ever reaches a server as part of it — it is parsed and decided as the next
request. A server connection is reused only after a request without a body
(a server that answers without reading a body would take that body for the
next request), and only when the response ended where its framing said:
Content-Length, chunked coding (HEAD, 1xx, 204 and 304 have no body); a
response that ends with the server's close, or whose framing is ambiguous, is
relayed and then its connection closed.
One thread per client connection, MAX_CLIENTS of them at once: the sandbox
opens as many connections as it likes, and each costs this process a thread
and descriptors (run out of those and nsbuild itself fails); the others wait
in the listening socket's backlog.
"""

from __future__ import annotations

import _socket
import errno
import socket
import threading
import time
from typing import Any

from nsbuild.net.allowlist import Allowlist, AllowRule, IPAddress, address_refusal
from nsbuild.net.httphead import (
    CHUNKED,
    LENGTH,
    NO_BODY,
    REASONS,
    BadRequest,
    Request,
    Response,
    error_response,
    parse_request,
    response_head,
    upstream_head,
)
from nsbuild.net.namecache import NameCache, Resolver
from nsbuild.net.netlog import NetLog
from nsbuild.net.stream import Stream, Truncated
from nsbuild.net.upstream import Upstream, UpstreamPool

HEAD_TIMEOUT = 60.0  # for a request head to arrive, also between kept-alive requests
MAX_CLIENTS = 32  # client connections served at once
# accept() failures that pass (the peer gave up, or descriptors or memory ran
# short for a moment): the proxy goes on accepting.
_TRANSIENT = {errno.ECONNABORTED, errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
              errno.EPROTO}


class Denied(Exception):
    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


class UpstreamFailed(Exception):
    """The server did not answer; `retry` when a fresh connection may."""

    def __init__(self, message: str, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


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
        self._names = NameCache(resolver)
        self._pool = UpstreamPool()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._stopping = False
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
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
        self._pool.close()
        with self._lock:
            open_socks = list(self._open)
        for s in open_socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _track(self, s: socket.socket) -> None:
        with self._lock:
            self._open.add(s)

    def _untrack(self, s: socket.socket) -> None:
        with self._lock:
            self._open.discard(s)

    def _close(self, s: socket.socket) -> None:
        self._untrack(s)
        s.close()

    def _accept_loop(self) -> None:
        while not self._stopping:
            if not self._slots.acquire(timeout=0.2):  # all taken: look at _stopping again
                continue
            try:
                client, _ = self._listener.accept()
            except OSError as e:
                self._slots.release()
                if self._stopping or e.errno not in _TRANSIENT:
                    return
                time.sleep(0.05)  # let a client give its descriptors back
                continue
            if self._stopping:
                self._slots.release()
                client.close()
                return
            self._track(client)
            try:
                # Heads and bodies go out in separate writes: without this,
                # Nagle's algorithm holds a small body back until the client
                # acknowledges the head, which it delays (40 ms a response).
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass  # not a TCP socket: nothing to delay
            try:
                threading.Thread(target=self._serve_client, args=(client,), daemon=True).start()
            except RuntimeError:  # no thread to be had: this client is not served
                self._slots.release()
                self._close(client)

    # -- one client connection, one request after another -----------------

    def _serve_client(self, client: socket.socket) -> None:
        conn = Stream(client)
        try:
            while not self._stopping and self._serve_request(conn):
                pass
        except (OSError, BadRequest):
            pass  # the client went away, or the relay broke off: nothing to answer
        finally:
            self._close(client)
            self._slots.release()

    def _serve_request(self, conn: Stream) -> bool:
        """Read, decide and answer one request; True to read another on `conn`."""
        conn.sock.settimeout(HEAD_TIMEOUT)
        try:
            head = conn.read_head()
            if head is None:
                return False
            req = parse_request(head)
        except Truncated:
            return False
        except BadRequest as e:
            self._refuse(conn, e.status, f"nsbuild egress proxy: {e}\n", close=True)
            self._record(None, "deny", "malformed request", reason=str(e))
            return False
        try:
            rule, addrs = self._decide(req)
        except Denied as e:
            # The connection stays in step only if there is no body to skip.
            keep = req.keep_alive and req.content_length == 0
            self._refuse(
                conn, 403, f"nsbuild egress proxy: {e}\nrefused by rule: {e.rule}\n", close=not keep
            )
            self._record(req, "deny", e.rule)
            return keep
        conn.sock.settimeout(None)
        if req.is_connect:
            self._tunnel(conn, req, rule, addrs)
            return False
        return self._forward(conn, req, rule, addrs)

    def _refuse(self, conn: Stream, status: int, body: str, close: bool) -> None:
        try:
            conn.sock.sendall(error_response(status, REASONS.get(status, "Error"), body, close))
        except OSError:
            pass

    def _record(self, req: Request | None, decision: str, rule: str, **extra: Any) -> None:
        if req is None:
            self._log.add(engine="proxy", kind="invalid", host="", port=0, decision=decision,
                          rule=rule, **extra)
        else:
            self._log.add(engine="proxy", kind=req.method, host=req.host_text, port=req.port,
                          decision=decision, rule=rule, **extra)

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
            why = address_refusal(req.host) if rule.from_sources else None
            if why is not None:
                raise Denied(
                    "apt sources reach no host-local address",
                    f"{req.host_text} {why.replace('resolves to', 'is')}; the environment's "
                    "apt sources may not name one (name it in --allow or the "
                    "environment's Mirror: to reach it)",
                )
            return rule, [req.host]
        try:
            infos = self._names.resolve(req.host, req.port)
        except OSError as e:
            raise Denied(rule.describe(), f"cannot resolve {req.host}: {e}") from None
        allowed: list[IPAddress] = []
        refused: list[str] = []
        for info in infos:
            addr = ipaddress.ip_address(info[4][0].split("%")[0])
            why = address_refusal(addr, wildcard=rule.needs_global)
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

    def _cannot_connect(self, conn: Stream, req: Request, rule: AllowRule, e: OSError) -> bool:
        if isinstance(req.host, str):
            self._names.forget(req.host)  # the next request asks the resolver again
        keep = req.keep_alive and req.content_length == 0
        self._refuse(
            conn,
            502,
            f"nsbuild egress proxy: cannot connect to {req.host_text}:{req.port}: "
            f"{e.strerror or e}\n",
            close=not keep,
        )
        self._record(req, "allow", rule.describe(), error=str(e.strerror or e))
        return keep

    # -- CONNECT ------------------------------------------------------------

    def _tunnel(self, conn: Stream, req: Request, rule: AllowRule, addrs: list[IPAddress]) -> None:
        try:
            up = self._pool.connect(addrs, req.port)
        except OSError as e:
            self._cannot_connect(conn, req, rule, e)
            return
        self._track(up.sock)
        counts = [0, 0]
        try:
            conn.sock.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

            def outward() -> None:
                counts[0] = _pump(conn, up.sock)

            t = threading.Thread(target=outward, daemon=True)
            t.start()
            counts[1] = _pump(up, conn.sock)
            t.join()
        finally:
            self._close(up.sock)
            self._record(req, "allow", rule.describe(), bytes_out=counts[0], bytes_in=counts[1],
                         status=200)

    # -- forwarding -----------------------------------------------------------

    def _forward(self, conn: Stream, req: Request, rule: AllowRule, addrs: list[IPAddress]) -> bool:
        """Relay one request and its response; True if the client connection
        stays in step for another request."""
        # A request with a body ends its server connection: a server that
        # answers without reading the body would read that body as the next
        # request if the connection were kept.
        reuse = req.content_length == 0
        head = upstream_head(req, keep_alive=reuse)
        up: Upstream | None = None
        sent = received = 0
        status: int | None = None
        try:
            for fresh in (False, True):
                try:
                    up = (self._pool.connect if fresh else self._pool.get)(addrs, req.port)
                except OSError as e:
                    return self._cannot_connect(conn, req, rule, e)
                self._track(up.sock)
                try:
                    sent = self._send_request(conn, up, req, head)
                    resp, received = self._read_response(conn, up, req)
                except UpstreamFailed as e:
                    self._close(up.sock)
                    up = None
                    if e.retry and not fresh:
                        continue  # a kept-alive connection the server had closed meanwhile
                    # The request's body may be unread: it must not pass for the next request.
                    keep = req.keep_alive and reuse
                    self._refuse(conn, 502, f"nsbuild egress proxy: {req.host_text}:{req.port}: "
                                 f"{e}\n", close=not keep)
                    self._record(req, "allow", rule.describe(), status=502, error=str(e))
                    return keep
                status = resp.status
                close = not req.keep_alive or resp.framing not in (NO_BODY, LENGTH, CHUNKED)
                head_out = resp.head_for_client(close)
                if resp.framing == LENGTH:
                    received += up.copy_to(conn.sock, resp.length, prefix=head_out)
                elif resp.framing == CHUNKED:
                    conn.sock.sendall(head_out)
                    received += up.copy_chunked(conn.sock)
                elif resp.framing == NO_BODY:
                    conn.sock.sendall(head_out)
                else:
                    received += up.copy_to(conn.sock, None, prefix=head_out)
                self._record(req, "allow", rule.describe(), bytes_out=sent, bytes_in=received,
                             status=status)
                if resp.reusable and reuse:
                    self._untrack(up.sock)
                    self._pool.put(up)
                    up = None
                return not close
            return False  # not reached: the second round returns
        except (OSError, BadRequest) as e:
            # Either side broke off inside a message: the client sees its
            # connection close, and neither connection is used again.
            extra: dict[str, Any] = {} if status is None else {"status": status}
            self._record(req, "allow", rule.describe(), bytes_out=sent, bytes_in=received,
                         error=f"relay broken off: {e}", **extra)
            return False
        finally:
            if up is not None:
                self._close(up.sock)

    def _send_request(self, conn: Stream, up: Upstream, req: Request, head: bytes) -> int:
        try:
            up.sock.sendall(head)
        except OSError as e:
            raise UpstreamFailed(f"the server reset the connection ({e.strerror})",
                                 up.reused and req.idempotent) from None
        if not req.content_length:
            return len(head)
        # Exactly the declared body; what follows it stays for the next request.
        # A client that stops inside its body, or a server that stops reading
        # it, ends both connections (the body cannot be sent again).
        return len(head) + conn.copy_to(up.sock, req.content_length)

    def _read_response(self, conn: Stream, up: Upstream, req: Request) -> tuple[Response, int]:
        """The final response head (interim 1xx ones go on to the client) and
        the bytes read so far."""
        received = 0
        while True:
            try:
                head = up.read_head()
            except OSError as e:
                # A server that hangs up with our request unread resets the
                # connection: for the client that is the same missing answer.
                raise UpstreamFailed(f"the server reset the connection ({e.strerror})",
                                     up.reused and req.idempotent and not received) from None
            except BadRequest as e:
                raise UpstreamFailed(str(e), False) from None
            if head is None:
                raise UpstreamFailed("the server closed without a response",
                                     up.reused and req.idempotent and not received)
            received += len(head) + 4
            try:
                resp = response_head(head, req.method)
            except BadRequest as e:
                raise UpstreamFailed(str(e), False) from None
            if not resp.interim:
                return resp, received
            conn.sock.sendall(resp.head_for_client(close=False))


def _pump(src: Stream, dst: socket.socket) -> int:
    """Copy src to dst until EOF, then half-close dst; the bytes copied."""
    try:
        total = src.copy_to(dst, None)
    except OSError:
        total = 0
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    return total
