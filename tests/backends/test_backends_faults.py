"""`nsbuild build --backend autopkgtest` against virt servers that misbehave.

A server that dies, hangs or answers out of protocol must end the build with
one clear line and a non-zero status, and leave no process behind: neither
the server nor what it started. A fake server is the only way to make a
server misbehave on purpose; everything else here is the real command line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from inputs import fixture_dsc
from virt_helpers import alive

# Long enough for any healthy answer here, short enough to keep the test quick.
TIMEOUT = "3"


def _build(program: Path, mode: str, state: Path, out: Path) -> subprocess.CompletedProcess[str]:
    # Its own cache folder: a failed build's log goes there, not to the user's.
    env = dict(os.environ, NSBUILD_VIRT_TIMEOUT=TIMEOUT, XDG_CACHE_HOME=str(out.parent / "cache"))
    argv = [sys.executable, "-m", "nsbuild", "build", "--backend", "autopkgtest",
            "--out", str(out), str(fixture_dsc("hello_2.10-3")),
            "--", str(program), mode, str(state)]  # fmt: skip
    # The guard only keeps a hang from stalling the suite; the test fails then.
    return subprocess.run(argv, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)  # fmt: skip


def _error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("nsbuild build: ")]
    assert lines, proc.stderr
    return lines[0]


def _server_pids(state: Path) -> list[int]:
    return [int(p) for p in (state / "pids").read_text().split()]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("die-at-open", "exited with status 3 while waiting for the answer to `open'"),
        ("die-mid-copy", "exited with status 3 while waiting for the answer to `copydown"),
        ("garbage", "answered `open' with 'this is not the protocol', expected 'ok'"),
        ("hang", f"gave no answer to `open' within {TIMEOUT} s"),
        ("silent", f"gave no answer to the greeting within {TIMEOUT} s"),
    ],
)
def test_a_misbehaving_server_ends_the_build_with_one_line_and_nothing_left(
    fake_server: tuple[Path, Path], tmp_path: Path, mode: str, expected: str
) -> None:
    program, state = fake_server
    proc = _build(program, mode, state, tmp_path / "out")
    assert proc.returncode == 125, proc.stderr
    line = _error_line(proc)
    assert line.startswith("nsbuild build: virt server autopkgtest-virt-fake "), line
    assert expected in line
    if mode.startswith("die"):
        # The server's own last words are quoted.
        assert "(it said: fake server: crashing" in line
    # Neither the server (even one that ignores SIGTERM) nor its child is left.
    assert [pid for pid in _server_pids(state) if alive(pid)] == []
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.deb"))


def test_a_failure_inside_closes_the_testbed_and_quits(
    fake_server: tuple[Path, Path], tmp_path: Path
) -> None:
    program, state = fake_server
    proc = _build(program, "false-exec", state, tmp_path / "out")
    assert proc.returncode != 0
    assert "cannot learn the environment's architecture" in _error_line(proc)
    verbs = [line.split()[0] for line in (state / "commands").read_text().splitlines()]
    assert verbs[:3] == ["open", "capabilities", "print-execute-command"]
    assert verbs[-2:] == ["close", "quit"]
    assert [pid for pid in _server_pids(state) if alive(pid)] == []


def test_a_huge_architecture_name_from_the_testbed_is_refused_in_one_line(
    fake_server: tuple[Path, Path], tmp_path: Path
) -> None:
    """dpkg inside names the environment's architecture: 100 000 letters
    of it are no Debian architecture, and the line saying so is bounded."""
    program, state = fake_server
    proc = _build(program, "huge-arch", state, tmp_path / "out")
    assert proc.returncode != 0
    line = _error_line(proc)
    assert "cannot learn the environment's architecture" in line, line[:300]
    assert len(line) < 300, line[:300]
    assert [pid for pid in _server_pids(state) if alive(pid)] == []


def test_a_missing_server_is_named(tmp_path: Path) -> None:
    # The documented form: options after the input, the server after `--`.
    argv = [sys.executable, "-m", "nsbuild", "build", str(fixture_dsc("hello_2.10-3")),
            "--backend", "autopkgtest", "--", "no-such-virt-server-xyz"]  # fmt: skip
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "virt server 'no-such-virt-server-xyz' not found on PATH" in _error_line(proc)


def test_no_server_given_says_how(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "nsbuild", "build", "--backend", "autopkgtest",
            str(fixture_dsc("hello_2.10-3"))]  # fmt: skip
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "give the virt server after --" in _error_line(proc)
