"""autopkgtest-virt-nsbuild keeps a testbed's writes on a bounded tmpfs (--tmpfs SIZE).

What a client sees: `df /` in the testbed is the tmpfs and its bound; nothing
of what the testbed writes lands in its session directory on disk; a full
tmpfs fails the command that filled it with one line that says so; revert
gives a pristine testbed. `--no-tmpfs` keeps the writes on disk, in the
session, as before.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from virt_helpers import Env, run

from nsbuild.backends.virtproto import VirtServer
from nsbuild.sandbox import IdMap, Overlay, Proc, Sandbox, SpecError, Tmpfs

pytestmark = pytest.mark.userns


def _server(*args: str) -> VirtServer:
    return VirtServer(["autopkgtest-virt-nsbuild", "--no-apt-cache", *args, "bookworm"])


@pytest.fixture
def small(server_env: Env) -> Iterator[VirtServer]:
    srv = _server("--tmpfs", "64M")
    try:
        yield srv
    finally:
        srv.stop()


def _exec(cmd: list[str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cmd, *argv], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)  # fmt: skip


def _upper(server_env: Env) -> Path:
    """The upper directory of the one open testbed's session, on the host."""
    sessions = server_env.cache / "nsbuild" / "sessions"
    (session,) = [d for d in sessions.iterdir() if not d.name.startswith(".")]
    return session / "upper"


def test_writes_land_on_a_bounded_tmpfs_and_revert_drops_them(
    small: VirtServer, server_env: Env
) -> None:
    small.open()
    ex = small.execute_command()
    size = _exec(ex, "df", "-B1M", "--output=size", "/").stdout.split()[-1]
    assert size == "64", "the testbed's root should report the 64M tmpfs"
    assert _exec(ex, "sh", "-c", "echo kept > /etc/marker && rm /etc/os-release").returncode == 0
    assert _exec(ex, "cat", "/etc/marker").stdout == "kept\n"
    # Nothing of it on disk: the session's own upper directory stays empty.
    assert os.listdir(_upper(server_env)) == []

    full = _exec(ex, "sh", "-c", "head -c 80M /dev/zero > /var/big")
    assert full.returncode != 0
    assert "No space left on device" in full.stderr
    lines = [ln for ln in full.stderr.splitlines() if ln.startswith("autopkgtest-virt-nsbuild:")]
    assert len(lines) == 1 and "tmpfs is full" in lines[0] and "--tmpfs 64M" in lines[0]

    small.revert()
    ex = small.execute_command()
    pristine = _exec(ex, "sh", "-c", "ls /etc/marker /var/big; cat /etc/os-release")
    assert "No such file" in pristine.stderr and "/etc/marker" in pristine.stderr
    assert "Debian" in pristine.stdout
    assert _exec(ex, "df", "-B1M", "--output=used", "/").stdout.split()[-1] in ("0", "1")
    small.close()


def test_no_tmpfs_keeps_the_writes_in_the_session(server_env: Env) -> None:
    srv = _server("--no-tmpfs")
    try:
        srv.open()
        ex = srv.execute_command()
        assert _exec(ex, "sh", "-c", "echo on-disk > /etc/marker").returncode == 0
        upper = _upper(server_env)
        assert (upper / "etc" / "marker").read_text() == "on-disk\n"
        srv.close()
    finally:
        srv.stop()


def test_a_bad_size_is_refused_in_one_line(server_env: Env) -> None:
    done = run(server_env, ["autopkgtest-virt-nsbuild", "--tmpfs", "lots", "bookworm"])
    assert done.returncode == 2
    assert done.stdout == ""
    assert "--tmpfs 'lots': expected a size such as 512M, 8G or 50%" in done.stderr


def test_an_overlay_has_either_an_upper_directory_or_a_tmpfs() -> None:
    idmap = IdMap((), (), helper=False)
    for root in (Overlay(("/l",), "", "", "/"), Overlay(("/l",), "/u", "/w", "/", tmpfs_size="1G")):
        with pytest.raises(SpecError, match="either upper and work, or tmpfs_size"):
            Sandbox(argv=("true",), idmap=idmap, root=root, mounts=(Proc(),)).validate()


def test_a_tmpfs_size_cannot_carry_more_options() -> None:
    # The size goes into tmpfs's option string.
    idmap = IdMap((), (), helper=False)
    for root in (Overlay(("/l",), "", "", "/", tmpfs_size="1G,nr_inodes=1"),
                 Tmpfs("/", size="1G,uid=0"), Tmpfs("/", size="0")):  # 0: no limit
        with pytest.raises(SpecError, match="expected a size such as 512M"):
            Sandbox(argv=("true",), idmap=idmap, root=root, mounts=(Proc(),)).validate()
    Sandbox(argv=("true",), idmap=idmap, root=Tmpfs("/", size="50%"), mounts=(Proc(),)).validate()
