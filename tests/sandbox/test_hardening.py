"""Hardening before exec: no inherited fds, no_new_privs, no capabilities for
non-root users inside, setuid binaries do not elevate."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from sandbox_helpers import explain, nsbuild, nsbuild_argv, ok, py
from waiting import HANG_GUARD

pytestmark = pytest.mark.userns

CAPS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def status_fields(text: str) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def test_only_fds_0_1_2_are_inherited(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("secret")
    f = os.open(secret, os.O_RDONLY)
    r_end, w_end = os.pipe()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    leaked = [f, r_end, w_end, sock.fileno()]
    try:
        for fd in leaked:
            os.set_inheritable(fd, True)
        code = """
        import os
        fds = sorted(int(n) for n in os.listdir("/proc/self/fd"))
        print(*fds)
        for fd in fds:
            try:
                print(fd, os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
        """
        r = subprocess.run(nsbuild_argv("--", *py(code)), cwd=tmp_path, pass_fds=leaked,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=HANG_GUARD, check=False)
        assert r.returncode == 0, explain(r)
        fds = [int(x) for x in r.stdout.splitlines()[0].split()]
        # 0, 1, 2 and the one listdir() itself holds open.
        assert fds[:3] == [0, 1, 2] and len(fds) <= 4, r.stdout
        assert str(secret) not in r.stdout and "socket:" not in r.stdout, r.stdout
    finally:
        for fd in (f, r_end, w_end):
            os.close(fd)
        sock.close()


@pytest.mark.parametrize("user", [None, "1000:1000"])
def test_no_new_privs_is_set(tmp_path: Path, user: str | None) -> None:
    opts = ["--chdir", "/", "--user", user] if user else []
    r = ok(nsbuild(*opts, "--", "cat", "/proc/self/status", cwd=tmp_path))
    assert status_fields(r.stdout)["NoNewPrivs"] == "1"


@pytest.mark.parametrize("user", ["1000:1000", "nobody"])
def test_non_root_user_has_no_capabilities(tmp_path: Path, user: str) -> None:
    r = ok(nsbuild("--chdir", "/", "--user", user, "--", "cat", "/proc/self/status", cwd=tmp_path))
    fields = status_fields(r.stdout)
    assert {c: int(fields[c], 16) for c in CAPS} == dict.fromkeys(CAPS, 0), r.stdout


def test_setuid_binary_does_not_elevate(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    # A setuid copy of id(1) owned by the caller, who is root inside. It is
    # made on the host: inside, a bind others may reach refuses setuid modes
    # (tests/sandbox/test_setid.py).
    shutil.copy("/usr/bin/id", bindir / "id")
    (bindir / "id").chmod(0o4755)
    r = ok(nsbuild("--bind", f"{bindir}:/x", "--", "stat", "-c", "%a:%u", "/x/id", cwd=tmp_path))
    assert r.stdout.strip() == "4755:0"
    assert os.stat(bindir / "id").st_mode & stat.S_ISUID
    # Run by an unprivileged user inside, it does not become root.
    r = ok(nsbuild("--bind", f"{bindir}:/x", "--chdir", "/", "--user", "1000:1000", "--",
                   "/x/id", "-u",
                   cwd=tmp_path))
    assert r.stdout.strip() == "1000"
    r = ok(nsbuild("--bind", f"{bindir}:/x", "--", "setpriv", "--reuid", "1000", "--regid",
                   "1000", "--clear-groups", "/x/id", "-u", cwd=tmp_path))
    assert r.stdout.strip() == "1000"
