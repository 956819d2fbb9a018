"""The server's own commands in the testbed: making the test user, copies, the shell.

They enter the testbed's live sandbox like any command. What they print
(stdout too: the server's stdout carries the protocol only) reaches the
server's stderr through a relay, escaped and cut: the testbed may have
replaced the program with anything.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from typing import TYPE_CHECKING

from nsbuild.virtserver.protocol import PROG, CommandFailed

if TYPE_CHECKING:
    from nsbuild.sandbox import Process
    from nsbuild.virtserver.live import LiveSandbox

# Lines of one command relayed, at most; the rest is read and counted.
RELAY_LINES = 50
RELAY_LINE_BYTES = 1024
# How long an answer waits for the output of the command it ran to be relayed.
RELAY_GRACE = 2.0


class Inside:
    """Starts commands in the open testbed's sandbox (`live`, None while
    none is open) and keeps the relays of their output."""

    def __init__(self) -> None:
        self.live: LiveSandbox | None = None
        self._relays: list[threading.Thread] = []
        self._devnull = -1

    def start(self, argv: list[str], stdin: int | None = None, stdout: int | None = None,
              stderr: int | None = None) -> Process:  # fmt: skip
        """A command in the testbed; stdin /dev/null and output to the
        relay unless given."""
        assert self.live is not None
        if stdin is None:
            if self._devnull < 0:
                self._devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            stdin = self._devnull
        out, relay = _relay()
        self._relays.append(relay)
        try:
            return self.live.start(argv, stdin=stdin, stdout=stdout if stdout is not None else out,
                                   stderr=stderr if stderr is not None else out)  # fmt: skip
        finally:
            os.close(out)

    def run(self, argv: list[str], *, timeout: float) -> int:
        """A command's status, once it ended (CommandFailed past `timeout`)."""
        return wait(self.start(argv), time.monotonic() + timeout, argv)

    def drain(self) -> None:
        """Let the output of the commands just run reach our stderr before
        the answer (a process they left running may keep its relay open)."""
        deadline = time.monotonic() + RELAY_GRACE
        relays, self._relays = self._relays, []
        for relay in relays:
            relay.join(max(0.0, deadline - time.monotonic()))


def wait(proc: Process, deadline: float, argv: list[str]) -> int:
    """The command's status, or CommandFailed("timeout") once `deadline` passed."""
    pidfd = os.pidfd_open(proc.pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))
    finally:
        os.close(pidfd)
    if not ready:
        proc.kill()
        proc.wait()
        raise CommandFailed("timeout", f"{' '.join(argv[:3])}...: timed out")
    return proc.wait()


def _relay() -> tuple[int, threading.Thread]:
    """The write end of a pipe whose lines a thread writes to our stderr,
    each escaped and cut, the first RELAY_LINES only; and that thread."""
    r, w = os.pipe2(os.O_CLOEXEC)
    thread = threading.Thread(target=_pump, args=(r,), daemon=True)
    thread.start()
    return w, thread


def _pump(fd: int) -> None:
    from nsbuild.printable import printable

    shown = dropped = 0
    with open(fd, "rb") as output:
        # Ends when the last writer is gone (a process the command left
        # running in the testbed may hold it until the testbed goes).
        while line := output.readline(RELAY_LINE_BYTES):
            if shown == RELAY_LINES:
                dropped += 1
                continue
            text = line.decode(errors="surrogateescape").removesuffix("\n")
            shown += 1
            if not _to_stderr(printable(text, RELAY_LINE_BYTES)):
                shown = RELAY_LINES  # nobody reads our stderr: only drain the pipe
    if dropped:
        _to_stderr(f"{PROG}: ({dropped} more lines of output not shown)")


def _to_stderr(line: str) -> bool:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        return False
    return True
