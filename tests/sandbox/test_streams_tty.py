"""A command at a terminal it cannot reopen gets one of its own, as on a machine.

Root's terminal (host uid 0, mode 0620) is out of reach of root's sandbox,
which runs on a subordinate range: /dev/stderr would fail with "Permission
denied". The command then gets a pseudo-terminal made inside the sandbox, as
its controlling terminal and as each stream that was the caller's terminal;
nsbuild relays between the two, with the caller's terminal in raw mode, and
restores that mode when the command ends, however it ends. A terminal the
command can reopen (an unprivileged user's own) reaches it as it is.

Each test gives nsbuild a real terminal: the slave of a pty (Python's pty
module), nsbuild's controlling terminal; the test types and reads on the master.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import tempfile
import termios
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from sandbox_helpers import nsbuild_argv, py, sh
from test_streams import as_test_user
from waiting import HANG_GUARD

from nsbuild.sandbox import Sandbox, caller_idmap, host_view, spawn
from nsbuild.sandbox.enter import sandbox_pids, start

BOTH = "echo x > /dev/stderr; test -t 0 && echo tty"


def stty_g(fd: int) -> str:
    """The terminal's settings as `stty -g` prints them."""
    return subprocess.run(["stty", "-g"], stdin=fd, capture_output=True, text=True,
                          timeout=HANG_GUARD, check=True).stdout.strip()


class Terminal:
    """A pty pair: nsbuild runs on the slave (its controlling terminal), the
    test types on the master and reads what nsbuild writes there."""

    def __init__(self, rows: int = 24, cols: int = 80) -> None:
        self.master, self.slave = pty.openpty()
        self.resize(rows, cols)
        self.output = b""
        self.proc: subprocess.Popen[bytes] | None = None

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def start(self, argv: Sequence[str], cwd: Path, stdin: int | None = None) -> None:
        def take_terminal() -> None:
            fcntl.ioctl(1, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(
            argv, cwd=cwd, stdin=self.slave if stdin is None else stdin, stdout=self.slave,
            stderr=self.slave, start_new_session=True, preexec_fn=take_terminal)

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def read_until(self, want: bytes) -> bytes:
        """Everything written to the terminal up to `want` (the kernel passes
        it on asynchronously: wait for it, rather than for the writer)."""
        while want not in self.output:
            ready, _, _ = select.select([self.master], [], [], HANG_GUARD)
            assert ready, f"no {want!r} on the terminal; it shows {self.output!r}"
            try:
                data = os.read(self.master, 4096)
            except OSError:
                data = b""
            assert data, f"terminal closed before {want!r}; it shows {self.output!r}"
            self.output += data
        return self.output

    def wait(self) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=HANG_GUARD)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory the sandbox's ids may traverse: root's pytest base is 0700."""
    d = Path(tempfile.mkdtemp(prefix="nsbuild-tty-", dir="/var/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


@pytest.fixture
def terminal() -> Iterator[Terminal]:
    t = Terminal()
    yield t
    t.close()


# ------------------------------------------------------------ run by root


@pytest.mark.root
def test_root_at_a_terminal_reopens_dev_stderr_and_has_a_terminal(
        base: Path, terminal: Terminal) -> None:
    terminal.start(nsbuild_argv("--", *sh(BOTH)), base)
    assert terminal.read_until(b"tty\r\n") == b"x\r\ntty\r\n"
    assert terminal.wait() == 0


@pytest.mark.root
def test_root_terminal_is_the_commands_controlling_terminal_on_every_stream(
        base: Path, terminal: Terminal) -> None:
    # /dev/tty opens only for a process with a controlling terminal; the
    # command's process group is its foreground.
    code = ("import os; print([os.isatty(fd) for fd in (0, 1, 2)], "
            "os.access('/dev/stdout', os.W_OK), os.ttyname(0) == os.ttyname(1) == os.ttyname(2), "
            "os.tcgetpgrp(os.open('/dev/tty', os.O_RDWR)) == os.getpgrp(), end='.')")
    terminal.start(nsbuild_argv("--", *py(code)), base)
    assert terminal.read_until(b".") == b"[True, True, True] True True True."
    assert terminal.wait() == 0


@pytest.mark.root
def test_root_interactive_shell_reads_a_typed_line_and_answers(
        base: Path, terminal: Terminal) -> None:
    terminal.start(nsbuild_argv("--", "/bin/sh", "-i"), base)
    terminal.read_until(b"# ")  # the prompt
    terminal.type(b"echo hel''lo\n")
    # The line echoed as typed, then the shell's answer.
    terminal.read_until(b"echo hel''lo\r\nhello\r\n")
    terminal.type(b"exit 7\n")
    assert terminal.wait() == 7
    # A shell without a controlling terminal says so and turns job control off.
    assert b"job control" not in terminal.output, terminal.output


@pytest.mark.root
def test_root_interrupt_key_reaches_the_commands_foreground_job(
        base: Path, terminal: Terminal) -> None:
    """^C is a key like any other for nsbuild: the command's terminal makes it
    SIGINT for its foreground job, and the shell goes on."""
    terminal.start(nsbuild_argv("--", "/bin/sh", "-i"), base)
    terminal.read_until(b"# ")
    terminal.type(b"sh -c 'echo sta''rted; exec sleep infinity'\n")
    terminal.read_until(b"\r\nstarted\r\n")
    terminal.type(b"\x03")
    terminal.type(b"echo af''ter\n")
    terminal.read_until(b"after\r\n")  # the typed line shows "af''ter"
    terminal.type(b"exit\n")
    assert terminal.wait() == 0


@pytest.mark.root
def test_root_terminal_mode_is_raw_while_relaying_and_restored_after(
        base: Path, terminal: Terminal) -> None:
    before = stty_g(terminal.slave)
    terminal.start(nsbuild_argv("--", *sh("echo ready; read line; echo got $line")), base)
    terminal.read_until(b"ready\r\n")
    assert stty_g(terminal.slave) != before  # raw: keys pass to the command's terminal
    terminal.type(b"it\n")
    terminal.read_until(b"got it\r\n")
    assert terminal.wait() == 0
    assert stty_g(terminal.slave) == before


@pytest.mark.root
def test_root_terminal_mode_is_restored_when_nsbuild_is_terminated(
        base: Path, terminal: Terminal) -> None:
    before = stty_g(terminal.slave)
    terminal.start(nsbuild_argv("--", *sh("echo ready; exec sleep infinity")), base)
    terminal.read_until(b"ready\r\n")
    assert stty_g(terminal.slave) != before
    assert terminal.proc is not None
    terminal.proc.send_signal(signal.SIGTERM)  # passed on: the command ends
    assert terminal.wait() == 128 + signal.SIGTERM
    assert stty_g(terminal.slave) == before


@pytest.mark.root
def test_root_terminal_mode_is_restored_when_the_sandbox_is_killed(
        base: Path, terminal: Terminal) -> None:
    """A caller of the library that gives up on the sandbox (an exception in
    its `with` block) gets its terminal back as it was."""
    before = stty_g(terminal.slave)
    spec = Sandbox(argv=("sh", "-c", "echo ready; exec sleep infinity"), idmap=caller_idmap(),
                   mounts=host_view(str(base)), cwd=str(base),
                   env=(("PATH", "/usr/bin:/bin"),))  # fmt: skip
    proc = spawn(spec, stdin=terminal.slave, stdout=terminal.slave, stderr=terminal.slave)
    try:
        terminal.read_until(b"ready\r\n")
        assert stty_g(terminal.slave) != before
    finally:
        proc.kill()
        assert proc.wait() == 128 + signal.SIGKILL
    assert stty_g(terminal.slave) == before


@pytest.mark.root
def test_root_command_sees_the_terminals_window_size(
        base: Path, terminal: Terminal) -> None:
    terminal.resize(33, 111)
    terminal.start(nsbuild_argv("--", "stty", "size"), base)
    assert terminal.read_until(b"\r\n") == b"33 111\r\n"
    assert terminal.wait() == 0


@pytest.mark.root
def test_root_command_is_told_when_the_window_size_changes(
        base: Path, terminal: Terminal) -> None:
    # The shell runs its trap once the sleep it waits for has ended.
    script = "trap 'stty size; exit 0' WINCH; echo ready; while :; do sleep 1; done"
    terminal.start(nsbuild_argv("--", *sh(script)), base)
    terminal.read_until(b"ready\r\n")
    terminal.resize(40, 100)  # the kernel sends nsbuild SIGWINCH
    terminal.read_until(b"40 100\r\n")
    assert terminal.wait() == 0


@pytest.mark.root
def test_root_user_command_at_a_terminal_reopens_its_streams(
        base: Path, terminal: Terminal) -> None:
    terminal.start(nsbuild_argv("--user", "1000:1000", "--", *sh(BOTH + "; id -u")), base)
    assert terminal.read_until(b"1000\r\n") == b"x\r\ntty\r\n1000\r\n"
    assert terminal.wait() == 0


@pytest.mark.root
def test_root_piped_stdin_with_terminal_output(base: Path, terminal: Terminal) -> None:
    """Only the streams that were the terminal get the pty; stdin stays a
    relayed pipe, and the caller's terminal keeps its mode."""
    before = stty_g(terminal.slave)
    r, w = os.pipe()
    os.write(w, b"in\n")
    os.close(w)
    terminal.start(nsbuild_argv("--", *sh("test -t 0 || cat /dev/stdin; echo x > /dev/stdout")),
                   base, stdin=r)
    os.close(r)
    terminal.read_until(b"x\r")
    assert terminal.wait() == 0
    assert terminal.output.replace(b"\r", b"") == b"in\nx\n"
    assert stty_g(terminal.slave) == before


@pytest.mark.root
def test_root_terminal_as_stdin_only(base: Path, terminal: Terminal) -> None:
    """Output to a file: the command reads its terminal, whose echo (and
    /dev/tty) shows on the caller's, and writes the file."""
    before = stty_g(terminal.slave)
    out = base / "out"
    script = "echo ready > /dev/tty; read line; echo got $line; test -t 1 || echo file"
    with out.open("wb") as f:
        def take_terminal() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        terminal.proc = subprocess.Popen(
            nsbuild_argv("--", *sh(script)), cwd=base, stdin=terminal.slave, stdout=f,
            stderr=f, start_new_session=True, preexec_fn=take_terminal)
        terminal.read_until(b"ready\r\n")
        terminal.type(b"hi\n")
        assert terminal.read_until(b"hi\r\n") == b"ready\r\nhi\r\n"
        assert terminal.wait() == 0
    assert out.read_bytes() == b"got hi\nfile\n"
    assert stty_g(terminal.slave) == before


@pytest.mark.root
def test_root_runuser_at_roots_terminal_gets_a_terminal(
        base: Path, terminal: Terminal) -> None:
    """`runuser` keeps root's terminal: the unprivileged caller's sandbox
    cannot reopen it either."""
    terminal.start(as_test_user(nsbuild_argv("--", *sh(BOTH))), base)
    assert terminal.read_until(b"tty\r\n") == b"x\r\ntty\r\n"
    assert terminal.wait() == 0


@pytest.mark.root
def test_root_entered_command_at_a_terminal_gets_one(base: Path, terminal: Terminal) -> None:
    """A command entered into a running sandbox (session shell, the virt server)."""
    null = os.open(os.devnull, os.O_RDWR)
    spec = Sandbox(argv=("sleep", "infinity"), idmap=caller_idmap(),
                   mounts=host_view(str(base)), cwd=str(base),
                   env=(("PATH", "/usr/bin:/bin"),))  # fmt: skip
    sandbox = spawn(spec, stdin=null, stdout=null, stderr=null)
    try:
        before = stty_g(terminal.slave)
        _, pid = sandbox_pids(sandbox)
        proc = start(pid, ("sh", "-c", BOTH + "; tty"), stdin=terminal.slave,
                     stdout=terminal.slave, stderr=terminal.slave)
        out = terminal.read_until(b"tty\r\n/dev/pts/")
        assert out.startswith(b"x\r\ntty\r\n/dev/pts/"), out
        assert proc.wait() == 0
        assert stty_g(terminal.slave) == before
    finally:
        sandbox.kill()
        sandbox.wait()
        os.close(null)


# ------------------------------------------- run by an unprivileged user


@pytest.mark.userns
def test_users_own_terminal_reaches_the_command_itself(tmp_path: Path,
                                                       terminal: Terminal) -> None:
    """The caller's own pts: the same device inside, no pty, mode untouched."""
    before = stty_g(terminal.slave)
    device = os.fstat(terminal.slave).st_rdev
    code = "import os; print(*(os.stat(f'/dev/std{n}').st_rdev for n in ('in', 'out', 'err')))"
    terminal.start(nsbuild_argv("--", *py(code)), tmp_path)
    assert terminal.read_until(b"\r\n") == f"{device} {device} {device}\r\n".encode()
    assert terminal.wait() == 0
    assert stty_g(terminal.slave) == before
