"""Fixtures for the environments tests.

The real bookworm buildd tarball is made once per test run with mmdebstrap
(slow, needs the Debian archive), or taken from $NSBUILD_TEST_TARBALL when
that names an existing file (CI caches one there). Its unpacked base lives in
one cache folder shared by the whole run, so it is unpacked once too.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from envs_helpers import chroot_d


@pytest.fixture
def xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Private config and cache folders (XDG_*), so tests never touch the user's.

    The cache may hold files of the subuid range: remove_tree deletes them
    (pytest's own cleanup could not)."""
    for var, sub in (("XDG_CONFIG_HOME", "config"), ("XDG_CACHE_HOME", "cache")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    yield tmp_path
    from nsbuild.envs import remove_tree

    remove_tree(tmp_path / "cache")




@pytest.fixture(scope="session")
def bookworm_tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cached = os.environ.get("NSBUILD_TEST_TARBALL")
    if cached and os.path.isfile(cached):
        return Path(cached)
    out = Path(cached) if cached else tmp_path_factory.mktemp("tarball") / "bookworm.tar"
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mmdebstrap", "--mode=unshare", "--variant=buildd", "--format=tar",
         "--skip=output/mknod", "bookworm", str(out)],
        check=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return out


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("shared-cache")
    yield path
    from nsbuild.envs import remove_tree

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
