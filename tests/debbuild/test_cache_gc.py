"""`nsbuild.debbuild.gc.gc`: dependency layers and build apt caches are trimmed,
never while a build uses them."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nsbuild.debbuild.cache import DepCache
from nsbuild.debbuild.gc import gc


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private XDG home with one environment, bookworm, whose tarball is a
    small file: its sha256 is the environment's current base."""
    for var, sub in (("XDG_CONFIG_HOME", "config"), ("XDG_CACHE_HOME", "cache")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    chroot_d = tmp_path / "config" / "nsbuild" / "chroot.d"
    chroot_d.mkdir(parents=True)
    tarball = tmp_path / "bookworm.tar"
    tarball.write_bytes(b"not really a tarball, only hashed")
    (chroot_d / "bookworm").write_text(f"Name: bookworm\nType: tarball\nPath: {tarball}\n")
    return tmp_path


def _base(home: Path) -> str:
    return hashlib.sha256((home / "bookworm.tar").read_bytes()).hexdigest()


def _layer(key: str, base: str, age_days: float = 0) -> Path:
    cache = DepCache()
    staging = cache.staging()
    (staging / "layer" / "usr").mkdir(parents=True)
    meta = {"environment": "bookworm", "base": base, "architecture": "amd64", "packages": []}
    assert cache.commit(staging, key, meta) is not None
    used = time.time() - age_days * 86400
    os.utime(cache.root / key / "layer.json", (used, used))
    return cache.root / key


def test_gc_keeps_current_layers_and_removes_stale_ones(home: Path) -> None:
    current = _layer("a" * 64, _base(home))
    old_base = _layer("b" * 64, "0" * 64)
    unused = _layer("c" * 64, _base(home), age_days=40)
    errors: list[str] = []

    stale = [
        f"dependency layer {'b' * 16} (bookworm: its environment's base changed or is gone)",
        f"dependency layer {'c' * 16} (bookworm: unused for 40 days)",
    ]
    dry = gc(dry_run=True, errors=errors)
    assert sorted(dry) == stale
    assert old_base.exists() and unused.exists()
    # As the user reads it: what would go, and nothing said to be gone.
    cli = subprocess.run([sys.executable, "-m", "nsbuild", "gc", "--dry-run"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert cli.stdout.splitlines() == [f"would remove {line}" for line in dry]
    assert old_base.exists() and unused.exists()

    removed = gc(errors=errors)
    assert errors == []
    assert sorted(removed) == stale
    assert current.exists() and not old_base.exists() and not unused.exists()
    # The age limit is the caller's.
    two_days_ago = time.time() - 2 * 86400
    os.utime(current / "layer.json", (two_days_ago, two_days_ago))
    assert gc(max_age_days=1) == [f"dependency layer {'a' * 16} (bookworm: unused for 2 days)"]
    assert not current.exists()


def test_gc_spares_a_layer_in_use(home: Path) -> None:
    stale = _layer("d" * 64, "0" * 64)
    with DepCache().use("d" * 64) as layer:
        assert layer is not None
        assert gc() == []
        assert stale.exists()
    assert len(gc()) == 1
    assert not stale.exists()
    # Its lock file went with it.
    assert sorted(p.name for p in DepCache().root.iterdir()) == []


def test_gc_removes_what_a_dead_build_left(home: Path) -> None:
    # A process that is gone by the time gc runs left a half-stored layer.
    code = (
        "from nsbuild.debbuild.cache import DepCache\n"
        "s = DepCache().staging(); (s / 'layer').mkdir(); print(s)\n"
    )
    left = Path(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    mine = DepCache().staging()  # this process lives: its staging stays
    assert gc() == [f"unfinished dependency layer {left}"]
    assert not left.exists() and mine.exists()


def test_gc_removes_apt_caches_of_environments_that_are_gone(home: Path) -> None:
    apt = home / "cache" / "nsbuild" / "apt"
    for env in ("bookworm", "trixie"):
        (apt / env / "apt-archives").mkdir(parents=True)
        (apt / env / "apt-lists").mkdir(parents=True)
    fresh = apt / "bookworm" / "apt-archives" / "fresh_1_amd64.deb"
    stale = apt / "bookworm" / "apt-archives" / "stale_1_amd64.deb"
    fresh.write_bytes(b"x")
    stale.write_bytes(b"x")
    then = time.time() - 90 * 86400
    os.utime(stale, (then, then))
    removed = gc()
    assert sorted(removed) == [
        "1 cached .deb files of 'bookworm' unused for 30 days",
        "build apt cache of 'trixie' (no such environment)",
    ]
    assert fresh.exists() and not stale.exists() and not (apt / "trixie").exists()


def test_gc_removes_old_logs_of_failed_builds(home: Path) -> None:
    logs = home / "cache" / "nsbuild" / "logs"
    old = logs / "nsb-fails_1.0_amd64-20240101T000000Z-1"
    new = logs / "nsb-fails_1.0_amd64-20240301T000000Z-2"
    for d in (old, new):
        d.mkdir(parents=True)
        (d / "nsb-fails_1.0_amd64.build").write_text("Status: failed\n")
    then = time.time() - 31 * 86400
    os.utime(old, (then, then))
    assert gc() == ["1 logs of failed builds older than 30 days"]
    assert new.exists() and not old.exists()


def test_remembered_answers_go_with_their_layers(home: Path) -> None:
    cache = DepCache()
    _layer("e" * 64, _base(home))
    stale = _layer("f" * 64, "0" * 64)
    cache.remember("1" * 64, "e" * 64)
    cache.remember("2" * 64, "f" * 64)
    cache.remember("3" * 64, "9" * 64)  # its layer was never stored
    assert cache.recall("1" * 64) == "e" * 64 and cache.recall("4" * 64) is None
    gc()
    assert not stale.exists()
    assert cache.recall("1" * 64) == "e" * 64
    assert cache.recall("2" * 64) is None and cache.recall("3" * 64) is None
