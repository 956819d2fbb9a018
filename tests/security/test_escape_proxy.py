"""`--net allow` escapes: from inside a real sandbox, trick the egress proxy into
reaching a server that is not on the allowlist.

Two origin servers run on the host's 127.0.0.1: A is allowed (`--allow
127.0.0.1:A`), B is not. Every trick is sent raw to the proxy's socket inside
the sandbox (127.0.0.1:3128); whatever the proxy answers, B must never see a
request. The proxy's parser is also tested directly in tests/net/test_proxy.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from net_helpers import origin
from security_helpers import failed, probe

pytestmark = pytest.mark.userns

PROXY = 3128

# Each trick: a name and the raw bytes sent to the proxy; {a} and {b} are the ports.
TRICKS: dict[str, str] = {
    "absolute uri to B": "GET http://127.0.0.1:{b}/abs HTTP/1.1\r\nHost: 127.0.0.1:{a}\r\n\r\n",
    "host header to B": "GET http://127.0.0.1:{a}/host HTTP/1.1\r\nHost: 127.0.0.1:{b}\r\n\r\n",
    "origin form with host B": "GET /origin HTTP/1.1\r\nHost: 127.0.0.1:{b}\r\n\r\n",
    "user info": "GET http://127.0.0.1:{a}@127.0.0.1:{b}/ui HTTP/1.1\r\n\r\n",
    "backslash": "GET http://127.0.0.1:{a}\\@127.0.0.1:{b}/bs HTTP/1.1\r\n\r\n",
    "percent": "GET http://127.0.0.1%3a{b}/pc HTTP/1.1\r\n\r\n",
    "v4 mapped v6": "GET http://[::ffff:127.0.0.1]:{b}/mapped HTTP/1.1\r\n\r\n",
    "decimal address": "GET http://2130706433:{b}/dec HTTP/1.1\r\n\r\n",
    "short address": "GET http://127.1:{b}/short HTTP/1.1\r\n\r\n",
    "connect to B": "CONNECT 127.0.0.1:{b} HTTP/1.1\r\nHost: 127.0.0.1:{a}\r\n\r\n",
    "connect to the proxy port": "CONNECT 127.0.0.1:3128 HTTP/1.1\r\n\r\n",
    "proxy as target": "GET http://127.0.0.1:3128/self HTTP/1.1\r\n\r\n",
    "te and cl": "POST http://127.0.0.1:{a}/te HTTP/1.1\r\nContent-Length: 4\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two content lengths": "POST http://127.0.0.1:{a}/cl HTTP/1.1\r\nContent-Length: 0\r\n"
                           "Content-Length: 40\r\n\r\nGET http://127.0.0.1:{b}/x HTTP/1.1\r\n\r\n",
    "line folding": "GET http://127.0.0.1:{a}/fold HTTP/1.1\r\nX: a\r\n"
                    " Host: 127.0.0.1:{b}\r\n\r\n",
    "bare lf": "GET http://127.0.0.1:{b}/lf HTTP/1.1\nHost: x\n\n",
    "pipelined": "GET http://127.0.0.1:{a}/one HTTP/1.1\r\n\r\n"
                 "GET http://127.0.0.1:{b}/two HTTP/1.1\r\n\r\n",
    "body smuggling": "POST http://127.0.0.1:{a}/body HTTP/1.1\r\nContent-Length: 40\r\n\r\n"
                      "GET http://127.0.0.1:{b}/three HTTP/1.1\r\n\r\n",
    "https scheme": "GET https://127.0.0.1:{b}/s HTTP/1.1\r\n\r\n",
    "http 0.9": "GET http://127.0.0.1:{b}/nine\r\n\r\n",
}

CODE = """
import json
port = int(sys.argv[1])
tricks = json.loads(sys.argv[2])
def exchange(data):
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    s.sendall(data.encode("latin-1"))
    s.shutdown(socket.SHUT_WR)
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return out.split(b"\\r\\n", 1)[0].decode("latin-1")
        out += chunk
for name, data in tricks.items():
    attempt(name, lambda data=data: exchange(data))
def direct(p):
    s = socket.create_connection(("127.0.0.1", p), timeout=5)
attempt("direct to A", lambda: direct(int(sys.argv[3])))
attempt("direct to B", lambda: direct(int(sys.argv[4])))
attempt("name resolving to loopback", lambda: exchange(
    "GET http://localhost:%s/name HTTP/1.1\\r\\n\\r\\n" % sys.argv[3]))
"""


def _status(res: dict[str, dict[str, object]], name: str) -> str:
    got = res[name]
    assert got["ok"] is True, f"{name}: the proxy did not answer: {got}"
    return str(got["value"]).strip("'\"")


def test_no_proxy_trick_reaches_a_server_not_allowed(tmp_path: Path) -> None:
    import json

    with origin("A") as a, origin("B") as b:
        tricks = {k: v.format(a=a.port, b=b.port) for k, v in TRICKS.items()}
        res = probe(CODE, "--allow", f"127.0.0.1:{a.port}", "--allow", f"localhost:{a.port}",
                    cwd=tmp_path, args=(str(PROXY), json.dumps(tricks), str(a.port),
                                        str(b.port)))
        seen_by_b = list(b.requests)
        seen_by_a = sorted(path for _, path, _ in a.requests)
    assert seen_by_b == [], f"the server that is not allowed was reached: {seen_by_b}"
    # What A saw: only the plain requests, each with the Host nsbuild wrote.
    assert seen_by_a == ["/body", "/host", "/one"], seen_by_a
    for name in ("host header to B", "pipelined", "body smuggling"):
        assert _status(res, name).startswith("HTTP/1.1 200"), (name, res[name])
    refused = {
        "absolute uri to B": "403", "connect to B": "403", "connect to the proxy port": "403",
        "proxy as target": "403", "origin form with host B": "400", "user info": "400",
        "backslash": "400", "percent": "400", "v4 mapped v6": "403", "decimal address": "400",
        "short address": "400", "te and cl": "501", "two content lengths": "400",
        "line folding": "400", "https scheme": "400", "http 0.9": "400",
        "name resolving to loopback": "403",
    }
    for name, status in refused.items():
        line = _status(res, name)
        assert line.startswith(f"HTTP/1.1 {status} "), (name, line)
    # A head that never ends in CRLF CRLF: the connection is closed unanswered.
    assert _status(res, "bare lf") in ("", "HTTP/1.1 400 Bad Request")
    # Around the proxy: the sandbox's 127.0.0.1 is its own.
    failed(res, "direct to A", "ECONNREFUSED")
    failed(res, "direct to B", "ECONNREFUSED")
