"""An emulated environment on a machine that cannot emulate it: with the
qemu-aarch64 entry of binfmt_misc disabled (root's switch), creating an
arm64 environment and using one each say in one line what is missing, and
exit 2, before anything starts. The entry is enabled again afterwards."""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from envs_helpers import chroot_d, nsbuild
from inputs import emulation, fixture_dsc

from nsbuild.envs.arches import machine_arch

pytestmark = pytest.mark.root

ENTRY = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
WHY = ("is arm64, which this {machine} machine cannot run: binfmt_misc's qemu-aarch64 entry "
       "is disabled (as root: 'update-binfmts --enable qemu-aarch64')")


@pytest.fixture(scope="module")
def aarch64_disabled() -> Iterator[None]:
    emulation("arm64")  # enabled to begin with, or this test says why not
    ENTRY.write_text("0")
    try:
        yield
    finally:
        ENTRY.write_text("1")



def _refused(r: subprocess.CompletedProcess[str], name: str) -> None:
    """Exit 2 and exactly the one line that says what is missing."""
    expected = f"nsbuild: environment {name!r} {WHY.format(machine=machine_arch())}\n"
    assert (r.returncode, r.stderr) == (2, expected)


def test_env_create_is_refused_before_mmdebstrap(aarch64_disabled: None, root_xdg: Path) -> None:
    r = nsbuild("env", "create", "a64", "--suite", "bookworm", "--arch", "arm64", check=False,
                cwd=root_xdg)  # fmt: skip
    _refused(r, "a64")
    assert r.stdout == ""
    # Nothing made: no tarball, no entry.
    assert not list((root_xdg / "cache").rglob("*.tar"))
    assert not chroot_d(root_xdg).joinpath("a64").exists()


def test_using_an_arm64_environment_is_refused_before_it_starts(
        aarch64_disabled: None, root_xdg: Path) -> None:  # fmt: skip
    # Its tarball is never opened: the refusal comes first.
    (chroot_d(root_xdg) / "a64").write_text(
        "Name: a64\nPath: /nonexistent/a64.tar\nSuite: bookworm\nArchitecture: arm64\n")
    for args in (("run", "--env", "a64", "--", "true"), ("session", "begin", "a64"),
                 ("shell", "a64")):  # fmt: skip
        _refused(nsbuild(*args, check=False, cwd=root_xdg), "a64")
    hello = fixture_dsc("hello_2.10-3")
    r = nsbuild("build", "--env", "a64", "--out", str(root_xdg), str(hello), check=False,
                cwd=root_xdg)  # fmt: skip
    # After the build's progress (its first step named), its one line of error.
    *progress, error = r.stderr.splitlines()
    assert all(line.startswith("nsbuild: [") for line in progress), r.stderr
    assert (r.returncode, error) == (2, f"nsbuild build: environment 'a64' "
                                        f"{WHY.format(machine=machine_arch())}")
    assert not list(root_xdg.glob("*.deb")) and not list(root_xdg.glob("*.build"))
    assert nsbuild("session", "list", cwd=root_xdg).stdout == ""


def test_an_entry_without_architecture_is_known_by_its_dpkg(
        aarch64_disabled: None, root_xdg: Path) -> None:  # fmt: skip
    # A tree whose dpkg is an arm64 program (its ELF header is enough).
    tree = root_xdg / "tree"
    (tree / "usr" / "bin").mkdir(parents=True)
    header = (b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HHI", 2, 183, 1)
              + bytes(44))  # fmt: skip
    (tree / "usr" / "bin" / "dpkg").write_bytes(header)
    os.chmod(tree / "usr" / "bin" / "dpkg", 0o755)
    (chroot_d(root_xdg) / "mine").write_text(f"Name: mine\nType: directory\nPath: {tree}\n")
    _refused(nsbuild("run", "--env", "mine", "--", "true", check=False, cwd=root_xdg), "mine")
    listed = nsbuild("env", "list", cwd=root_xdg).stdout
    assert "mine: ready; directory; arm64 (qemu-user, cannot run here (nsbuild env show mine))\n" \
        in listed
    shown = nsbuild("env", "show", "mine", cwd=root_xdg).stdout
    assert f"# arm64: cannot run here: {WHY.split(': ', 1)[1]}" in shown
