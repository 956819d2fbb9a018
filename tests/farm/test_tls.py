"""A master on TLS (`farm master --tls`): its own certificate, made by
openssl, pinned by the REST client and by workers. A peer with any other
certificate, on the master's port, gets no login and sends no command.
Real openssl, real TLS servers on 127.0.0.1."""

from __future__ import annotations

import http.server
import os
import socket
import ssl
import subprocess
import sys
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


# -- a farm on TLS, made with the commands --


def _nsbuild(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nsbuild", *args], env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)  # fmt: skip


@pytest.fixture
def user(tmp_path: Path) -> dict[str, str]:
    """A user's nsbuild config with the bookworm test environment."""
    from inputs import bookworm_config

    bookworm_config(tmp_path / "config")
    return {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"),
            "XDG_CACHE_HOME": str(tmp_path / "cache")}  # fmt: skip


class _FakeMaster:
    """A TLS server on the worker port with a certificate of its own: what
    anyone could run there. It counts handshakes the client ended (its
    alert: it does not trust the certificate) and those it completed."""

    def __init__(self, cert: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, cert.parent / tls.KEY)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = int(self.sock.getsockname()[1])
        self.refused = 0
        self.completed = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                try:
                    with self.ctx.wrap_socket(conn, server_side=True) as s:
                        # TLS 1.3: the client's Finished, or its alert, comes now.
                        s.recv(1)
                        self.completed += 1
                except ssl.SSLError:
                    self.refused += 1
                except OSError:
                    pass


def test_a_worker_pins_the_masters_certificate(user: dict[str, str], tmp_path: Path) -> None:
    from waiting import wait_for

    from .conftest import free_port

    master_dir, w1, w2 = tmp_path / "master", tmp_path / "w1", tmp_path / "w2"
    www, pb = free_port(), free_port()
    started: list[Path] = []
    try:
        made = _nsbuild(user, "farm", "master", str(master_dir), "--tls",
                        "--port-www", str(www), "--port-pb", str(pb))  # fmt: skip
        assert made.returncode == 0, made.stderr
        started.append(master_dir)
        assert made.stdout.strip() == f"https://127.0.0.1:{www}/"
        cert = master_dir / tls.TLS_DIR / tls.CERT
        # The master of this machine: its certificate is taken from its folder.
        proc = _nsbuild(user, "farm", "worker", str(w1), "--master", f"127.0.0.1:{pb}",
                        "--name", "w1")  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        started.append(w1)
        assert (w1 / tls.WORKER_CERT).read_text() == tls.read_cert(cert)
        rest = Rest(f"https://127.0.0.1:{www}/", cert=tls.read_cert(cert))
        wait_for(lambda: [w["name"] for w in rest.items("workers", "workers")
                          if w.get("connected_to")] == ["w1"],
                 "the worker connected over TLS", interval=0.5)  # fmt: skip
        status = _nsbuild(user, "farm", "status")
        assert status.returncode == 0 and "no builds queued" in status.stdout, status.stderr

        # Another TLS server on a worker's master port: the worker ends every
        # handshake, so the PB login (which comes after it) never happens.
        fake = _FakeMaster(_certificate(tmp_path / "fake"))
        started.append(w2)
        proc = _nsbuild(user, "farm", "worker", str(w2), "--master",
                        f"127.0.0.1:{fake.port}", "--name", "w2",
                        "--master-cert", str(cert))  # fmt: skip
        assert proc.returncode != 0 and "start failed" in proc.stderr, proc.stderr
        wait_for(lambda: fake.refused >= 2, "the worker refused the fake master twice")
        assert fake.completed == 0
    finally:
        for folder in reversed(started):
            _nsbuild(user, "farm", "stop", str(folder))


def test_a_master_elsewhere_needs_its_certificate(user: dict[str, str], tmp_path: Path) -> None:
    proc = _nsbuild(user, "farm", "worker", str(tmp_path / "w"), "--master",
                    "build-master.invalid:9989", "--name", "w", "--no-start")  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--master-cert" in proc.stderr, proc.stderr
    assert not (tmp_path / "w").exists()
