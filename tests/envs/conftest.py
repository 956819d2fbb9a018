"""Fixtures for the environments tests.

The real bookworm buildd tarball is the one of tests/inputs.py. Its unpacked
base lives in one cache folder shared by the whole run, so it is unpacked once.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from envs_helpers import chroot_d
from inputs import tarball


@pytest.fixture
def xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Private config and cache folders (XDG_*), so tests never touch the user's.

    The cache may hold files of the subuid range: remove_tree deletes them
    (pytest's own cleanup could not)."""
    for var, sub in (("XDG_CONFIG_HOME", "config"), ("XDG_CACHE_HOME", "cache")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    yield tmp_path
    from nsbuild.envs.remove import remove_tree

    remove_tree(tmp_path / "cache")


@pytest.fixture
def root_xdg(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Private config and cache folders for tests run as root: not pytest's
    tmp_path, which for root is below a 0700 directory the sandbox's root
    (a subordinate id) cannot enter."""
    d = Path(tempfile.mkdtemp(prefix="nsbuild-root-env-", dir="/var/tmp"))
    d.chmod(0o755)
    for var, sub in (("XDG_CONFIG_HOME", "config"), ("XDG_CACHE_HOME", "cache")):
        (d / sub).mkdir()
        monkeypatch.setenv(var, str(d / sub))
    yield d
    from nsbuild.envs.remove import remove_tree

    remove_tree(d / "cache")
    shutil.rmtree(d)


@pytest.fixture(scope="session")
def bookworm_tarball() -> Path:
    return tarball()


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("shared-cache")
    yield path
    from nsbuild.envs.remove import remove_tree

    remove_tree(path)


@pytest.fixture
def bookworm(
    xdg: Path, bookworm_tarball: Path, shared_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """An environment named `bookworm` (alias `stable`) on the real tarball,
    with the run-wide cache (the base is unpacked once per run)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(shared_cache))
    (chroot_d(xdg) / "bookworm").write_text(
        f"Name: bookworm\nPath: {bookworm_tarball}\nAliases: stable\nSuite: bookworm\n"
    )
    yield "bookworm"
