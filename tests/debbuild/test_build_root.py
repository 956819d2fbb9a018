"""`nsbuild build` run by host root: the sandbox is root's subordinate range,
so whatever nsbuild puts in the environment's shared caches must belong to
that range's root, or apt inside cannot manage its own files."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from inputs import tarball

from .conftest import make_package

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture
def root_home() -> Iterator[Path]:
    # Not pytest's tmp_path: for root that is below a 0700 folder, which the
    # subordinate ids cannot walk.
    top = Path(tempfile.mkdtemp(prefix="nsbuild-root-build-", dir="/var/tmp"))
    top.chmod(0o755)
    chroot_d = top / "config" / "nsbuild" / "chroot.d"
    chroot_d.mkdir(parents=True)
    (chroot_d / "bookworm").write_text(
        f"Name: bookworm\nType: tarball\nPath: {tarball()}\nSuite: bookworm\n"
        "Architecture: amd64\nMirror: http://deb.debian.org/debian\n"
    )
    yield top
    env = _env(top)
    subprocess.run([sys.executable, "-m", "nsbuild", "gc"], env=env, capture_output=True)
    from nsbuild.envs.remove import remove_tree

    remove_tree(top)


def _env(top: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["XDG_CONFIG_HOME"] = str(top / "config")
    env["XDG_CACHE_HOME"] = str(top / "cache")
    return env


def _build(top: Path, tree: Path) -> str:
    """Build `tree` as root; the text of its .build log."""
    out = top / f"out-{tree.name}"
    done = subprocess.run(
        [sys.executable, "-m", "nsbuild", "build", "--env", "bookworm", "--out", str(out),
         str(tree)],
        env=_env(top), cwd="/", capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (log,) = out.glob("*.build")
    return log.read_text()


def test_apt_inside_manages_the_shared_lists_of_a_root_build(root_home: Path) -> None:
    # Two packages of different build dependencies: each build has its own
    # dependency phase, the second one on the lists the first one left.
    first = make_package(root_home / "src", "nsb-rootbuild")
    second = make_package(root_home / "src", "nsb-rootbuild2", build_depends="bc")
    for path in (root_home / "src", *(root_home / "src").rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    (first / "debian" / "rules").chmod(0o755)
    (second / "debian" / "rules").chmod(0o755)
    lists = root_home / "cache" / "nsbuild" / "apt" / "bookworm" / "apt-lists"
    for tree in (first, second):
        log = _build(root_home, tree)
        # The dependency phase ran apt on the lists (else nothing was shown).
        assert "Reading package lists" in log, log
        warned = [ln for ln in log.splitlines() if ln.startswith(("W: chown", "W: chmod"))]
        assert warned == [], "\n".join(warned)
        owners = {p.stat().st_uid for p in lists.glob("*InRelease")}
        assert len(owners) == 1 and 0 not in owners, owners
        # As an older nsbuild left them: the next build must repair them.
        for path in lists.iterdir():
            if path.is_file():
                os.chown(path, 0, 0)
