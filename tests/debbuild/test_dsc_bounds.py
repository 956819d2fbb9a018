"""What a .dsc brings is read on the host with bounds, and copied from what was checked.

`nsbuild build x.dsc` without --env reads the newest changelog entry out of the
package's own tarball (or format 1.0 diff) before any sandbox runs: its
headers, its size and its compression are the package author's to choose.
The files a .dsc lists sit in a folder the author may control: they are
checked once, from one descriptor each, and the build copies in the private
copies made while checking, not whatever stands under those names later.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import pytest

from nsbuild.debbuild.dsc import load_dsc

MIB = 1 << 20
# Well above what nsbuild needs to start and read a .dsc, well below the bombs.
PEAK_LIMIT_MIB = 150

CHANGELOG = (
    b"bomb (1.0-1) bookworm; urgency=medium\n\n  * Test.\n\n"
    b" -- nsbuild tests <tests@nsbuild.invalid>  Mon, 01 Jan 2024 00:00:00 +0000\n"
)


# -- making hostile source packages --


def _block(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def _header(name: str, kind: bytes, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _zeros(n: int) -> Iterator[bytes]:
    chunk = b"\0" * MIB
    while n > 0:
        yield chunk[: min(n, MIB)]
        n -= MIB


def _changelog_member() -> list[bytes]:
    return [_header("debian/changelog", tarfile.REGTYPE, len(CHANGELOG)), _block(CHANGELOG)]


def _gzip(path: Path, pieces: Iterable[bytes]) -> bytes:
    with path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for piece in pieces:
            gz.write(piece)
    return path.read_bytes()


def _write_dsc(folder: Path, fmt: str, files: dict[str, bytes]) -> Path:
    sha = "".join(f" {hashlib.sha256(b).hexdigest()} {len(b)} {n}\n" for n, b in files.items())
    md5 = "".join(f" {hashlib.md5(b).hexdigest()} {len(b)} {n}\n" for n, b in files.items())
    dsc = folder / "bomb_1.0-1.dsc"
    dsc.write_text(
        f"Format: {fmt}\nSource: bomb\nBinary: bomb\nArchitecture: all\nVersion: 1.0-1\n"
        f"Build-Depends: debhelper-compat (= 13)\nChecksums-Sha256:\n{sha}Files:\n{md5}"
    )
    return dsc


def _quilt_package(folder: Path, tar_pieces: Iterable[bytes]) -> Path:
    """A `3.0 (quilt)` package whose debian tarball is `tar_pieces`, gzipped."""
    folder.mkdir()
    debian = _gzip(folder / "bomb_1.0-1.debian.tar.gz", tar_pieces)
    return _write_dsc(folder, "3.0 (quilt)", {"bomb_1.0-1.debian.tar.gz": debian})


def _diff_package(folder: Path, diff_pieces: Iterable[bytes]) -> Path:
    """A format 1.0 package whose .diff.gz is `diff_pieces`, gzipped."""
    folder.mkdir()
    orig = _gzip(folder / "bomb_1.0.orig.tar.gz", [b"\0" * 1024])
    diff = _gzip(folder / "bomb_1.0-1.diff.gz", diff_pieces)
    return _write_dsc(
        folder, "1.0", {"bomb_1.0.orig.tar.gz": orig, "bomb_1.0-1.diff.gz": diff}
    )


def _changelog_hunk() -> bytes:
    lines = CHANGELOG.decode().splitlines()
    return (
        "--- bomb-1.0.orig/debian/changelog\n+++ bomb-1.0/debian/changelog\n"
        f"@@ -0,0 +1,{len(lines)} @@\n" + "".join(f"+{line}\n" for line in lines)
    ).encode()


# -- running `nsbuild build x.dsc` as a user would, without --env --


# Runs a command and prints its exit status and peak memory in MiB. nsbuild
# is started from this small process, not from pytest: a child's peak counts
# the memory of the process it was forked from.
_MEASURE = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss // 1024)
"""


@dataclass
class Outcome:
    status: int
    stderr: str
    peak_mib: int


@pytest.fixture
def nsbuild_without_env(tmp_path: Path) -> Iterator[object]:
    """`nsbuild build DSC` with no --env, where every environment its changelog
    could name is configured with a missing tarball: the build stops right
    after choosing one, and its message names the one chosen."""
    config = tmp_path / "config" / "nsbuild" / "chroot.d"
    config.mkdir(parents=True)
    (config / "missing").write_text(
        "".join(
            f"Name: {name}\nType: tarball\nPath: /nonexistent/{name}.tar\nSuite: {name}\n\n"
            for name in ("unstable", "bookworm")
        )
    )
    env = dict(os.environ)
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")

    def run(dsc: Path) -> Outcome:
        measured = subprocess.run(
            [sys.executable, "-c", _MEASURE, sys.executable, "-m", "nsbuild", "build",
             "--out", str(tmp_path / "out"), str(dsc)],
            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True,
        )
        status, peak = measured.stdout.split()
        return Outcome(int(status), measured.stderr, int(peak))

    yield run


def _refused(outcome: Outcome, *words: str) -> None:
    assert outcome.status == 2, outcome.stderr
    assert "cannot read debian/changelog" in outcome.stderr
    assert "--env" in outcome.stderr
    for word in words:
        assert word in outcome.stderr
    assert "Traceback" not in outcome.stderr
    assert outcome.peak_mib < PEAK_LIMIT_MIB


# -- A5: the debian tarball's headers --


@pytest.mark.parametrize(
    ("kind", "label"),
    [(tarfile.XHDTYPE, "pax"), (tarfile.GNUTYPE_LONGNAME, "GNU long name")],
    ids=["pax", "gnu-longname"],
)
def test_a_huge_extended_header_is_refused_before_it_is_read(
    nsbuild_without_env, tmp_path: Path, kind: bytes, label: str
) -> None:
    size = 400 * MIB  # gzipped, about 400 KiB
    dsc = _quilt_package(
        tmp_path / "src",
        chain([_header("././@LongLink", kind, size)], _zeros(size), _changelog_member(),
              [b"\0" * 1024]),
    )
    _refused(nsbuild_without_env(dsc), "extended header")


def test_a_sparse_member_is_refused_before_its_map_is_read(
    nsbuild_without_env, tmp_path: Path
) -> None:
    # An old GNU sparse member whose map goes on in extension blocks, each
    # full of entries: tarfile keeps every entry in memory.
    entry = b"00000000001\0" * 2
    extension = entry * 21 + b"\1" + b"\0" * 7
    blocks = (64 * MIB) // 512
    dsc = _quilt_package(
        tmp_path / "src",
        [_header_gnu_sparse(), *(extension for _ in range(blocks)), b"\0" * 512,
         *_changelog_member(), b"\0" * 1024],
    )
    _refused(nsbuild_without_env(dsc), "sparse")


def _header_gnu_sparse() -> bytes:
    info = tarfile.TarInfo("debian/hole")
    info.type = tarfile.GNUTYPE_SPARSE
    buf = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    buf[482] = 1  # isextended: the map continues in the next block
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % sum(buf)
    return bytes(buf)


def test_a_chain_of_extended_headers_is_refused(nsbuild_without_env, tmp_path: Path) -> None:
    record = b"9 a=bcde\n"
    chain = [_header("././@PaxHeader", tarfile.XHDTYPE, len(record)) + _block(record)] * 400
    dsc = _quilt_package(tmp_path / "src", [*chain, *_changelog_member(), b"\0" * 1024])
    _refused(nsbuild_without_env(dsc), "headers")


def test_members_scanned_for_the_changelog_are_bounded(
    nsbuild_without_env, tmp_path: Path
) -> None:
    empty = [_header(f"debian/f{i}", tarfile.REGTYPE, 0) for i in range(60_000)]
    dsc = _quilt_package(tmp_path / "src", [*empty, *_changelog_member(), b"\0" * 1024])
    _refused(nsbuild_without_env(dsc), "members")


def test_bytes_decompressed_for_the_changelog_are_bounded(
    nsbuild_without_env, tmp_path: Path
) -> None:
    size = 600 * MIB
    dsc = _quilt_package(
        tmp_path / "src",
        chain([_header("debian/big", tarfile.REGTYPE, size)], _zeros(size), _changelog_member(),
              [b"\0" * 1024]),
    )
    _refused(nsbuild_without_env(dsc), "MiB")


def test_a_plain_debian_tarball_still_names_the_distribution(
    nsbuild_without_env, tmp_path: Path
) -> None:
    dsc = _quilt_package(tmp_path / "src", [*_changelog_member(), b"\0" * 1024])
    outcome = nsbuild_without_env(dsc)
    assert outcome.status == 2
    assert "/nonexistent/bookworm.tar" in outcome.stderr


# -- A6: a format 1.0 .diff.gz --


def test_a_diff_is_streamed_not_read_whole(nsbuild_without_env, tmp_path: Path) -> None:
    # One 400 MiB line before the changelog's hunk: read whole, it took
    # three times that in memory.
    dsc = _diff_package(
        tmp_path / "src",
        chain(
            [b"--- a/x\n+++ b/x\n"], (b"+" * MIB for _ in range(400)), [b"\n", _changelog_hunk()]
        ),
    )
    outcome = nsbuild_without_env(dsc)
    assert outcome.status == 2, outcome.stderr
    assert "/nonexistent/bookworm.tar" in outcome.stderr  # found past the long line
    assert outcome.peak_mib < PEAK_LIMIT_MIB


def test_bytes_decompressed_from_a_diff_are_bounded(
    nsbuild_without_env, tmp_path: Path
) -> None:
    line = b"+" + b"x" * 1022 + b"\n"
    dsc = _diff_package(
        tmp_path / "src",
        chain([b"--- a/x\n+++ b/x\n"], (line * 1024 for _ in range(600)), [_changelog_hunk()]),
    )
    _refused(nsbuild_without_env(dsc), "MiB")


# -- A4: what the build copies in is what was checked --


def test_the_build_copies_what_was_checked_not_what_is_there_later(tmp_path: Path) -> None:
    src = tmp_path / "src"
    debian = io.BytesIO()
    with tarfile.open(fileobj=debian, mode="w:gz") as tar:
        info = tarfile.TarInfo("debian/changelog")
        info.size = len(CHANGELOG)
        tar.addfile(info, io.BytesIO(CHANGELOG))
    src.mkdir()
    (src / "bomb_1.0-1.debian.tar.gz").write_bytes(debian.getvalue())
    (src / "store").mkdir()
    orig = src / "store" / "bomb_1.0.orig.tar.gz"
    orig.write_bytes(b"upstream" * 1000)
    # Tools leave orig tarballs as links: one is followed once, when checked.
    (src / orig.name).symlink_to(f"store/{orig.name}")
    dsc = _write_dsc(
        src, "3.0 (quilt)",
        {orig.name: orig.read_bytes(), "bomb_1.0-1.debian.tar.gz": debian.getvalue()},
    )
    verified = {p.name: p.read_bytes() for p in (dsc, orig, src / "bomb_1.0-1.debian.tar.gz")}
    kept = tmp_path / "kept"
    kept.mkdir(mode=0o700)

    pkg = load_dsc(dsc, keep=kept)

    # The package's author now swaps the orig for a link to the victim's home,
    # the debian tarball's content, and the .dsc for one that omits the orig.
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "secret").write_text("the victim's\n")
    (src / orig.name).unlink()
    (src / orig.name).symlink_to(victim)
    (src / "bomb_1.0-1.debian.tar.gz").write_bytes(b"swapped")
    dsc.write_text(dsc.read_text().replace(orig.name, "gone"))

    assert pkg.dsc == dsc  # messages and the default --out still name the user's file
    assert [p.name for p in pkg.paths()] == [dsc.name, orig.name, "bomb_1.0-1.debian.tar.gz"]
    for path in pkg.paths():
        assert path.parent == kept
        assert not path.is_symlink() and path.is_file()
        assert path.read_bytes() == verified[path.name]
    assert pkg.distribution() == "bookworm"


def test_a_listed_file_that_is_not_regular_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    victim = tmp_path / "victim"
    victim.mkdir()
    (src / "bomb_1.0.orig.tar.gz").symlink_to(victim)
    dsc = _write_dsc(src, "3.0 (quilt)", {"bomb_1.0.orig.tar.gz": b""})
    kept = tmp_path / "kept"
    kept.mkdir()
    from nsbuild.debbuild.errors import BuildInputError

    with pytest.raises(BuildInputError, match=r"bomb_1\.0\.orig\.tar\.gz is not a regular file"):
        load_dsc(dsc, keep=kept)
    assert list(kept.iterdir()) == []


def test_a_listed_file_of_a_huge_size_is_refused_before_it_is_copied(tmp_path: Path) -> None:
    """A sparse "orig" of a huge listed size would be written out whole into
    the build's private copy before its checksum could fail."""
    src = tmp_path / "src"
    src.mkdir()
    dsc = _write_dsc(src, "3.0 (quilt)", {"bomb_1.0.orig.tar.gz": b""})
    text = dsc.read_text().replace(" 0 bomb_1.0.orig.tar.gz", f" {9 << 30} bomb_1.0.orig.tar.gz")
    dsc.write_text(text)
    with open(src / "bomb_1.0.orig.tar.gz", "wb") as f:
        f.truncate(9 << 30)  # sparse: nothing is written
    kept = tmp_path / "kept"
    kept.mkdir()
    from nsbuild.debbuild.errors import BuildInputError

    with pytest.raises(BuildInputError, match=r"bomb_1\.0\.orig\.tar\.gz is \d+ bytes, more than"):
        load_dsc(dsc, keep=kept)
    assert list(kept.iterdir()) == []
