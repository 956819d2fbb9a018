"""A build on a disk that fills: nsbuild's cache on a small tmpfs, built on
by the unprivileged test user. The build that fills it fails and says why,
leaves nothing of its session, and the next build on the same cache works."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from inputs import tarball

from .conftest import make_package

pytestmark = [pytest.mark.root, pytest.mark.slow]

# The store of the buildd tarball, its apt caches and one dependency layer
# take about 650 MiB: the rest is what a build can fill.
SIZE = "1200M"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "nsbuild-greeting"
NO_SPACE = "No space left on device"


def _user() -> pwd.struct_passwd:
    name = os.environ.get("NSBUILD_TEST_USER", "nsbtest")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pytest.skip(f"no test user {name!r} (set NSBUILD_TEST_USER)")


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A tmpfs of SIZE, the test user's, with nsbuild's config in it."""
    user = _user()
    # Not pytest's tmp_path: for root that is below a 0700 folder.
    top = Path(tempfile.mkdtemp(prefix="nsbuild-diskfull-", dir="/var/tmp"))
    top.chmod(0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0755", "tmpfs", str(top)],
                   check=True)  # fmt: skip
    try:
        chroot_d = top / "config" / "nsbuild" / "chroot.d"
        chroot_d.mkdir(parents=True)
        (chroot_d / "bookworm").write_text(
            f"Name: bookworm\nType: tarball\nPath: {tarball()}\nSuite: bookworm\n"
            "Architecture: amd64\nMirror: http://deb.debian.org/debian\n"
        )
        for path in (top, *top.rglob("*")):
            os.chown(path, user.pw_uid, user.pw_gid)
        yield top
    finally:
        # Lazily: a process the build left would keep it busy, and the test
        # says so itself.
        subprocess.run(["umount", "--lazy", str(top)], check=True)
        top.rmdir()


def _nsbuild(top: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`nsbuild ARGS` as the test user, its cache on the small disk."""
    user = _user()
    env = [f"PATH={os.environ.get('PATH', '/usr/bin:/bin')}", "LANG=C.UTF-8",
           f"HOME={user.pw_dir}", f"XDG_CONFIG_HOME={top / 'config'}",
           f"XDG_CACHE_HOME={top / 'cache'}"]  # fmt: skip
    return subprocess.run(["runuser", "-u", user.pw_name, "--", "env", "-i", *env,
                           sys.executable, "-m", "nsbuild", *args],
                          cwd=top, capture_output=True, text=True)  # fmt: skip


def _source(top: Path, tree: Path) -> Path:
    user = _user()
    for path in (tree, *tree.rglob("*")):
        os.chown(path, user.pw_uid, user.pw_gid)
    return tree


def _left(top: Path) -> dict[str, list[str]]:
    cache = top / "cache" / "nsbuild"
    return {d: sorted(os.listdir(cache / d)) for d in ("sessions", "builds")
            if (cache / d).is_dir()}  # fmt: skip


def test_a_build_that_fills_the_disk_fails_saying_so_and_the_next_builds(
    small_disk: Path,
) -> None:
    top = small_disk
    greeting = _source(top, Path(shutil.copytree(EXAMPLE, top / "nsbuild-greeting-1.0")))
    # First a build that fits: the store and the dependency layer are in the
    # cache, as on a worker that has built before.
    first = _nsbuild(top, "build", "--env", "bookworm", "--out", str(top / "out1"), str(greeting))
    assert first.returncode == 0, first.stderr

    filler = _source(top, make_package(top, "nsb-diskfull",
                                       build="dd if=/dev/zero of=big bs=1M"))  # fmt: skip
    full = _nsbuild(top, "build", "--env", "bookworm", "--json", "--out", str(top / "out2"),
                    str(filler))  # fmt: skip
    assert full.returncode == 1, full.stderr
    summary = json.loads(full.stdout)
    assert summary["status"] == "failed"
    assert summary["fail_stage"] == "build"
    assert NO_SPACE in summary["message"]
    assert "nsbuild build: nsb-diskfull 1.0: dpkg-buildpackage failed: " in full.stderr
    assert NO_SPACE in full.stderr
    # Its log is kept, and says what dd met.
    assert f"dd: error writing 'big': {NO_SPACE}" in Path(summary["log"]).read_text()
    assert _left(top) == {"sessions": [], "builds": []}
    assert shutil.disk_usage(top).free > 400 << 20

    again = _nsbuild(top, "build", "--env", "bookworm", "--out", str(top / "out3"), str(greeting))
    assert again.returncode == 0, again.stderr
    assert (top / "out3" / "nsbuild-greeting_1.0_amd64.deb").is_file()


def test_a_disk_full_before_the_build_is_an_error_saying_so(small_disk: Path) -> None:
    """nsbuild's own writes meet ENOSPC (here, making the source package of a
    tree): an error, not the package's failure, and nothing left behind."""
    top = small_disk
    greeting = _source(top, Path(shutil.copytree(EXAMPLE, top / "nsbuild-greeting-1.0")))
    with open(top / "filler", "wb") as f:
        chunk = bytes(1 << 20)
        try:
            while True:
                f.write(chunk)
        except OSError:
            pass
    full = _nsbuild(top, "build", "--env", "bookworm", "--json", "--out", str(top / "out"),
                    str(greeting))  # fmt: skip
    assert full.returncode not in (0, 1, 3), full.stderr
    summary = json.loads(full.stdout)
    assert summary["status"] == "error"
    assert NO_SPACE in summary["message"]
    assert NO_SPACE in full.stderr
    assert _left(top) == {"builds": []}
    (top / "filler").unlink()
    again = _nsbuild(top, "build", "--env", "bookworm", "--out", str(top / "out"), str(greeting))
    assert again.returncode == 0, again.stderr
