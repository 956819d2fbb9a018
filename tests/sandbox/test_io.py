"""Standard streams: binary data passes through untouched, in both directions."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sandbox_helpers import explain, nsbuild, nsbuild_argv
from waiting import HANG_GUARD

pytestmark = pytest.mark.userns

SIZE = 100 * 1024 * 1024
CHUNK = 1024 * 1024


def random_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("wb") as f:
        for _ in range(SIZE // CHUNK):
            block = os.urandom(CHUNK)
            h.update(block)
            f.write(block)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def test_100mb_binary_round_trip_through_files(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    want = random_file(src)
    with src.open("rb") as fin, dst.open("wb") as fout:
        r = subprocess.run(nsbuild_argv("--", "cat"), cwd=tmp_path, stdin=fin, stdout=fout,
                           stderr=subprocess.PIPE, timeout=HANG_GUARD, check=False)
    assert r.returncode == 0, r.stderr
    assert dst.stat().st_size == SIZE
    assert sha256_file(dst) == want


def test_100mb_binary_round_trip_through_pipes(tmp_path: Path) -> None:
    p = subprocess.Popen(nsbuild_argv("--", "cat"), cwd=tmp_path, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdin is not None and p.stdout is not None
    sent = hashlib.sha256()

    def feed() -> None:
        assert p.stdin is not None
        for _ in range(SIZE // CHUNK):
            block = os.urandom(CHUNK)
            sent.update(block)
            p.stdin.write(block)
        p.stdin.close()

    writer = threading.Thread(target=feed)
    writer.start()
    got, n = hashlib.sha256(), 0
    while block := p.stdout.read(CHUNK):
        got.update(block)
        n += len(block)
    writer.join()
    assert p.wait(timeout=HANG_GUARD) == 0
    assert n == SIZE
    assert got.hexdigest() == sent.hexdigest()


def test_stdin_eof_reaches_the_command(tmp_path: Path) -> None:
    r = nsbuild("--", "wc", "-c", cwd=tmp_path, input="12345")
    assert (r.returncode, r.stdout.strip()) == (0, "5")


def test_stdin_from_dev_null(tmp_path: Path) -> None:
    r = nsbuild("--", "cat", cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, "")


@pytest.mark.parametrize("layout", ["same", "swapped"])
def test_spawn_maps_stdout_and_stderr_to_any_descriptors(tmp_path: Path, layout: str) -> None:
    from nsbuild.sandbox import Sandbox, Tmpfs, caller_idmap, host_view, spawn

    spec = Sandbox(
        argv=("sh", "-c", "echo out; echo err >&2"),
        idmap=caller_idmap(),
        root=Tmpfs("/"),
        mounts=tuple(host_view(str(tmp_path))),
        cwd=str(tmp_path),
    )
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    # "same": one descriptor for both; "swapped": stdout to the fd stderr's
    # pipe uses on the other side and the reverse.
    out, err = (w1, w1) if layout == "same" else (w2, w1)
    proc = spawn(spec, stdout=out, stderr=err)
    os.close(w1)
    os.close(w2)
    assert proc.wait() == 0
    got1, got2 = os.read(r1, 100), os.read(r2, 100)
    if layout == "same":
        assert (got1, got2) == (b"out\nerr\n", b"")
    else:
        assert (got1, got2) == (b"err\n", b"out\n")


def test_spawn_takes_the_callers_stdout_and_stderr_crossed(tmp_path: Path) -> None:
    # stdout=2 and stderr=1: each source is one of 0..2 but not in its own
    # place, so the runtime must copy them before putting them in place.
    code = f"""
import os, sys
from nsbuild.sandbox import Sandbox, Tmpfs, caller_idmap, host_view, spawn
spec = Sandbox(argv=("sh", "-c", "cat; echo out; echo err >&2"), idmap=caller_idmap(),
               root=Tmpfs("/"), mounts=tuple(host_view({str(tmp_path)!r})), cwd={str(tmp_path)!r})
r, w = os.pipe()
os.write(w, b"in\\n")
os.close(w)
proc = spawn(spec, stdin=r, stdout=2, stderr=1)
os.close(r)
print("status", proc.wait(), file=sys.stderr)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=HANG_GUARD, check=False)
    assert (r.stdout, r.stderr) == ("err\n", "in\nout\nstatus 0\n"), explain(r)
