"""Hostile build output: what a build leaves in its work directory is copied out
through Backend.copy_out, which must never read or write anything outside the
work directory and the destination it is given.

The tree is crafted by a command run in the real local backend (the
`bookworm` environment), as a hostile build would leave it. Checks of the
.changes names themselves belong to the build tests (tests/debbuild)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from security_helpers import EnvHome

from nsbuild.backends import BackendError, BackendOptions, CopyRefused, open_backend
from nsbuild.backends.base import Backend

pytestmark = [pytest.mark.userns, pytest.mark.slow]

HOSTILE_TREE = r"""
set -e
cd /build
echo fine > good.deb
ln -s /etc/passwd passwd.deb
ln -s / rootlink
ln -s .. up
mkdir -p sub
ln -s ../../../../../../../../../../../../etc/shadow sub/shadow.deb
echo linked > twin.deb
ln twin.deb hard.deb
mkfifo fifo.deb
mkdir dir.deb
ln -s "$1" host-secret.deb
ln /etc/hostname stolen.deb 2>/dev/null || echo "no cross-mount hard link" > hardlink.log
ln -s /build/good.deb selfref.deb
"""


@pytest.fixture(scope="module")
def backend(env_home: EnvHome, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    old = {k: os.environ.get(k) for k in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    os.environ.update(XDG_CONFIG_HOME=str(env_home.config), XDG_CACHE_HOME=str(env_home.cache))
    try:
        with open_backend("local", BackendOptions(env="bookworm")) as b:
            yield b
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def secret(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("host") / "secret.txt"
    path.write_text("host secret")
    return path


@pytest.fixture(scope="module")
def hostile(backend: Backend, secret: Path) -> Backend:
    status = backend.run(["sh", "-c", HOSTILE_TREE, "hostile", str(secret)])
    assert status == 0
    return backend


def test_a_regular_file_is_copied(hostile: Backend, tmp_path: Path) -> None:
    hostile.copy_out("/build/good.deb", tmp_path / "good.deb")
    assert (tmp_path / "good.deb").read_text() == "fine\n"


@pytest.mark.parametrize(
    "guest",
    ["/build/passwd.deb", "/build/rootlink/etc/passwd", "/build/up/etc/passwd",
     "/build/sub/shadow.deb", "/build/host-secret.deb", "/build/selfref.deb",
     "/build/rootlink/build/good.deb"],
)
def test_symlinks_are_never_followed(hostile: Backend, tmp_path: Path, guest: str) -> None:
    dest = tmp_path / "out" / "x.deb"
    with pytest.raises(CopyRefused, match="symlink"):
        hostile.copy_out(guest, dest)
    assert not dest.exists()


@pytest.mark.parametrize("guest", ["/build/fifo.deb", "/build/dir.deb", "/build/missing.deb"])
def test_special_files_are_refused_without_hanging(
    hostile: Backend, tmp_path: Path, guest: str
) -> None:
    with pytest.raises(CopyRefused, match="not a regular file"):
        hostile.copy_out(guest, tmp_path / "x.deb")
    assert not (tmp_path / "x.deb").exists()


@pytest.mark.parametrize(
    "guest",
    ["/build/../etc/passwd", "/etc/passwd", "/buildx/good.deb", "build/good.deb",
     "/build/sub/../../etc/passwd", "/build", "/build/"],
)
def test_paths_outside_the_work_directory_are_refused(
    hostile: Backend, tmp_path: Path, guest: str
) -> None:
    with pytest.raises(CopyRefused):
        hostile.copy_out(guest, tmp_path / "x.deb")
    assert not (tmp_path / "x.deb").exists()


@pytest.mark.parametrize("guest", ["/build/hard.deb", "/build/twin.deb"])
def test_hard_links_are_refused(hostile: Backend, tmp_path: Path, guest: str) -> None:
    """A file with a second name was made by linking, not by a build tool: both
    names are refused."""
    with pytest.raises(CopyRefused, match="hard link"):
        hostile.copy_out(guest, tmp_path / "x.deb")
    assert not (tmp_path / "x.deb").exists()


def test_no_hard_link_to_a_file_outside_can_be_made(hostile: Backend, tmp_path: Path) -> None:
    """Bind mounts refuse links across them (EXDEV): the build's attempt to link
    /etc/hostname into its work directory failed, and nothing by that name exists."""
    with pytest.raises(CopyRefused, match="not a regular file"):
        hostile.copy_out("/build/stolen.deb", tmp_path / "stolen.deb")
    hostile.copy_out("/build/hardlink.log", tmp_path / "hardlink.log")
    assert (tmp_path / "hardlink.log").read_text() == "no cross-mount hard link\n"


def test_a_background_process_of_the_build_cannot_race_the_copy(
    hostile: Backend, tmp_path: Path
) -> None:
    """A build leaves a process that keeps swapping a result for a symlink: it
    dies with the command that started it, so the copy sees a still tree."""
    script = (
        "cd /build; echo real > race.deb; "
        "(setsid sh -c 'while :; do ln -sfn /etc/passwd race.tmp; mv -T race.tmp race.deb; "
        "echo real > race.tmp2; mv -T race.tmp2 race.deb; done' >/dev/null 2>&1 &) ; exit 0"
    )
    assert hostile.run(["sh", "-c", script]) == 0
    for _ in range(20):
        try:
            hostile.copy_out("/build/race.deb", tmp_path / "race.deb")
        except CopyRefused:
            continue  # the swapper stopped at a symlink: refused, never followed
        except BackendError as e:
            pytest.fail(f"copy failed instead of being refused or done: {e}")
        assert (tmp_path / "race.deb").read_text() == "real\n"
    status, out = hostile.check_output(["sh", "-c", "ls -l /build/race.deb; sleep 0.2; "
                                        "ls -l /build/race.deb"])
    lines = out.splitlines()
    assert status == 0 and len(lines) == 2 and lines[0] == lines[1], "the swapper still runs"
