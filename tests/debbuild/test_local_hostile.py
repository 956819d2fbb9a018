"""The build cache and the local backend against what others, and builds, shaped.

The cache top may have been left open to other users or swapped for a link;
a dead build's work directory may hold what gc cannot remove; a layer's
record may be a FIFO or a link; a build's scripts may rewrite the session's
apt sources, read the user's terminal or make network attempts in every
phase. Each test is such an attempt and what the user sees afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from nsbuild.backends import BackendOptions, open_backend
from nsbuild.debbuild.cache import ANSWERS, DepCache
from nsbuild.debbuild.gc import gc
from nsbuild.debbuild.log import logs_root
from nsbuild.envs.errors import CacheNotPrivate
from nsbuild.envs.paths import apt_cache_root, builds_root, deps_root

from .conftest import Env, make_package
from .test_cache_gc import _base, _layer, home

__all__ = ["home"]  # a fixture, used by name

ROOTS: list[Callable[[], Path]] = [deps_root, builds_root, apt_cache_root, logs_root]


def _nsbuild(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nsbuild", *args],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


# -- every path into the cache checks the cache top -----------------------------


@pytest.mark.parametrize("root", ROOTS, ids=lambda f: f.__name__)
def test_each_cache_path_closes_an_open_cache_top(
    home: Path, root: Callable[[], Path], capfd: pytest.CaptureFixture[str]
) -> None:
    top = home / "cache" / "nsbuild"
    top.mkdir(parents=True)
    top.chmod(0o755)
    assert root().parent == top
    assert stat.S_IMODE(top.stat().st_mode) == 0o700
    notices = capfd.readouterr().err.splitlines()
    assert notices == [f"nsbuild: {top} was open to other users: made it private (mode 0700)"]


@pytest.mark.parametrize("root", ROOTS, ids=lambda f: f.__name__)
def test_each_cache_path_refuses_a_linked_cache_top(
    home: Path, root: Callable[[], Path]
) -> None:
    elsewhere = home / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    (home / "cache").mkdir()
    (home / "cache" / "nsbuild").symlink_to(elsewhere)
    with pytest.raises(CacheNotPrivate, match="symlink"):
        root()


def test_gc_repairs_an_open_cache_top_and_refuses_a_linked_one(home: Path) -> None:
    top = home / "cache" / "nsbuild"
    top.mkdir(parents=True)
    top.chmod(0o755)
    result = _nsbuild("gc")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"nsbuild: {top} was open to other users: made it private (mode 0700)"
    ]
    assert stat.S_IMODE(top.stat().st_mode) == 0o700

    shutil.rmtree(top)
    elsewhere = home / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    top.symlink_to(elsewhere)
    result = _nsbuild("gc")
    assert result.returncode != 0
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "symlink" in result.stderr
    assert list(elsewhere.iterdir()) == []


def test_errors_are_printed_escaped(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A message that quotes a name holding a terminal escape.
    cache = home / "cache\x1b]0;owned\x07"
    (cache).mkdir()
    (cache / "nsbuild").symlink_to(home)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    result = _nsbuild("gc")
    assert result.returncode != 0
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr
    assert "cache\\x1b]0;owned\\x07" in result.stderr


# -- gc goes on past what it cannot remove or read -----------------------------

# Run as `nsbuild gc` would, in a mount namespace of its own where a work
# directory of a dead build holds a mount point: remove_tree refuses it.
GC_WITH_A_MOUNT = r"""
import os, sys
from nsbuild.sandbox.syscalls import mount, unshare
uid, gid = os.getuid(), os.getgid()
unshare(0x10000000 | 0x00020000)  # CLONE_NEWUSER | CLONE_NEWNS
for name, text in (("uid_map", f"{uid} {uid} 1"), ("setgroups", "deny"),
                   ("gid_map", f"{gid} {gid} 1")):
    with open(f"/proc/self/{name}", "w") as f:
        f.write(text)
mount("none", "/", None, 0x40000 | 0x4000)  # MS_PRIVATE | MS_REC
mount("tmpfs", sys.argv[1], "tmpfs")
from nsbuild.cli.main import main
sys.exit(main(["gc"]))
"""


def test_gc_goes_past_a_work_dir_it_cannot_remove(home: Path) -> None:
    builds = home / "cache" / "nsbuild" / "builds"
    builds.mkdir(parents=True)
    builds.parent.chmod(0o700)
    # Owned by a process that is gone: pid 1 never started at time 1.
    stuck, next_one = builds / ".tmp-1-1-aaaa", builds / ".tmp-1-1-bbbb"
    (stuck / "mnt").mkdir(parents=True)
    (next_one / "tree").mkdir(parents=True)
    (next_one / "tree" / "file").write_text("left by a dead build\n")
    result = subprocess.run([sys.executable, "-c", GC_WITH_A_MOUNT, str(stuck / "mnt")],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, result.stderr
    assert f"removed work directory of a dead build {next_one}" in result.stdout.splitlines()
    errors = result.stderr.splitlines()
    assert len(errors) == 1 and "refusing to remove" in errors[0], result.stderr
    assert stuck.exists() and not next_one.exists()


def test_gc_goes_on_past_an_environment_it_cannot_read(home: Path) -> None:
    # A second environment whose tarball cannot be read: its layers are
    # kept, the others' are still judged.
    unreadable = home / "trixie.tar"
    unreadable.write_bytes(b"cannot be read")
    unreadable.chmod(0)
    chroot_d = home / "config" / "nsbuild" / "chroot.d"
    (chroot_d / "trixie").write_text(f"Name: trixie\nType: tarball\nPath: {unreadable}\n")
    current = _layer("a" * 64, _base(home))
    stale = _layer("b" * 64, "0" * 64)
    theirs = DepCache().staging()
    (theirs / "layer").mkdir()
    meta = {"environment": "trixie", "base": "1" * 64, "architecture": "amd64", "packages": []}
    kept = DepCache().commit(theirs, "c" * 64, meta)
    assert kept is not None
    errors: list[str] = []
    removed = gc(errors=errors)
    assert removed == [
        f"dependency layer {'b' * 16} (bookworm: its environment's base changed or is gone)"
    ]
    assert len(errors) == 1 and "'trixie'" in errors[0], errors
    assert current.exists() and not stale.exists() and kept.path.exists()


def test_gc_goes_past_a_layer_record_of_the_wrong_shape(home: Path) -> None:
    odd = _layer("a" * 64, "0" * 64)
    (odd / "layer.json").write_text("[1, 2]\n")
    stale = _layer("b" * 64, "0" * 64)
    errors: list[str] = []
    removed = gc(errors=errors)
    assert removed == [
        f"dependency layer {'b' * 16} (bookworm: its environment's base changed or is gone)"
    ]
    assert len(errors) == 1 and "a" * 16 in errors[0], errors
    assert odd.exists() and not stale.exists()


# -- layer records: regular files, no link followed ---------------------------


def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _to_dev_zero(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to("/dev/zero")


@pytest.mark.parametrize("plant", [_fifo, _to_dev_zero], ids=["fifo", "dev-zero"])
def test_a_layer_record_that_is_no_regular_file_is_ignored(
    home: Path, plant: Callable[[Path], None]
) -> None:
    layer = _layer("a" * 64, "0" * 64)
    plant(layer / "layer.json")
    cache = DepCache()
    cache.remember("1" * 64, "a" * 64)
    plant(cache.root / ANSWERS / ("2" * 64))
    # In a process of its own first: one that hangs fails the test, not the run.
    result = _nsbuild("gc", timeout=120)
    assert result.returncode in (0, 1), result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) <= 1, result.stderr
    assert cache.recall("2" * 64) is None
    with cache.use("a" * 64) as found:
        assert found is None
    assert cache.entries() == []


def test_a_layer_record_that_is_a_link_is_not_followed(home: Path) -> None:
    # A link to a record-shaped file elsewhere: not taken as a layer, and
    # marking the layer used does not touch the file it points to.
    layer = _layer("a" * 64, _base(home))
    elsewhere = home / "elsewhere.json"
    os.replace(layer / "layer.json", elsewhere)
    (layer / "layer.json").symlink_to(elsewhere)
    os.utime(elsewhere, (0, 0))
    cache = DepCache()
    with cache.use("a" * 64) as found:
        assert found is None
    assert elsewhere.stat().st_mtime == 0
    assert cache.entries() == []
    (cache.root / ANSWERS).mkdir()
    key_file = home / "key"
    key_file.write_text("a" * 64 + "\n")
    (cache.root / ANSWERS / ("1" * 64)).symlink_to(key_file)
    assert cache.recall("1" * 64) is None


def test_layer_records_are_private(home: Path) -> None:
    cache = DepCache()
    layer = _layer("a" * 64, _base(home))
    cache.remember("1" * 64, "a" * 64)
    assert stat.S_IMODE((layer / "layer.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((cache.root / ANSWERS / ("1" * 64)).stat().st_mode) == 0o600
    assert cache.recall("1" * 64) == "a" * 64
    assert [key for key, _, _ in cache.entries()] == ["a" * 64]


# -- the local backend --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.userns
def test_the_allowlist_is_not_what_the_session_made_of_its_apt_sources(
    bookworm_here: Env,
) -> None:
    line = "deb http://planted.invalid/debian bookworm main"
    plant = f"echo '{line}' > /etc/apt/sources.list.d/planted.list"
    with open_backend("local", BackendOptions(env="bookworm")) as b:
        status, text = b.check_output(["sh", "-c", plant])
        assert status == 0, text
        mirrors = b.mirrors()
    assert mirrors and not [m for m in mirrors if "planted.invalid" in m]


@pytest.mark.slow
@pytest.mark.userns
def test_network_attempts_of_every_run_are_counted_and_logged(
    bookworm_here: Env, tmp_path: Path
) -> None:
    log = tmp_path / "net.jsonl"
    with open_backend("local", BackendOptions(env="bookworm", net_log=str(log))) as b:
        b.check_output(["getent", "hosts", "deps-phase.invalid"], network="allow")
        b.check_output(["getent", "hosts", "build-phase.invalid"], network="none")
        summary = b.network_summary()
    assert summary is not None and summary.attempts >= 2
    line = summary.denied_line() or ""
    assert "build-phase.invalid" in line and "deps-phase.invalid" in line
    hosts = {json.loads(r)["host"] for r in log.read_text().splitlines()}
    assert {"deps-phase.invalid", "build-phase.invalid"} <= hosts


@pytest.mark.slow
@pytest.mark.userns
def test_a_run_does_not_read_nsbuilds_own_stdin(bookworm_here: Env) -> None:
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"secret typed by the user\n")
    os.close(write_fd)
    saved = os.dup(0)
    os.dup2(read_fd, 0)
    os.close(read_fd)
    try:
        with open_backend("local", BackendOptions(env="bookworm")) as b:
            status, text = b.check_output(["sh", "-c", "echo \"read: [$(cat)]\""])
    finally:
        os.dup2(saved, 0)
        os.close(saved)
    assert status == 0, text
    assert text.strip() == "read: []"


@pytest.mark.slow
@pytest.mark.userns
def test_a_build_does_not_read_the_users_terminal(bookworm: Env, tmp_path: Path) -> None:
    tree = make_package(tmp_path, "nsb-stdin", build='echo "stdin held: [$$(cat)]"')
    out = tmp_path / "out"
    out.mkdir()
    proc = bookworm.popen("build", "--env", "bookworm", "--out", str(out), str(tree),
                          stdin=subprocess.PIPE)  # fmt: skip
    _, err = proc.communicate("secret typed by the user\n", timeout=900)
    assert proc.returncode == 0, err
    log = (out / "nsb-stdin_1.0_amd64.build").read_text()
    assert "stdin held: []" in log
    assert "secret" not in log
