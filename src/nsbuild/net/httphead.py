"""Strict parsing of the HTTP/1.x messages the egress proxy handles. Pure, no I/O.

Strict on purpose: a proxy that reads a request differently from the server
behind it can be smuggled through. So: CRLF line ends only, no obsolete line
folding, one Content-Length at most, no Transfer-Encoding on requests, no
user info in URLs, the target host taken only from the request line (the
Host header is replaced, never trusted).

Responses are read as strictly where it matters for reusing a connection:
their framing (`Response.framing`) comes from the request method, the status,
Transfer-Encoding and Content-Length by the rules of RFC 9112 section 6.3; a
response whose framing is ambiguous is never followed by another on the same
connection.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nsbuild.net.allowlist import IPAddress, canonical_host, split_host_port

MAX_HEAD = 64 * 1024
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VCHARS = re.compile(r"^[\x21-\x7e]+$")
_FIELD_VALUE = re.compile(r"^[\t\x20-\x7e\x80-\xff]*$")
# Headers that concern one hop only; never forwarded (RFC 9110 section 7.6.1).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)


class BadRequest(ValueError):
    """The request cannot be proxied; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Request:
    method: str
    target: str  # as sent
    version: str
    headers: tuple[tuple[str, str], ...]
    host: str | IPAddress  # canonical
    host_text: str  # as it goes into Host: / the log (brackets for IPv6)
    port: int
    path: str  # origin-form for the upstream ("" for CONNECT)
    content_length: int

    @property
    def is_connect(self) -> bool:
        return self.method == "CONNECT"

    @property
    def keep_alive(self) -> bool:
        """The client may send another request on this connection after this one."""
        if self.version != "HTTP/1.1":
            return False
        return "close" not in _connection_tokens(self.headers)

    @property
    def idempotent(self) -> bool:
        """Safe to send again on a fresh connection when a kept-alive one was stale."""
        return self.method in ("GET", "HEAD", "OPTIONS") and self.content_length == 0


def _connection_tokens(headers: tuple[tuple[str, str], ...]) -> set[str]:
    tokens: set[str] = set()
    for k, v in headers:
        if k.lower() in ("connection", "proxy-connection"):
            tokens.update(t.strip().lower() for t in v.split(","))
    return tokens


def _parse_fields(lines: list[str]) -> tuple[tuple[str, str], ...]:
    headers = []
    for line in lines:
        if line[:1] in (" ", "\t"):
            raise BadRequest("obsolete line folding in headers")
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name):
            raise BadRequest(f"malformed header line {line[:60]!r}")
        value = value.strip(" \t")
        if not _FIELD_VALUE.match(value):
            raise BadRequest(f"control character in header {name}")
        headers.append((name, value))
    return tuple(headers)


def _lines(head: bytes) -> list[str]:
    text = head.decode("latin-1")
    lines = text.split("\r\n")
    if any("\r" in line or "\n" in line for line in lines):
        raise BadRequest("bare CR or LF in the request head")
    return lines


def parse_authority(authority: str, default_port: int | None) -> tuple[str | IPAddress, str, int]:
    if "@" in authority:
        raise BadRequest("user info in the target is refused")
    if "%" in authority or "\\" in authority:
        raise BadRequest("escaped or backslashed characters in the target host are refused")
    try:
        host, port = split_host_port(authority)
        canon = canonical_host(host)
    except ValueError as e:
        raise BadRequest(f"bad target host: {e}") from None
    if port is None:
        if default_port is None:
            raise BadRequest("CONNECT needs HOST:PORT")
        port = default_port
    text = f"[{canon}]" if ":" in str(canon) else str(canon)
    return canon, text, port


def parse_request(head: bytes) -> Request:
    lines = _lines(head)
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise BadRequest("malformed request line")
    method, target, version = parts
    if not _TOKEN.match(method):
        raise BadRequest("malformed method")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise BadRequest(f"unsupported protocol version {version[:20]!r}", 505)
    if not _VCHARS.match(target):
        raise BadRequest("malformed request target")
    headers = _parse_fields(lines[1:])
    lengths = [v for k, v in headers if k.lower() == "content-length"]
    if any(k.lower() == "transfer-encoding" for k, _ in headers):
        raise BadRequest("request bodies with Transfer-Encoding are not supported", 501)
    if len(lengths) > 1:
        raise BadRequest("more than one Content-Length")
    if lengths and (not lengths[0].isdigit() or len(lengths[0]) > 15):
        raise BadRequest("malformed Content-Length")
    content_length = int(lengths[0]) if lengths else 0

    if method == "CONNECT":
        host, host_text, port = parse_authority(target, None)
        return Request(method, target, version, headers, host, host_text, port, "", content_length)

    scheme, sep, rest = target.partition("://")
    if not sep:
        raise BadRequest("this is a proxy: the request target must be an absolute http:// URL")
    if scheme.lower() != "http":
        raise BadRequest(f"scheme {scheme[:10]!r} is not proxied (use CONNECT for https)")
    cut = len(rest)
    for ch in "/?#":
        i = rest.find(ch)
        if 0 <= i < cut:
            cut = i
    authority, path = rest[:cut], rest[cut:]
    path = path.split("#", 1)[0]
    if not path.startswith("/"):
        path = "/" + path
    host, host_text, port = parse_authority(authority, 80)
    return Request(method, target, version, headers, host, host_text, port, path, content_length)


def upstream_head(req: Request, keep_alive: bool = False) -> bytes:
    """The request as the origin server gets it: origin-form, our Host, one hop only.

    `keep_alive` asks the server to keep the connection for another request
    (HTTP/1.1's default, so nothing is written); otherwise `Connection: close`."""
    named = _connection_tokens(req.headers)
    host_header = req.host_text if req.port == 80 else f"{req.host_text}:{req.port}"
    out = [f"{req.method} {req.path} HTTP/1.1", f"Host: {host_header}"]
    for k, v in req.headers:
        lk = k.lower()
        if lk in HOP_BY_HOP or lk in named:
            continue
        out.append(f"{k}: {v}")
    if not keep_alive:
        out.append("Connection: close")
    return ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")


# How a response body ends (RFC 9112 section 6.3).
NO_BODY = "none"  # HEAD, 1xx, 204, 304
LENGTH = "length"  # Content-Length bytes
CHUNKED = "chunked"  # chunks up to the last, empty one and the trailers
TO_CLOSE = "close"  # the server closes the connection


@dataclass(frozen=True)
class Response:
    status: int
    version: str
    lines: tuple[str, ...]  # status line and the fields passed on to the client
    framing: str
    length: int  # for LENGTH
    reusable: bool  # the server may get another request on this connection

    @property
    def interim(self) -> bool:
        return 100 <= self.status < 200

    def head_for_client(self, close: bool) -> bytes:
        out = list(self.lines)
        if close:
            out.append("Connection: close")
        return ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")


def _list_values(fields: tuple[tuple[str, str], ...], name: str) -> list[str]:
    """The comma-separated values of every field called `name`, in order."""
    return [item.strip() for k, v in fields if k.lower() == name for item in v.split(",")]


def response_head(head: bytes, method: str = "GET") -> Response:
    """Parse a response head to a request with `method`; BadRequest (502) when the
    head is malformed or its framing contradicts itself beyond repair."""
    lines = head.decode("latin-1").split("\r\n")
    status_parts = lines[0].split(" ", 2)
    if (
        len(status_parts) < 2
        or status_parts[0] not in ("HTTP/1.1", "HTTP/1.0")
        or len(status_parts[1]) != 3
        or not status_parts[1].isdigit()
    ):
        raise BadRequest("malformed response from the server", 502)
    version, status = status_parts[0], int(status_parts[1])
    if any("\r" in line or "\n" in line for line in lines):
        raise BadRequest("bare CR or LF in the response head", 502)
    try:
        fields = _parse_fields(lines[1:])
    except BadRequest as e:
        raise BadRequest(f"malformed response from the server: {e}", 502) from None
    if status == 101:  # Upgrade is never forwarded, so no server may switch protocols
        raise BadRequest("the server switched protocols unasked", 502)
    tokens = _connection_tokens(fields)
    lengths = _list_values(fields, "content-length")
    codings = [c.lower() for c in _list_values(fields, "transfer-encoding")]
    reusable = version == "HTTP/1.1" and "close" not in tokens
    length = 0
    drop = {"connection", "proxy-connection", "keep-alive"} | tokens
    if method == "HEAD" or 100 <= status < 200 or status in (204, 304):
        framing = NO_BODY
    elif codings:
        # Transfer-Encoding wins over Content-Length; both at once smells of
        # smuggling: the length is dropped and the connection not reused.
        framing = CHUNKED if codings[-1] == "chunked" else TO_CLOSE
        if lengths:
            drop.add("content-length")
            reusable = False
    elif lengths:
        if len(set(lengths)) != 1 or not lengths[0].isdigit() or len(lengths[0]) > 15:
            raise BadRequest("malformed or conflicting Content-Length from the server", 502)
        framing, length = LENGTH, int(lengths[0])
    else:
        framing = TO_CLOSE
    if framing == TO_CLOSE:
        reusable = False
    kept = [lines[0]] + [f"{k}: {v}" for k, v in fields if k.lower() not in drop]
    return Response(status, version, tuple(kept), framing, length, reusable)


_CHUNK_SIZE = re.compile(rb"^([0-9A-Fa-f]{1,15})(;[\t\x20-\x7e]*)?\r\n$")


def chunk_size(line: bytes) -> int:
    """The size from a chunk-size line (with its CRLF); BadRequest (502) if malformed."""
    m = _CHUNK_SIZE.match(line)
    if m is None:
        raise BadRequest("malformed chunk in the response", 502)
    return int(m.group(1), 16)


def error_response(status: int, reason: str, body: str, close: bool = True) -> bytes:
    data = body.encode("utf-8", "replace")
    connection = "Connection: close\r\n" if close else ""
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(data)}\r\n{connection}\r\n"
    ).encode("latin-1") + data


REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}
