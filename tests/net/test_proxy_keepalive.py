"""Kept-alive connections through the egress proxy: several requests on one
client connection, server connections reused, and every request still decided,
framed and logged on its own. All servers listen on 127.0.0.1."""

from __future__ import annotations

import http.client
import socket
from typing import Any

from net_helpers import exchange, origin, pattern, running_proxy

from nsbuild.net.allowlist import Allowlist
from nsbuild.net.netlog import NetLog
from nsbuild.net.proxy import EgressProxy


def client(proxy_port: int) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=30)


def get(conn: http.client.HTTPConnection, url: str, method: str = "GET") -> tuple[int, bytes]:
    conn.request(method, url)
    resp = conn.getresponse()
    return resp.status, resp.read()


def test_several_requests_on_one_connection_each_get_their_answer() -> None:
    with origin("A") as a, running_proxy([f"127.0.0.1:{a.port}"]) as (pp, log):
        conn = client(pp)
        answers, socks = [], []
        for i in range(6):
            answers.append(get(conn, f"http://127.0.0.1:{a.port}/n{i}"))
            socks.append(conn.sock)  # None once the proxy said `Connection: close`
        conn.close()
    assert socks[0] is not None and all(s is socks[0] for s in socks), "client connection closed"
    assert answers == [(200, f"A /n{i}\n".encode()) for i in range(6)]
    # One server connection for all six: reused, not opened per request.
    assert a.connections == 1
    records = log.records()
    assert [(r["decision"], r["status"]) for r in records] == [("allow", 200)] * 6


def test_pipelined_requests_are_answered_in_order() -> None:
    with origin("A") as a, running_proxy([f"127.0.0.1:{a.port}"]) as (pp, _):
        out = exchange(pp, b"".join(
            f"GET http://127.0.0.1:{a.port}/p{i} HTTP/1.1\r\n\r\n".encode() for i in range(4)))
    bodies = [part.rpartition(b"\r\n\r\n")[2] for part in out.split(b"HTTP/1.1 200 OK")[1:]]
    assert bodies == [f"A /p{i}\n".encode() for i in range(4)]
    assert [path for _, path, _ in a.requests] == ["/p0", "/p1", "/p2", "/p3"]


def test_a_denied_request_between_allowed_ones_is_refused_alone() -> None:
    with origin("A") as a, origin("B") as b, running_proxy([f"127.0.0.1:{a.port}"]) as (pp, log):
        conn = client(pp)
        first = get(conn, f"http://127.0.0.1:{a.port}/before")
        sock = conn.sock
        denied = get(conn, f"http://127.0.0.1:{b.port}/secret")
        after = get(conn, f"http://127.0.0.1:{a.port}/after")
        assert sock is not None and conn.sock is sock, "the refusal closed the connection"
        conn.close()
    assert first == (200, b"A /before\n") and after == (200, b"A /after\n")
    assert denied[0] == 403
    assert f"127.0.0.1:{b.port} is not in the allowlist".encode() in denied[1]
    assert b"refused by rule: default deny" in denied[1]
    assert b.requests == [] and b.connections == 0
    assert [(r["port"], r["decision"]) for r in log.records()] == [
        (a.port, "allow"), (b.port, "deny"), (a.port, "allow")]


def test_a_body_that_looks_like_a_request_never_reaches_the_server_as_one() -> None:
    # The origin answers without reading bodies: kept alive, it would take the
    # body for a second request. The proxy ends a server connection after a
    # request with a body, and reads what follows the body as the client's
    # next request, decided on its own.
    with origin("A") as a, origin("B") as b, running_proxy([f"127.0.0.1:{a.port}"]) as (pp, _):
        smuggled = (f"GET http://127.0.0.1:{a.port}/smuggled HTTP/1.1\r\n\r\n"
                    f"GET http://127.0.0.1:{b.port}/smuggled HTTP/1.1\r\n\r\n").encode()
        out = exchange(
            pp,
            f"POST http://127.0.0.1:{a.port}/post HTTP/1.1\r\n"
            f"Content-Length: {len(smuggled)}\r\n\r\n".encode()
            + smuggled
            + f"GET http://127.0.0.1:{a.port}/next HTTP/1.1\r\n\r\n".encode(),
        )
    assert out.count(b"HTTP/1.1 200 OK") == 2 and out.endswith(b"A /next\n")
    assert [path for _, path, _ in a.requests] == ["/post", "/next"]
    assert b.requests == []
    assert a.connections == 2


def test_ambiguous_request_framing_closes_the_connection() -> None:
    with origin("A") as a, running_proxy([f"127.0.0.1:{a.port}"]) as (pp, _):
        out = exchange(
            pp,
            f"POST http://127.0.0.1:{a.port}/te HTTP/1.1\r\nContent-Length: 5\r\n"
            "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            f"GET http://127.0.0.1:{a.port}/after HTTP/1.1\r\n\r\n".encode(),
        )
    assert out.startswith(b"HTTP/1.1 501 ") and out.count(b"HTTP/1.1") == 1
    assert b"Connection: close" in out
    assert a.requests == []


def test_chunked_and_read_to_close_responses_are_relayed_whole() -> None:
    size = 300_000
    with origin("A") as a, running_proxy([f"127.0.0.1:{a.port}"]) as (pp, log):
        conn = client(pp)
        assert get(conn, f"http://127.0.0.1:{a.port}/chunked/{size}") == (200, pattern(size))
        sock = conn.sock
        # After a chunked response the connection goes on.
        assert get(conn, f"http://127.0.0.1:{a.port}/x") == (200, b"A /x\n")
        assert sock is not None and conn.sock is sock
        # A body that ends when the server closes: relayed whole, then the
        # client's connection is closed too (http.client opens a new one).
        assert get(conn, f"http://127.0.0.1:{a.port}/close/{size}") == (200, pattern(size))
        assert conn.sock is None
        assert get(conn, f"http://127.0.0.1:{a.port}/y") == (200, b"A /y\n")
        conn.close()
        raw = exchange(pp, f"GET http://127.0.0.1:{a.port}/chunked/2500 HTTP/1.1\r\n"
                           "Connection: close\r\n\r\n".encode())
    # The chunked coding goes through as the server wrote it, trailers included.
    assert raw.endswith(b"0\r\nX-Trailer: done\r\n\r\n") and b"Transfer-Encoding: chunked" in raw
    assert [r["status"] for r in log.records()] == [200] * 5
    assert log.records()[0]["bytes_in"] > size


def test_a_response_with_contradictory_framing_ends_its_server_connection() -> None:
    # Transfer-Encoding and Content-Length together: the chunks count, the
    # length is dropped, and the server connection is not used again.
    with origin("A") as a, running_proxy([f"127.0.0.1:{a.port}"]) as (pp, _):
        raw = exchange(pp, f"GET http://127.0.0.1:{a.port}/te-and-cl/3000 HTTP/1.1\r\n\r\n"
                           f"GET http://127.0.0.1:{a.port}/next HTTP/1.1\r\n\r\n".encode())
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head and b"Content-Length" not in head
    assert rest.endswith(b"A /next\n") and b"X-Trailer: done" in rest
    assert a.connections == 2


def test_head_response_has_no_body_and_the_connection_goes_on() -> None:
    with origin("A") as a, running_proxy([f"127.0.0.1:{a.port}"]) as (pp, _):
        conn = client(pp)
        assert get(conn, f"http://127.0.0.1:{a.port}/h", "HEAD") == (200, b"")
        sock = conn.sock
        assert get(conn, f"http://127.0.0.1:{a.port}/g") == (200, b"A /g\n")
        assert sock is not None and conn.sock is sock
        conn.close()
    assert a.connections == 1


def test_a_server_connection_closed_while_idle_is_not_reused() -> None:
    with origin("A") as a, running_proxy([f"127.0.0.1:{a.port}"]) as (pp, _):
        conn = client(pp)
        assert get(conn, f"http://127.0.0.1:{a.port}/drop") == (200, b"A /drop\n")
        assert get(conn, f"http://127.0.0.1:{a.port}/after") == (200, b"A /after\n")
        conn.close()
    assert a.connections == 2


def test_a_name_is_resolved_once() -> None:
    calls: list[str] = []

    def resolver(host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    log = NetLog()
    proxy = EgressProxy(listener, Allowlist.parse(["mirror.test:80"]), log, resolver=resolver)
    proxy.start()
    try:
        conn = client(listener.getsockname()[1])
        answers = [get(conn, "http://mirror.test/x")[0] for _ in range(3)]
        conn.close()
    finally:
        proxy.stop()
    # Refused every time (the name resolves to loopback: DNS rebinding), asked once.
    assert answers == [403, 403, 403]
    assert calls == ["mirror.test"]
    assert {r["rule"] for r in log.records()} == {"names may not resolve to internal addresses"}


def test_concurrent_clients_sharing_server_connections_each_get_their_own_answers() -> None:
    import random
    import threading

    wrong: list[tuple[int, int, str]] = []
    with origin("A") as a, origin("B") as b, \
            running_proxy([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]) as (pp, log):

        def one_client(k: int) -> None:
            rnd = random.Random(k)
            conn = client(pp)
            for i in range(40):
                srv = rnd.choice([a, b])
                kind = rnd.choice(["plain", "chunked", "close", "head"])
                n = rnd.randint(0, 50_000)
                path, want = {
                    "plain": (f"/c{k}/{i}", f"{srv.name} /c{k}/{i}\n".encode()),
                    "chunked": (f"/chunked/{n}", pattern(n)),
                    "close": (f"/close/{n + 1}", pattern(n + 1)),
                    "head": (f"/h{k}/{i}", b""),
                }[kind]
                got = get(conn, f"http://127.0.0.1:{srv.port}{path}",
                          "HEAD" if kind == "head" else "GET")
                if got != (200, want):
                    wrong.append((k, i, kind))
            conn.close()

        threads = [threading.Thread(target=one_client, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert wrong == []
    assert len(log.records()) == 240
