"""Creating, updating and removing environments (real mmdebstrap and apt)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from envs_helpers import chroot_d, nsbuild

from nsbuild.envs.config import load_config
from nsbuild.envs.session import begin_session, end_session, get_session
from nsbuild.sandbox import run

pytestmark = [pytest.mark.userns, pytest.mark.slow]


def test_update_keeps_an_open_session_working(xdg: Path, bookworm_tarball: Path) -> None:
    # A private copy: update replaces the tarball it is given.
    tarball = xdg / "bookworm.tar"
    shutil.copyfile(bookworm_tarball, tarball)
    (chroot_d(xdg) / "bookworm").write_text(f"Name: bookworm\nPath: {tarball}\n")
    old = begin_session("bookworm")
    run(old.sandbox(["sh", "-c", "echo kept > /root/note"]))
    out = nsbuild("env", "update", "bookworm")
    assert "updated environment 'bookworm'" in out.stdout
    # The session still runs on the base it began with, with its own files.
    again = get_session(old.id)
    assert again.lowers == old.lowers and os.path.isdir(old.lowers[-1])
    assert run(again.sandbox(["sh", "-c", "grep -qx kept /root/note && apt-get --version"])) == 0
    end_session(old.id)
    # Once the session is gone, gc removes the old base (if the update changed anything).
    nsbuild("gc")
    bases = [p for p in (xdg / "cache" / "nsbuild" / "store" / "bases").iterdir()]
    assert len(bases) == 1
    assert "bookworm: ready" in nsbuild("env", "list").stdout


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
