"""The egress proxy against real local servers: what passes, what is refused, and
the tricks of issue 7 (Host header, absolute URI, CONNECT to another port, DNS
rebinding, smuggling). All servers listen on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess

import pytest
from net_helpers import exchange, origin, running_proxy


def curl(proxy_port: int, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "curl",
            "-sS",
            "--noproxy",
            "",
            "-x",
            f"http://127.0.0.1:{proxy_port}",
            "-w",
            "\n%{http_code}",
            *extra,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_allowed_server_is_reached_and_other_port_refused() -> None:
    with origin("A") as a, origin("B") as b, running_proxy([f"127.0.0.1:{a.port}"]) as (pp, log):
        ok = curl(pp, f"http://127.0.0.1:{a.port}/hello")
        assert ok.stdout.split() == ["A", "/hello", "200"]
        refused = curl(pp, f"http://127.0.0.1:{b.port}/secret")
        assert refused.stdout.splitlines()[-1] == "403"
        assert f"127.0.0.1:{b.port} is not in the allowlist" in refused.stdout
        assert "refused by rule: default deny" in refused.stdout
        assert b.requests == []
    records = log.records()
    assert [(r["port"], r["decision"]) for r in records] == [(a.port, "allow"), (b.port, "deny")]
    assert records[0]["bytes_in"] > 0 and records[0]["status"] == 200
    assert log.denied_summary() == f"network: 1 attempt denied: 127.0.0.1:{b.port}"


def test_connect_to_allowed_port_tunnels_and_to_other_port_is_refused() -> None:
    with origin("A") as a, origin("B") as b, running_proxy([f"127.0.0.1:{a.port}"]) as (pp, log):
        out = exchange(
            pp,
            f"CONNECT 127.0.0.1:{a.port} HTTP/1.1\r\nHost: x\r\n\r\n"
            f"GET /tunnel HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode(),
        )
        assert out.startswith(b"HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.")
        assert out.endswith(b"A /tunnel\n")
        out = exchange(pp, f"CONNECT 127.0.0.1:{b.port} HTTP/1.1\r\n\r\n".encode())
        assert out.startswith(b"HTTP/1.1 403 ")
        assert b.requests == []
    # The tunnel's record is written when both its directions have ended, which
    # may be after the next connection's refusal: compare without the order.
    assert sorted((r["port"], r["decision"]) for r in log.records()) == sorted(
        [(a.port, "allow"), (b.port, "deny")])


def test_host_header_cannot_redirect_a_request() -> None:
    with origin("A") as a, origin("B") as b, running_proxy([f"127.0.0.1:{a.port}"]) as (pp, _):
        out = exchange(
            pp,
            f"GET http://127.0.0.1:{a.port}/x HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{b.port}\r\n\r\n".encode(),
        )
        assert out.endswith(b"A /x\n")
        assert a.requests == [("GET", "/x", f"127.0.0.1:{a.port}")]
        # Origin-form with only a Host header is not a proxy request.
        out = exchange(pp, f"GET /x HTTP/1.1\r\nHost: 127.0.0.1:{b.port}\r\n\r\n".encode())
        assert out.startswith(b"HTTP/1.1 400 ")
        assert b.requests == []


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:{a}@127.0.0.1:{b}/",  # user info
        "http://127.0.0.1:{b}#@127.0.0.1:{a}/",  # fragment before the authority ends
        "http://127.0.0.1:{b}\\@127.0.0.1:{a}/",  # backslash
        "http://2130706433:{b}/",  # decimal address
        "http://0x7f000001:{b}/",
        "http://127.1:{b}/",
        "http://%31%32%37.0.0.1:{b}/",
        "http://[::ffff:127.0.0.1]:{b}/",  # v4-mapped: same as 127.0.0.1:{b}
        "https://127.0.0.1:{a}/",  # https must use CONNECT
    ],
)
def test_absolute_uri_tricks_are_refused(target: str) -> None:
    with origin("A") as a, origin("B") as b, running_proxy([f"127.0.0.1:{a.port}"]) as (pp, _):
        url = target.format(a=a.port, b=b.port)
        out = exchange(pp, f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert out.split(b" ")[1] in (b"400", b"403"), out[:200]
        assert a.requests == [] and b.requests == []


def test_connect_tricks_are_refused() -> None:
    with origin("A") as a, origin("B") as b, running_proxy([f"127.0.0.1:{a.port}"]) as (pp, _):
        for target in (
            f"127.0.0.1:{b.port}",
            f"127.0.0.1:{a.port}@127.0.0.1:{b.port}",
            "127.0.0.1",
            f"localhost:{a.port}",
            f"[::ffff:7f00:1]:{b.port}",
        ):
            out = exchange(pp, f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
            assert out.split(b" ")[1] in (b"400", b"403"), (target, out[:200])
        assert b.requests == []


def test_a_name_resolving_to_loopback_is_refused() -> None:
    # DNS rebinding: an allowed *name* that resolves to 127.0.0.1.
    with origin("A") as a, running_proxy([f"localhost:{a.port}"]) as (pp, log):
        out = curl(pp, f"http://localhost:{a.port}/")
        assert out.stdout.splitlines()[-1] == "403"
        assert "resolves to a loopback address" in out.stdout
        assert a.requests == []
    assert log.records()[0]["rule"] == "names may not resolve to internal addresses"


def test_smuggling_is_refused_or_never_reaches_a_server() -> None:
    with origin("A") as a, origin("B") as b, running_proxy([f"127.0.0.1:{a.port}"]) as (pp, _):
        # Content-Length and Transfer-Encoding together: refused outright.
        out = exchange(
            pp,
            f"POST http://127.0.0.1:{a.port}/ HTTP/1.1\r\nContent-Length: 4\r\n"
            "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode(),
        )
        assert out.startswith(b"HTTP/1.1 501 ")
        out = exchange(
            pp,
            f"GET http://127.0.0.1:{a.port}/ HTTP/1.1\r\nContent-Length: 1\r\n"
            "Content-Length: 2\r\n\r\n".encode(),
        )
        assert out.startswith(b"HTTP/1.1 400 ")
        out = exchange(
            pp, f"GET http://127.0.0.1:{a.port}/ HTTP/1.1\r\nX: a\r\n b\r\n\r\n".encode()
        )
        assert out.startswith(b"HTTP/1.1 400 ")
        # A second request pipelined after the first, aimed at another server,
        # is a request of its own, decided on its own: refused.
        out = exchange(
            pp,
            f"GET http://127.0.0.1:{a.port}/one HTTP/1.1\r\n\r\n"
            f"GET http://127.0.0.1:{b.port}/two HTTP/1.1\r\n\r\n".encode(),
        )
        first, _, second = out.partition(b"A /one\n")
        assert first.startswith(b"HTTP/1.1 200 ") and second.startswith(b"HTTP/1.1 403 ")
        assert b"refused by rule: default deny" in second
        # A body that looks like a request is only a body.
        smuggled = f"GET http://127.0.0.1:{b.port}/three HTTP/1.1\r\n\r\n".encode()
        exchange(
            pp,
            f"POST http://127.0.0.1:{a.port}/p HTTP/1.1\r\n"
            f"Content-Length: {len(smuggled)}\r\n\r\n".encode()
            + smuggled,
        )
    assert b.requests == []
    assert [path for _, path, _ in a.requests] == ["/one", "/p"]


def test_proxy_socket_itself_is_not_a_target() -> None:
    with origin("A") as a, running_proxy([f"127.0.0.1:{a.port}"]) as (pp, _):
        out = exchange(pp, f"CONNECT 127.0.0.1:{pp} HTTP/1.1\r\n\r\n".encode())
        assert out.startswith(b"HTTP/1.1 403 ")


def test_large_download_is_complete() -> None:
    size = 20 * 1024 * 1024
    with origin("A") as a, running_proxy([f"127.0.0.1:{a.port}"]) as (pp, log):
        out = subprocess.run(
            [
                "curl",
                "-sS",
                "--noproxy",
                "",
                "-x",
                f"http://127.0.0.1:{pp}",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_download}",
                f"http://127.0.0.1:{a.port}/big/{size}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.stdout == f"200 {size}"
    assert log.records()[0]["bytes_in"] > size


def test_stopping_closes_the_listener() -> None:
    with running_proxy(["127.0.0.1:9"]) as (pp, _):
        pass
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", pp), timeout=5)


def test_allowed_but_unreachable_or_silent_server_gets_502() -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
    sp, cp = silent.getsockname()[1], closed.getsockname()[1]
    try:
        with running_proxy([f"127.0.0.1:{sp}", f"127.0.0.1:{cp}"]) as (pp, log):
            out = exchange(pp, f"GET http://127.0.0.1:{cp}/ HTTP/1.1\r\n\r\n".encode())
            assert out.startswith(b"HTTP/1.1 502 ") and b"cannot connect" in out
            with socket.create_connection(("127.0.0.1", pp)) as c:
                c.sendall(f"GET http://127.0.0.1:{sp}/ HTTP/1.1\r\n\r\n".encode())
                server_side, _ = silent.accept()
                server_side.close()  # the server hangs up without answering
                out = c.recv(65536)
            assert out.startswith(b"HTTP/1.1 502 ")
        assert log.records()[0].get("error") == "Connection refused"
    finally:
        silent.close()
        closed.close()
