"""A master's own certificate, pinned by its workers and by `farm submit`.

A PB login proves the worker to the master, never the master to the worker:
whatever answers on the master's port is sent the login and then runs
commands as the worker's user. Across machines the only proof is TLS with a
certificate the worker holds beforehand. `farm master --tls` makes a
self-signed one (openssl, from Debian's openssl package, so no Python code
writes keys); the worker and the REST client trust that certificate alone,
not the system's authorities, and not a host name: it is pinned, copied to
them by the user.
"""

from __future__ import annotations

import hashlib
import ssl
import subprocess
from pathlib import Path

from nsbuild.farm.errors import FarmError
from nsbuild.userfile import NotSmallFile, read_small

TLS_DIR = "tls"  # in a master's folder
KEY = "key.pem"  # 0600
CERT = "cert.pem"  # what workers and submitters copy
WORKER_CERT = "master-cert.pem"  # in a worker's folder: the master's, pinned
CERT_LIMIT = 64 << 10
DAYS = 3650


def make(master_dir: Path) -> Path:
    """The master's key and self-signed certificate; the certificate's path."""
    folder = master_dir / TLS_DIR
    folder.mkdir(mode=0o700, exist_ok=True)
    key, cert = folder / KEY, folder / CERT
    if cert.is_file() and key.is_file():
        return cert
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec",
                        "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", str(DAYS),
                        "-subj", "/CN=nsbuild farm master", "-keyout", str(key),
                        "-out", str(cert)],
                       check=True, capture_output=True, stdin=subprocess.DEVNULL)  # fmt: skip
    except FileNotFoundError:
        raise FarmError("--tls needs the openssl command (apt install openssl)") from None
    except subprocess.CalledProcessError as e:
        said = e.stderr.decode(errors="replace").strip().splitlines()
        raise FarmError(f"openssl could not make the master's certificate: "
                        f"{said[-1] if said else e.returncode}") from None  # fmt: skip
    key.chmod(0o600)
    return cert


def read_cert(path: Path) -> str:
    """One PEM certificate, read bounded and checked; FarmError if not."""
    try:
        text = read_small(path, CERT_LIMIT).decode("ascii")
        der = ssl.PEM_cert_to_DER_cert(text)
    except OSError as e:
        raise FarmError(f"cannot read the master's certificate {path}: {e.strerror}") from None
    except NotSmallFile as e:
        raise FarmError(f"cannot read the master's certificate {path}: {e}") from None
    except (ValueError, UnicodeDecodeError):
        raise FarmError(f"{path}: not a PEM certificate") from None
    pem = ssl.DER_cert_to_PEM_cert(der)
    try:
        client_context(pem)  # base64 of anything passes the lines above
    except ssl.SSLError:
        raise FarmError(f"{path}: not a PEM certificate") from None
    return pem


def fingerprint(pem: str) -> str:
    """SHA-256 of the certificate, as `openssl x509 -fingerprint -sha256` shows it."""
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def client_context(pem: str) -> ssl.SSLContext:
    """For the REST client: this certificate is the only one trusted. The
    host name is not checked: the certificate is pinned, and names none."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=pem)
    return ctx


def strport(kind_port: str, master_dir: Path) -> str:
    """A twisted server description on TLS with the master's key, for
    `tcp:PORT:interface=ADDR` without TLS."""
    def quoted(p: Path) -> str:
        return str(p).replace("\\", "\\\\").replace(":", "\\:")

    folder = master_dir / TLS_DIR
    rest = kind_port.removeprefix("tcp:")
    return f"ssl:{rest}:privateKey={quoted(folder / KEY)}:certKey={quoted(folder / CERT)}"


def master_cert(master_dir: Path, on: bool) -> str | None:
    """The certificate of a master on this machine, if it is on TLS."""
    return read_cert(master_dir / TLS_DIR / CERT) if on else None
