"""Bodies larger than the proxy's copy buffer, relayed by several clients at
once: each arrives whole and unmixed, and each connection stays in step for
the request after it. The server listens on 127.0.0.1 only."""

from __future__ import annotations

import hashlib
import http.client
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler

from net_helpers import running_proxy, serving

from nsbuild.net.stream import COPY_BUF

# Crosses the buffer's boundaries twice and ends off them.
SIZE = 2 * COPY_BUF + 12_345


def body(seed: int, n: int) -> bytes:
    """n bytes that differ from seed to seed; the block length is not a power
    of two, so a piece moved by a buffer's length shows."""
    block = random.Random(seed).randbytes(65_521)
    return (block * (n // len(block) + 1))[:n]


@contextmanager
def body_server() -> Iterator[int]:
    """GET /body/SEED/N answers body(SEED, N) with a Content-Length; POST reads
    the request's body and answers its SHA-256. Keeps connections alive."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            _, _, seed, n = self.path.split("/")
            self._answer(body(int(seed), int(n)))

        def do_POST(self) -> None:
            data = self.rfile.read(int(self.headers["Content-Length"]))
            self._answer(hashlib.sha256(data).hexdigest().encode())

        def _answer(self, data: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    with serving(Handler) as port:
        yield port


def test_large_bodies_from_concurrent_clients_arrive_whole_and_in_step() -> None:
    wrong: list[str] = []
    with body_server() as port, running_proxy([f"127.0.0.1:{port}"]) as (pp, log):
        base = f"http://127.0.0.1:{port}"

        def one_client(k: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", pp, timeout=60)
            try:
                for seed in (10 * k + 1, 10 * k + 2):
                    conn.request("GET", f"{base}/body/{seed}/{SIZE}")
                    resp = conn.getresponse()
                    if (resp.status, resp.read()) != (200, body(seed, SIZE)):
                        wrong.append(f"client {k}: download {seed}")
                upload = body(100 + k, SIZE)
                conn.request("POST", f"{base}/digest", body=upload)
                resp = conn.getresponse()
                if resp.read() != hashlib.sha256(upload).hexdigest().encode():
                    wrong.append(f"client {k}: upload")
                # The same connection, still in step after the large bodies.
                conn.request("GET", f"{base}/body/{k}/5")
                resp = conn.getresponse()
                if (resp.status, resp.read()) != (200, body(k, 5)):
                    wrong.append(f"client {k}: small request after")
            except (OSError, http.client.HTTPException) as e:
                wrong.append(f"client {k}: {e!r}")
            finally:
                conn.close()

        threads = [threading.Thread(target=one_client, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert wrong == []
    records = log.records()
    assert len(records) == 12
    assert sorted(r["bytes_out"] > SIZE for r in records).count(True) == 3  # the uploads
