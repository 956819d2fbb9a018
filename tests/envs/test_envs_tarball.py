"""Hostile tarballs: refused or neutralised, nothing written outside the store,
and a refused tarball leaves nothing behind."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from envs_helpers import chroot_d

from nsbuild.envs.config import load_config
from nsbuild.envs.errors import UnsafeTarball
from nsbuild.envs.session import throwaway
from nsbuild.envs.tarcheck import sanitize

Member = tuple[str, str, str]  # (type, name, link target or content)


def make_tar(
    path: Path, members: list[Member], tweak: Callable[[tarfile.TarInfo], None] | None = None
) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for kind, name, extra in members:
            info = tarfile.TarInfo(name)
            data = None
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind == "file":
                info.size, data = len(extra), io.BytesIO(extra.encode())
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, extra
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, extra
            elif kind == "chr":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            if tweak:
                tweak(info)
            tar.addfile(info, data)
    return path


GOOD: list[Member] = [
    ("dir", "./", ""),
    ("dir", "./etc/", ""),
    ("file", "./etc/hostname", "box\n"),
    ("symlink", "./bin", "usr/bin"),
    ("symlink", "./etc/mtab", "/proc/self/mounts"),
    ("hardlink", "./etc/hostname2", "./etc/hostname"),
]


def check(path: Path) -> list[str]:
    with open(path, "rb") as f:
        return sanitize(f, io.BytesIO(), str(path)).skipped_devices


def test_a_plain_tarball_passes_and_devices_are_skipped(tmp_path: Path) -> None:
    tar = make_tar(tmp_path / "ok.tar", [*GOOD, ("chr", "./dev/null", "")])
    assert check(tar) == ["./dev/null"]


@pytest.mark.parametrize(
    ("members", "why"),
    [
        ([("file", "../evil", "x")], "'..' component"),
        ([("dir", "./etc/", ""), ("file", "./etc/../../evil", "x")], "'..' component"),
        ([("file", "/etc/evil", "x")], "absolute path"),
        ([("symlink", "./escape", "/"), ("file", "./escape/etc/evil", "x")],
         "its path goes through the symlink 'escape'"),
        ([("symlink", "./d", "../../.."), ("dir", "./d/", "")], "replaces an earlier symlink"),
        ([("hardlink", "./h", "/etc/shadow")], "absolute path"),
        ([("hardlink", "./h", "./not-there")], "which is not a member before it"),
    ],
)  # fmt: skip
def test_hostile_members_are_refused(tmp_path: Path, members: list[Member], why: str) -> None:
    tar = make_tar(tmp_path / "bad.tar", members)
    with pytest.raises(UnsafeTarball, match=why):
        check(tar)


def test_a_pax_path_header_cannot_smuggle_a_name(tmp_path: Path) -> None:
    def smuggle(info: tarfile.TarInfo) -> None:
        info.pax_headers = {"path": "../../evil"}

    tar = make_tar(tmp_path / "pax.tar", [("file", "innocent", "x")], smuggle)
    with pytest.raises(UnsafeTarball, match=r"'\.\.' component"):
        check(tar)


def test_not_a_tarball(tmp_path: Path) -> None:
    (tmp_path / "junk.tar").write_bytes(b"\x01" * 4096)
    with pytest.raises(UnsafeTarball, match="not a readable tarball"):
        check(tmp_path / "junk.tar")


def _env(xdg: Path, tar: Path) -> None:
    (chroot_d(xdg) / "t").write_text(f"Name: t\nPath: {tar}\n")


@pytest.mark.userns
def test_refused_tarball_leaves_nothing(xdg: Path) -> None:
    outside = xdg / "outside"
    outside.mkdir()
    tar = make_tar(
        xdg / "bad.tar",
        [*GOOD, ("symlink", "./escape", str(outside)), ("file", "./escape/pwned", "x")],
    )
    _env(xdg, tar)
    with pytest.raises(UnsafeTarball, match="goes through the symlink 'escape'"), throwaway("t"):
        pass
    cache = xdg / "cache" / "nsbuild"
    assert os.listdir(outside) == []
    assert os.listdir(cache / "store" / "bases") == []
    assert os.listdir(cache / "sessions") == []


@pytest.mark.userns
def test_good_tarball_unpacks_with_devices_skipped(xdg: Path) -> None:
    from nsbuild.sandbox import run

    tar = make_tar(xdg / "ok.tar", [*GOOD, ("chr", "./dev/null", ""), ("file", "./usr/bin/x", "")])
    _env(xdg, tar)
    with throwaway(load_config().get("t")) as session:
        base = Path(session.lowers[-1])
        assert (base / "etc" / "hostname").read_text() == "box\n"
        assert os.readlink(base / "etc" / "mtab") == "/proc/self/mounts"
        assert not (base / "dev" / "null").exists()
        assert (
            os.stat(base / "etc" / "hostname").st_ino == os.stat(base / "etc" / "hostname2").st_ino
        )
        status = run(session.sandbox(["/bin/sh", "-c", "true"], mounts=()))
        # The toy root has no shell: what matters is that it is mountable and ours.
        assert status == 127


@pytest.mark.userns
def test_gc_removes_a_base_no_environment_refers_to(xdg: Path) -> None:
    from envs_helpers import nsbuild

    _env(xdg, make_tar(xdg / "ok.tar", GOOD))
    with throwaway("t"):
        pass
    bases = xdg / "cache" / "nsbuild" / "store" / "bases"
    (digest,) = os.listdir(bases)
    assert nsbuild("gc").stdout == "nothing to remove\n"  # still configured
    (chroot_d(xdg) / "t").unlink()
    assert nsbuild("gc", "--dry-run").stdout == f"would remove unused base {digest[:12]}\n"
    assert os.listdir(bases) == [digest]
    assert nsbuild("gc").stdout == f"removed unused base {digest[:12]}\n"
    assert os.listdir(bases) == []


@pytest.mark.userns
def test_removal_never_crosses_a_mount_point(tmp_path: Path) -> None:
    import subprocess
    import sys

    victim = tmp_path / "victim"
    (victim / "mnt").mkdir(parents=True)
    (victim / "file").write_text("x")
    # A mount below the tree, in a user and mount namespace of our own.
    code = (
        "import sys; from pathlib import Path; from nsbuild.envs.remove import remove_tree\n"
        "try:\n    remove_tree(Path(sys.argv[1]))\nexcept Exception as e:\n    print(e)\n"
    )
    r = subprocess.run(
        ["unshare", "--map-root-user", "--mount", "sh", "-c",
         f'mount -t tmpfs none "$1/mnt" && touch "$1/mnt/keep" && {sys.executable} -c "$2" "$1"',
         "sh", str(victim), code],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert r.stdout == (
        f"{victim}: refusing to remove: {victim}/mnt is mounted there; unmount it first\n"
    )
    assert (victim / "file").exists()
