"""The sandbox cannot push keystrokes into the caller's terminal (TIOCSTI)."""

from __future__ import annotations

import fcntl
import os
import pty
import subprocess
import termios
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandbox_helpers import PY, nsbuild_argv, py
from waiting import HANG_GUARD

pytestmark = pytest.mark.userns

# Try TIOCSTI on fd 0 and on /dev/tty; print what happened to each.
INJECT = """
import errno, fcntl, os, termios
for name in ("fd0", "/dev/tty"):
    try:
        fd = 0 if name == "fd0" else os.open("/dev/tty", os.O_RDWR)
    except OSError as e:
        print(name, "open", errno.errorcode.get(e.errno, e.errno))
        continue
    try:
        fcntl.ioctl(fd, termios.TIOCSTI, b"X")
    except OSError as e:
        print(name, "ioctl", errno.errorcode.get(e.errno, e.errno))
    else:
        print(name, "INJECTED")
"""


@pytest.fixture
def terminal() -> Iterator[tuple[int, int]]:
    """A pty whose slave side will be the controlling terminal of the caller."""
    master, slave = pty.openpty()
    tty.setraw(slave)  # injected bytes are readable at once, no line editing
    yield master, slave
    os.close(master)
    os.close(slave)


def run_on_terminal(argv: list[str], slave: int, cwd: Path) -> subprocess.CompletedProcess[str]:
    def become_session_leader_on_tty() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    return subprocess.run(argv, cwd=cwd, stdin=slave, capture_output=True,
                          text=True, timeout=HANG_GUARD, check=False,
                          preexec_fn=become_session_leader_on_tty)


def pending_input(slave: int) -> bytes:
    os.set_blocking(slave, False)
    try:
        return os.read(slave, 1024)
    except BlockingIOError:
        return b""
    finally:
        os.set_blocking(slave, True)


def legacy_tiocsti_enabled() -> bool:
    try:
        return Path("/proc/sys/dev/tty/legacy_tiocsti").read_text().strip() != "0"
    except OSError:
        return True  # kernels before 6.2 always allow it


def test_tiocsti_inside_fails_and_injects_nothing(
    tmp_path: Path, terminal: tuple[int, int]
) -> None:
    _, slave = terminal
    if legacy_tiocsti_enabled():
        # Control: the same code run directly on this terminal does inject,
        # so the check below can fail.
        r = run_on_terminal([PY, "-c", INJECT], slave, tmp_path)
        assert "fd0 INJECTED" in r.stdout, r
        assert pending_input(slave) == b"XX"
    r = run_on_terminal(nsbuild_argv("--", *py(INJECT)), slave, tmp_path)
    assert r.returncode == 0, r
    assert "INJECTED" not in r.stdout, r.stdout
    assert r.stdout.startswith("fd0 ioctl"), r.stdout
    assert pending_input(slave) == b""


def test_command_runs_in_a_new_session(tmp_path: Path, terminal: tuple[int, int]) -> None:
    _, slave = terminal
    code = """
    import os
    try:
        os.open("/dev/tty", os.O_RDWR)
    except OSError as e:
        print("no controlling terminal", e.errno)
    else:
        print("has controlling terminal")
    """
    r = run_on_terminal(nsbuild_argv("--", *py(code)), slave, tmp_path)
    assert r.returncode == 0, r
    assert r.stdout.startswith("no controlling terminal"), r.stdout
