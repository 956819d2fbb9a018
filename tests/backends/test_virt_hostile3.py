"""autopkgtest-virt-nsbuild against a hostile testbed: what a copyup costs the host.

Root in a testbed may replace its `tar`, so the stream a copyup of a tree
reads may be anything. The server's `--copy-limit` bounds what it writes on
the host: every file and folder made counts, not only the files' bytes, so
many empty folders and files are refused like one large file; a path too
deep is refused before anything of it is made.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_virt_hostile2 import _ok
from virt_helpers import Env, RawServer

pytestmark = pytest.mark.userns

LIMIT = 1 << 20
# What an empty folder or file costs the host at the least: an inode, and a
# block of a folder (the folder's own, or its name in its parent's).
BLOCK = 4096

# The testbed's tar, replaced: it sends /tmp/stream when there is one.
_FAKE_TAR = """#!/bin/sh
if [ -f /tmp/stream ]; then exec cat /tmp/stream; fi
exec /usr/bin/tar.real "$@"
"""


def _stream(members: Iterator[tarfile.TarInfo]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info in members:
            info.mode = 0o755 if info.type == tarfile.DIRTYPE else 0o644
            tar.addfile(info)
    return buf.getvalue()


def _dirs_with_empty_files(n: int) -> Iterator[tarfile.TarInfo]:
    """What `tar -c` writes for n folders holding one empty file each."""
    for i in range(n):
        folder = tarfile.TarInfo(f"./d{i}")
        folder.type = tarfile.DIRTYPE
        yield folder
        yield tarfile.TarInfo(f"./d{i}/" + "f" * 200)


def _files_in_unlisted_dirs(n: int) -> Iterator[tarfile.TarInfo]:
    """Empty files whose three parent folders have no entry of their own."""
    for i in range(n):
        yield tarfile.TarInfo(f"./p{i}/q/r/f")


def _deep(depth: int) -> Iterator[tarfile.TarInfo]:
    yield tarfile.TarInfo("./" + "a/" * depth + "f")


def _made(top: Path) -> tuple[int, int]:
    """(inodes, bytes) under `top`, itself not counted."""
    inodes = size = 0
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            inodes += 1
            size += os.lstat(os.path.join(root, name)).st_blocks * 512
    return inodes, size


@pytest.fixture
def server(server_env: Env) -> Iterator[RawServer]:
    srv = RawServer("--copy-limit", "1M", "bookworm")
    try:
        assert srv.say("open").startswith("ok ")
        yield srv
    finally:
        srv.kill()


def _send(srv: RawServer, tmp_path: Path, data: bytes | None) -> None:
    """Make the testbed's tar send `data` (None: the real tar again)."""
    ex = srv.execute_command()
    if data is None:
        _ok(ex, "rm -f /tmp/stream")
        return
    (tmp_path / "stream.tar").write_bytes(data)
    assert srv.say("copydown", str(tmp_path / "stream.tar"), "/tmp/stream") == "ok"


def test_copyup_counts_every_folder_and_file_against_its_limit(
    server: RawServer, tmp_path: Path
) -> None:
    ex = server.execute_command()
    (tmp_path / "tar").write_text(_FAKE_TAR)
    assert server.say("copydown", str(tmp_path / "tar"), "/tmp/faketar") == "ok"
    _ok(ex, "mv /usr/bin/tar /usr/bin/tar.real && cp /tmp/faketar /usr/bin/tar && "
            "chmod 755 /usr/bin/tar && mkdir -p /srv/x")  # fmt: skip

    # 2000 folders, each with an empty file: no bytes of content at all; and
    # folders made for a file's path, which count as much as listed ones.
    for name, entries in (("many", _dirs_with_empty_files(2000)),
                          ("parents", _files_in_unlisted_dirs(1000))):  # fmt: skip
        _send(server, tmp_path, _stream(entries))
        target = tmp_path / name
        assert server.say("copyup", "/srv/x/", f"{target}/") == "copy-failed"
        inodes, size = _made(target)
        assert inodes * BLOCK <= LIMIT + BLOCK, f"{inodes} folders and files made on the host"
        assert size <= LIMIT + BLOCK, f"{size} bytes written on the host"

    # A path deeper than any a tree copies: nothing of it is made.
    _send(server, tmp_path, _stream(_deep(300)))
    deep = tmp_path / "deep"
    assert server.say("copyup", "/srv/x/", f"{deep}/") == "copy-failed"
    assert _made(deep) == (0, 0)

    # A real tree of the same shape, smaller, still comes up whole.
    _send(server, tmp_path, None)
    _ok(ex, "mkdir -p /srv/small && cd /srv/small && for i in $(seq 1 40); do "
            "mkdir d$i && : > d$i/empty && echo $i > d$i/f; done")  # fmt: skip
    small = tmp_path / "small"
    assert server.say("copyup", "/srv/small/", f"{small}/") == "ok"
    assert sorted(p.name for p in small.iterdir()) == sorted(f"d{i}" for i in range(1, 41))
    assert (small / "d40" / "f").read_text() == "40\n"
    assert (small / "d40" / "empty").read_bytes() == b""

    err = server.quit()
    over = "more than 1 MiB to copy (the server's --copy-limit"
    assert "copyup of /srv/x/: ./d" in err and over in err, err
    assert "copyup of /srv/x/: ./p" in err, err
    assert "deeper than 256 folders" in err, err
    refused = [line for line in err.splitlines() if "copyup" in line]
    assert len(refused) == 3, err
