"""Creating, updating and removing environments (real mmdebstrap and apt)."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from envs_helpers import chroot_d, nsbuild

from nsbuild.envs.config import load_config
from nsbuild.envs.session import begin_session, end_session, get_session
from nsbuild.sandbox import run

pytestmark = [pytest.mark.userns, pytest.mark.slow]


def _outdated_copy(src: Path, dest: Path) -> Path:
    """A copy of the CI tarball whose dpkg status says `hostname` is older than
    the mirror's: an environment with exactly one upgrade to make."""
    shutil.copyfile(src, dest)
    with tarfile.open(dest) as tar:
        member = tar.getmember("./var/lib/dpkg/status")
        f = tar.extractfile(member)
        assert f is not None
        status = f.read()
    old = b"Package: hostname\n"
    start = status.index(old)
    end = status.index(b"\n\n", start)
    entry = status[start:end].replace(b"\nVersion: 3.23+nmu1", b"\nVersion: 3.23")
    assert entry != status[start:end]
    status = status[:start] + entry + status[end:]
    # A later member of the same name wins on extraction, as with tar itself.
    with tarfile.open(dest, "a") as tar:
        member.size = len(status)
        tar.addfile(member, io.BytesIO(status))
    return dest


def _apt_state(tar_path: Path) -> list[str]:
    """What apt left in a tarball: package lists and caches."""
    with tarfile.open(tar_path) as tar:
        return [n for n in tar.getnames()
                if n.startswith(("./var/lib/apt/lists/", "./var/cache/apt/"))
                and tar.getmember(n).isfile() and tar.getmember(n).size > 0]  # fmt: skip


def test_update_upgrades_once_then_leaves_the_base_alone(
    xdg: Path, bookworm_tarball: Path
) -> None:
    # A private copy: update replaces the tarball it is given.
    tarball = _outdated_copy(bookworm_tarball, xdg / "bookworm.tar")
    (chroot_d(xdg) / "bookworm").write_text(f"Name: bookworm\nPath: {tarball}\n")
    old = begin_session("bookworm")
    run(old.sandbox(["sh", "-c", "echo kept > /root/note"]))
    out = nsbuild("env", "update", "bookworm")
    assert out.stdout.startswith(f"updated environment 'bookworm': {tarball} (base ")
    # Cleaned as mmdebstrap cleans a new tarball: no package lists, no caches.
    assert _apt_state(tarball) == []
    # The session still runs on the base it began with, with its own files.
    again = get_session(old.id)
    assert again.lowers == old.lowers and os.path.isdir(old.lowers[-1])
    assert run(again.sandbox(["sh", "-c", "grep -qx kept /root/note && apt-get --version"])) == 0
    end_session(old.id)
    # Once the session is gone, gc removes the old base.
    nsbuild("gc")
    bases = os.listdir(xdg / "cache" / "nsbuild" / "store" / "bases")
    assert len(bases) == 1 and bases[0].startswith(out.stdout.split("(base ")[1][:12])
    assert "bookworm: ready" in nsbuild("env", "list").stdout
    # Nothing left to upgrade: the same tarball, the same base.
    st = tarball.stat()
    second = nsbuild("env", "update", "bookworm").stdout
    assert second == (
        f"environment 'bookworm' is up to date: nothing upgraded, "
        f"tarball and base {bases[0][:12]} unchanged\n"
    )
    after = tarball.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        st.st_ino, st.st_mtime_ns, st.st_size)  # fmt: skip
    assert os.listdir(xdg / "cache" / "nsbuild" / "store" / "bases") == bases


def test_create_then_remove(xdg: Path) -> None:
    r = nsbuild("env", "create", "tiny", "--suite", "bookworm", "--variant", "essential",
                "--alias", "t")  # fmt: skip
    env = load_config().get("t")
    assert env.name == "tiny" and env.suite == "bookworm" and env.path and env.path.exists()
    # Every archive of the environment's apt sources, for the --net allow allowlist.
    assert env.mirrors == (
        "http://deb.debian.org/debian",
        "http://security.debian.org/debian-security",
    )
    assert f"created environment 'tiny': {env.path}" in r.stdout
    assert "Suite: bookworm" in nsbuild("env", "show", "tiny").stdout
    out = nsbuild("env", "remove", "tiny").stdout
    assert f"removed {env.path}" in out and "removed its unpacked base" in out
    assert not env.path.exists()
    assert list((xdg / "cache" / "nsbuild" / "store" / "bases").iterdir()) == []
    # (System entries in /etc/nsbuild/chroot.d, if the machine has any, stay.)
    assert "tiny" not in nsbuild("env", "list").stdout
