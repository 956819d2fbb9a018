"""autopkgtest-virt-nsbuild run by host root, with its defaults.

Root's sandboxes run on root's subordinate range, never as host root: the
sandbox's root must reach the session folder the server made (mode 0700,
no other user of the host may) to mount the testbed's overlays from it. With
the defaults (the environment's apt cache, the mirrors reachable) a testbed
opens, apt updates and installs, and a later testbed finds the lists the
first one fetched; without the tmpfs the testbed's writes land in the
session folder, and the testbed opens as well. Under a cache folder closed
to the subordinate ids the sessions copy their environment, and a testbed
still opens and installs, its apt working in the session alone.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from inputs import tarball
from virt_helpers import SYSTEM_PATH, VENV_BIN

from nsbuild.backends.virtproto import VirtServer

pytestmark = pytest.mark.root

LISTS = "/var/lib/apt/lists"
MAIN_PACKAGES = "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages"
APT = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-o", "APT::Install-Recommends=false"]


def _root_home(monkeypatch: pytest.MonkeyPatch, cache_mode: int) -> Path:
    """Root's own config and cache (XDG_CACHE_HOME of `cache_mode`), with the
    test tarball as `bookworm`. Not pytest's tmp_path: for root that is below
    a 0700 folder."""
    d = Path(tempfile.mkdtemp(prefix="nsbuild-root-virt-", dir="/var/tmp"))
    d.chmod(0o755)
    chroot_d = d / "config" / "nsbuild" / "chroot.d"
    chroot_d.mkdir(parents=True)
    (chroot_d / "bookworm").write_text(
        f"Name: bookworm\nType: tarball\nPath: {tarball()}\nSuite: bookworm\n"
        "Architecture: amd64\nMirror: http://deb.debian.org/debian\n"
    )
    (d / "cache").mkdir()
    (d / "cache").chmod(cache_mode)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(d / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(d / "cache"))
    monkeypatch.setenv("PATH", f"{VENV_BIN}:{SYSTEM_PATH}")
    return d


def _remove(d: Path) -> None:
    from nsbuild.envs.remove import remove_tree

    remove_tree(d / "cache")
    shutil.rmtree(d)


@pytest.fixture
def root_xdg(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An XDG_CACHE_HOME the subordinate ids may walk (mode 0755)."""
    d = _root_home(monkeypatch, 0o755)
    yield d
    _remove(d)


@pytest.fixture
def closed_xdg(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An XDG_CACHE_HOME of root's alone (mode 0700): the subordinate ids
    cannot walk into the cache, so sessions copy their environment."""
    d = _root_home(monkeypatch, 0o700)
    yield d
    _remove(d)


def _run(cmd: list[str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cmd, *argv], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=600)  # fmt: skip


def _ok(cmd: list[str], *argv: str) -> str:
    done = _run(cmd, *argv)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _fetched_indexes(apt_output: str) -> list[str]:
    return [ln for ln in apt_output.splitlines()
            if re.match(r"Get:\d+ ", ln) and "Packages" in ln]  # fmt: skip


def test_roots_testbed_with_the_defaults_runs_apt_and_keeps_its_lists(root_xdg: Path) -> None:
    cache = root_xdg / "cache" / "nsbuild" / "apt" / "bookworm"
    srv = VirtServer(["autopkgtest-virt-nsbuild", "bookworm"])
    try:
        srv.open()
        ex = srv.execute_command()
        assert _ok(ex, "id", "-u").strip() == "0"
        # The server fetched the lists at open (the cache was cold).
        _ok(ex, *APT, "install", "-y", "m4")
        assert _run(ex, "m4", "--version").returncode == 0
        # The testbed's writes stay its own: the cache is not writable inside.
        _ok(ex, "sh", "-c", f"echo forged > {LISTS}/forged_Packages")

        srv.revert()  # what apt fetched, once checked, goes into the cache
        assert (cache / "apt-lists" / MAIN_PACKAGES).is_file()
        ex = srv.execute_command()
        assert _run(ex, "dpkg", "-s", "m4").returncode != 0  # pristine again
        assert _run(ex, "test", "-e", f"{LISTS}/forged_Packages").returncode != 0
        assert "Candidate: (none)" not in _ok(ex, "apt-cache", "policy", "m4")
        warm = _run(ex, *APT, "update")
        assert warm.returncode == 0, warm.stdout + warm.stderr
        assert not _fetched_indexes(warm.stdout), warm.stdout
        # The cached lists are root's inside, as apt made them: it can hand
        # them to _apt and back (no "chown ... failed" warnings).
        assert "Operation not permitted" not in warm.stderr, warm.stderr
        owners = _ok(ex, "sh", "-c", f"stat -c %u {LISTS}/*_InRelease {LISTS}/*_Packages")
        assert set(owners.split()) == {"0"}, owners
        srv.close()
    finally:
        srv.stop()
    assert list((cache / "apt-archives").glob("m4_*.deb"))
    assert not (cache / "apt-lists" / "forged_Packages").exists()
    # Nothing of the session is left behind for gc.
    assert os.listdir(root_xdg / "cache" / "nsbuild" / "sessions") == []


def test_roots_testbed_without_the_tmpfs_writes_in_its_session(root_xdg: Path) -> None:
    srv = VirtServer(["autopkgtest-virt-nsbuild", "--no-tmpfs", "bookworm"])
    try:
        srv.open()
        ex = srv.execute_command()
        _ok(ex, "sh", "-c", "echo made > /etc/made && echo list > /var/lib/apt/lists/made")
        assert _ok(ex, "cat", "/etc/made", "/var/lib/apt/lists/made") == "made\nlist\n"
        # Still no other user of the host reaches the session (its downtmp is
        # open to every user of the testbed).
        sessions = root_xdg / "cache" / "nsbuild" / "sessions"
        (session,) = os.listdir(sessions)
        assert (sessions / session).stat().st_mode & 0o007 == 0
        srv.revert()
        ex = srv.execute_command()
        assert _run(ex, "test", "-e", "/etc/made").returncode != 0
        srv.close()
    finally:
        srv.stop()


def test_roots_testbed_under_a_closed_cache_folder_opens_and_installs(closed_xdg: Path) -> None:
    srv = VirtServer(["autopkgtest-virt-nsbuild", "bookworm"])
    try:
        srv.open()
        ex = srv.execute_command()
        _ok(ex, *APT, "install", "-y", "m4")
        assert _run(ex, "m4", "--version").returncode == 0
        srv.revert()
        assert _run(srv.execute_command(), "dpkg", "-s", "m4").returncode != 0
        srv.close()
    finally:
        srv.stop()
