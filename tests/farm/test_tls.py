"""A master on TLS (`farm master --tls`): its own certificate, made by
openssl, pinned by the REST client and by workers. A peer with any other
certificate, on the master's port, gets no login and sends no command.
Real openssl, real TLS servers on 127.0.0.1."""

from __future__ import annotations

import http.server
import os
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nsbuild.farm import tls
from nsbuild.farm.errors import FarmError
from nsbuild.farm.rest import Rest


def _certificate(folder: Path) -> Path:
    folder.mkdir(mode=0o700)
    return tls.make(folder)


@pytest.fixture
def two(tmp_path: Path) -> tuple[Path, Path]:
    """The master's certificate, and another's."""
    return _certificate(tmp_path / "master"), _certificate(tmp_path / "other")


class _Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"masters": [{"name": "m"}]}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


def _https(cert: Path) -> Iterator[str]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Answer)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, cert.parent / tls.KEY)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def served(two: tuple[Path, Path]) -> Iterator[str]:
    """A web server showing the master's certificate."""
    yield from _https(two[0])


def test_the_certificate_is_made_by_openssl_and_its_key_is_private(
    two: tuple[Path, Path],
) -> None:
    cert, other = two
    key = cert.parent / tls.KEY
    assert key.stat().st_mode & 0o777 == 0o600
    assert cert.parent.stat().st_mode & 0o777 == 0o700
    shown = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", cert],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    pem = tls.read_cert(cert)
    assert shown.strip().endswith(tls.fingerprint(pem))
    assert tls.fingerprint(pem) != tls.fingerprint(tls.read_cert(other))
    # Made once: a second call keeps the master's identity.
    assert tls.make(cert.parent.parent) == cert and tls.read_cert(cert) == pem


def test_what_is_not_a_certificate_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "cert.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    with pytest.raises(FarmError, match="not a PEM certificate"):
        tls.read_cert(bad)
    bad.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n"
                   "-----END CERTIFICATE-----\n")  # fmt: skip
    with pytest.raises(FarmError, match="not a PEM certificate"):
        tls.read_cert(bad)
    fifo = tmp_path / "fifo.pem"
    os.mkfifo(fifo)
    with pytest.raises(FarmError, match="cannot read"):
        tls.read_cert(fifo)  # refused, not waited on


def test_the_rest_client_trusts_the_pinned_certificate_alone(
    two: tuple[Path, Path], served: str
) -> None:
    cert, other = two
    assert Rest(served, cert=tls.read_cert(cert)).answers()
    assert Rest(served, cert=tls.read_cert(cert)).get("masters")["masters"][0]["name"] == "m"
    # Another certificate: no answer is taken, and the error says why in a line.
    assert not Rest(served, cert=tls.read_cert(other)).answers()
    with pytest.raises(FarmError, match="certificate verify failed") as e:
        Rest(served, cert=tls.read_cert(other)).get("masters")
    assert "\n" not in str(e.value)
    # Nor does the system's list of authorities vouch for a self-signed one.
    with pytest.raises(FarmError, match="certificate verify failed"):
        Rest(served).get("masters")


def test_a_certificate_is_refused_for_plain_http(two: tuple[Path, Path]) -> None:
    with pytest.raises(FarmError, match="https"):
        Rest("http://127.0.0.1:9/", cert=tls.read_cert(two[0]))
