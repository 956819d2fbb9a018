"""Environments used by host root: the sandbox runs on root's subordinate
range, so everything it must write (the store's unpacked base, upper and work
dirs) is handed to that range, and root's cache lives where those ids can
reach it (/var/cache/nsbuild, not /root/.cache)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from envs_helpers import chroot_d

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture
def root_xdg(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # Not pytest's tmp_path: for root that is below a 0700 directory.
    d = Path(tempfile.mkdtemp(prefix="nsbuild-root-env-", dir="/var/tmp"))
    d.chmod(0o755)
    for var, sub in (("XDG_CONFIG_HOME", "config"), ("XDG_CACHE_HOME", "cache")):
        (d / sub).mkdir()
        monkeypatch.setenv(var, str(d / sub))
    yield d
    from nsbuild.envs.remove import remove_tree

    remove_tree(d / "cache")
    shutil.rmtree(d)


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
