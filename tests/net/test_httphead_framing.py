"""Where a response ends, and whether its connection may carry another: the
framing rules the egress proxy relays by (RFC 9112 section 6.3). Pure."""

from __future__ import annotations

import pytest

from nsbuild.net.httphead import CHUNKED, LENGTH, NO_BODY, TO_CLOSE, BadRequest, response_head


@pytest.mark.parametrize(
    ("head", "method", "framing", "length", "reusable"),
    [
        ("HTTP/1.1 200 OK\r\nContent-Length: 12", "GET", LENGTH, 12, True),
        ("HTTP/1.1 200 OK\r\nContent-Length: 12, 12", "GET", LENGTH, 12, True),
        ("HTTP/1.1 200 OK\r\nContent-Length: 12", "HEAD", NO_BODY, 0, True),
        ("HTTP/1.1 204 No Content", "GET", NO_BODY, 0, True),
        ("HTTP/1.1 304 Not Modified\r\nContent-Length: 99", "GET", NO_BODY, 0, True),
        ("HTTP/1.1 100 Continue", "POST", NO_BODY, 0, True),
        ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", "GET", CHUNKED, 0, True),
        ("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked", "GET", CHUNKED, 0, True),
        # Both: the chunks win and the connection is not reused.
        ("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked", "GET", CHUNKED,
         0, False),
        # A coding that does not end in chunked, or no framing: to the close.
        ("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip", "GET", TO_CLOSE, 0, False),
        ("HTTP/1.1 200 OK", "GET", TO_CLOSE, 0, False),
        ("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close", "GET", LENGTH, 3, False),
        ("HTTP/1.0 200 OK\r\nContent-Length: 3", "GET", LENGTH, 3, False),
    ],
)
def test_response_framing(head: str, method: str, framing: str, length: int,
                          reusable: bool) -> None:
    resp = response_head(head.encode(), method)
    assert (resp.framing, resp.length, resp.reusable) == (framing, length, reusable)


@pytest.mark.parametrize(
    "head",
    [
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6",
        "HTTP/1.1 200 OK\r\nContent-Length: 5, 6",
        "HTTP/1.1 200 OK\r\nContent-Length: -1",
        "HTTP/1.1 200 OK\r\nContent-Length: 0x10",
        "HTTP/1.1 200 OK\r\nX: a\r\n folded",
        "HTTP/1.1 200 OK\r\nContent-Length: 5\nX: bare LF",
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket",
        "HTTP/2 200",
        "ICY 200 OK",
    ],
)
def test_unusable_responses_are_refused(head: str) -> None:
    with pytest.raises(BadRequest) as e:
        response_head(head.encode(), "GET")
    assert e.value.status == 502


def test_the_client_gets_no_hop_by_hop_fields_and_our_own_connection_field() -> None:
    resp = response_head(b"HTTP/1.1 200 OK\r\nConnection: X-Private, keep-alive\r\n"
                         b"X-Private: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 0", "GET")
    assert resp.head_for_client(close=False) == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    assert resp.head_for_client(close=True).endswith(b"Connection: close\r\n\r\n")
