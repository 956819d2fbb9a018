"""Environments used by host root: the sandbox runs on root's subordinate
range, so everything it must write (the store's unpacked base, upper and work
dirs) is handed to that range, and root's cache lives where those ids can
reach it (/var/cache/nsbuild, not /root/.cache)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from envs_helpers import chroot_d

pytestmark = [pytest.mark.root, pytest.mark.slow]



def test_root_runs_an_environment_on_its_subordinate_range(
    root_xdg: Path, bookworm_tarball: Path
) -> None:
    (chroot_d(root_xdg) / "bookworm").write_text(f"Name: bookworm\nPath: {bookworm_tarball}\n")
    r = subprocess.run(
        [sys.executable, "-m", "nsbuild", "run", "--env", "bookworm", "--",
         "sh", "-c", "id -u; echo made > /etc/made && cat /etc/made && stat -c %u /etc/made"],
        cwd=root_xdg, capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "made", "0"]
    # On the host, the store belongs to root's range, never to root itself.
    bases = root_xdg / "cache" / "nsbuild" / "store" / "bases"
    (base,) = os.listdir(bases)
    assert os.stat(bases / base / "root" / "etc").st_uid != 0


def test_roots_default_cache_is_the_system_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from nsbuild.envs.paths import cache_dir

    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == Path("/var/cache/nsbuild")


# -- root's cache folders and the overlay probe ---------------------------------------

ROOT_FS = ["awk", '$2 == "/" { print $3 }', "/proc/mounts"]


@pytest.fixture
def root_home(monkeypatch: pytest.MonkeyPatch, bookworm_tarball: Path) -> Iterator[Path]:
    """Root's config, with the test tarball as `bookworm`, and XDG_CACHE_HOME
    naming `cache`, a folder not made yet, in a folder every user can walk."""
    d = Path(tempfile.mkdtemp(prefix="nsbuild-root-cache-", dir="/var/tmp"))
    d.chmod(0o755)
    (chroot_d(d) / "bookworm").write_text(f"Name: bookworm\nPath: {bookworm_tarball}\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(d / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(d / "cache"))
    monkeypatch.delenv("NSBUILD_NO_OVERLAY", raising=False)
    yield d
    from nsbuild.envs.remove import remove_tree

    if (d / "cache").exists():
        remove_tree(d / "cache")
    shutil.rmtree(d)


def _root_fs(d: Path) -> subprocess.CompletedProcess[str]:
    """`nsbuild run` as root, printing what the session's root is mounted as."""
    r = subprocess.run(
        [sys.executable, "-m", "nsbuild", "run", "--env", "bookworm", "--", *ROOT_FS],
        cwd=d, capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r


def _sandbox_uid() -> int:
    from nsbuild.envs.owner import sandbox_root_ids

    ids = sandbox_root_ids()
    assert ids is not None, "root needs a subordinate range for these tests"
    return ids[0]


def test_roots_missing_cache_home_is_made_walkable_and_sessions_use_overlays(
    root_home: Path,
) -> None:
    r = _root_fs(root_home)
    assert r.stdout.split() == ["overlay"], r.stdout
    assert "warning" not in r.stderr, r.stderr
    # Made by nsbuild: walkable by root's sandboxes, listed by no one else...
    made = os.stat(root_home / "cache")
    assert (made.st_uid, stat.S_IMODE(made.st_mode)) == (0, 0o711)
    # ...and the cache itself stays its sandboxes' alone.
    cache = os.stat(root_home / "cache" / "nsbuild")
    assert (cache.st_uid, stat.S_IMODE(cache.st_mode)) == (_sandbox_uid(), 0o700)
    other = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--",
         "ls", str(root_home / "cache" / "nsbuild" / "store")],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert other.returncode != 0 and "Permission denied" in other.stderr, other


def test_roots_closed_cache_home_is_named_once_and_not_remembered(root_home: Path) -> None:
    home = root_home / "cache"
    home.mkdir()
    home.chmod(0o711)
    assert _root_fs(root_home).stdout.split() == ["overlay"]
    home.chmod(0o700)
    r = _root_fs(root_home)
    # The session copied its environment: its root is no overlay.
    assert r.stdout.split() != ["overlay"], r.stdout
    warnings = [line for line in r.stderr.splitlines() if "warning" in line]
    assert warnings == [
        f"nsbuild: warning: root's sandboxes (uid {_sandbox_uid()}) cannot walk into "
        f"{home} (mode 0700): sessions fall back to a full copy of their environment; "
        f"chmod o+x {home}, or leave XDG_CACHE_HOME unset (root's cache is "
        "/var/cache/nsbuild)"
    ], r.stderr
    # Once walkable again, sessions use overlays at once: nothing remembered the refusal.
    home.chmod(0o711)
    r = _root_fs(root_home)
    assert r.stdout.split() == ["overlay"], r.stdout
    assert "warning" not in r.stderr, r.stderr


def test_a_closed_folder_is_said_once_per_process(
    root_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nsbuild.envs.overlay import PROBE, overlay_usable
    from nsbuild.envs.paths import Layout

    (root_home / "cache").mkdir(mode=0o700)
    layout = Layout.default()
    assert [overlay_usable(layout), overlay_usable(layout)] == [False, False]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"cannot walk into {root_home / 'cache'} (mode 0700)" in err[0], err
    assert not (layout.root / PROBE).exists()


def test_a_closed_folder_inside_the_cache_is_named_without_the_cache_home_advice(
    root_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nsbuild.envs.overlay import overlay_usable
    from nsbuild.envs.paths import Layout

    layout = Layout.default()
    layout.sessions.mkdir(mode=0o700)  # as under root's umask 077
    layout.sessions.chmod(0o700)
    assert not overlay_usable(layout)
    (err,) = capsys.readouterr().err.splitlines()
    assert err.endswith(
        f"cannot walk into {layout.sessions} (mode 0700): sessions fall back to a full "
        f"copy of their environment; chmod o+x {layout.sessions}"
    ), err


def test_a_refusal_remembered_for_want_of_access_is_probed_again(root_home: Path) -> None:
    """A record written when a closed folder made the probe fail (EACCES)
    would otherwise outlive the chmod that fixed it, as long as the kernel."""
    from nsbuild.envs.overlay import PROBE, overlay_usable
    from nsbuild.envs.paths import Layout
    from nsbuild.envs.records import write_record

    (root_home / "cache").mkdir(mode=0o711)
    layout = Layout.default()
    layout.ensure()
    key = {"kernel": os.uname().release, "dev": os.stat(layout.sessions).st_dev}
    why = "mount overlay root /newroot: EACCES (Permission denied)"
    write_record(layout.root / PROBE, {"key": key, "usable": False, "why": why})
    assert overlay_usable(layout)


def test_a_testbed_that_copied_its_environment_takes_no_snapshot_of_the_apt_cache(
    root_home: Path,
) -> None:
    """Such a testbed cannot mount the apt cache's overlays: linking the
    cached files into its session on every open would cost for nothing."""
    from nsbuild.backends.virtproto import VirtServer
    from nsbuild.envs.paths import apt_cache_dir

    (root_home / "cache").mkdir(mode=0o700)
    lists = apt_cache_dir("bookworm") / "apt-lists"
    cached = lists / "deb.debian.org_debian_dists_bookworm_InRelease"
    cached.parent.mkdir(parents=True)
    cached.write_text("cached\n")
    srv = VirtServer(["autopkgtest-virt-nsbuild", "bookworm"])
    try:
        srv.open()
        assert os.stat(cached).st_nlink == 1
        assert os.stat(cached).st_uid == 0
        srv.close()
    finally:
        srv.stop()
    assert cached.read_text() == "cached\n"
