"""The client end of the autopkgtest virtualisation-server protocol.

A server is a program speaking a line protocol on its stdin and stdout
(autopkgtest's README.virtualisation-server): it greets with `ok`, then
answers each command with `ok` and URL-encoded results, or with anything else
on failure. This module only converses; backends/autopkgtest.py builds on it.

Every wait is bounded: an answer that does not come within its time, a server
that exits, or a line that is not `ok ...` ends in a VirtServerError naming
the server, the command and what happened, in one line. `stop()` always
leaves nothing running: it asks politely (close, quit), then terminates the
server's whole process group.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import NoReturn
from urllib.parse import quote, unquote

from nsbuild.backends.errors import BackendError
from nsbuild.printable import printable

# Seconds to wait for an answer, by kind of command. `open` and `revert` may
# unpack a tarball or boot a machine; copies move whole trees.
TIMEOUTS = {"short": 120.0, "open": 900.0, "copy": 900.0}
TIMEOUT_ENV = "NSBUILD_VIRT_TIMEOUT"
# After `quit`, or after a signal: how long a server gets to exit by itself.
EXIT_GRACE = 10.0
KILL_GRACE = 3.0


class VirtServerError(BackendError):
    """The server died, hung, or answered out of protocol."""


def timeouts() -> dict[str, float]:
    """The waits, all replaced by $NSBUILD_VIRT_TIMEOUT (seconds) when set."""
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return dict(TIMEOUTS)
    try:
        seconds = float(value)
        if seconds <= 0:
            raise ValueError
    except ValueError:
        raise VirtServerError(f"${TIMEOUT_ENV}={value!r}: expected a positive number") from None
    return {kind: seconds for kind in TIMEOUTS}


class VirtServer:
    """One running server and the conversation with it."""

    def __init__(self, argv: Sequence[str], *, debug: bool = False) -> None:
        self.argv = list(argv)
        self.name = os.path.basename(self.argv[0])
        self.debug = debug
        self.timeouts = timeouts()
        self.is_open = False
        self._buffer = b""
        self._pidfd = -1
        # The server's stderr is kept to quote its last words in errors; with
        # --debug it goes straight to ours.
        self._stderr = None if debug else tempfile.TemporaryFile()
        try:
            # Its own session and process group: a Ctrl-C at the terminal
            # reaches nsbuild, which then closes the testbed in order, and
            # stop() can take down everything the server started.
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                start_new_session=True,
            )
        except OSError as e:
            self._close_stderr()
            raise VirtServerError(
                f"cannot start virt server {self.argv[0]}: {e.strerror}"
            ) from None
        self._pidfd = os.pidfd_open(self.proc.pid)
        try:
            self._expect("the greeting", self.timeouts["short"], exact=True)
        except BaseException:
            self.stop()
            raise

    # -- commands --

    def command(
        self,
        verb: str,
        *args: str,
        results: int | None = 0,
        kind: str = "short",
        decode: bool = True,
    ) -> list[str]:
        """Send `verb args...` (URL-encoded); return the results of `ok`, decoded
        unless `decode` is false."""
        line = " ".join([verb, *(quote(a) for a in args)])
        self._send(line)
        words = self._expect(f"`{line}'", self.timeouts[kind])
        if results is not None and len(words) != results:
            self._fail(f"answered `{line}' with {len(words)} results, expected {results}")
        return [unquote(w) for w in words] if decode else words

    def capabilities(self) -> list[str]:
        return self.command("capabilities", results=None)

    def open(self) -> str:
        scratch = self.command("open", results=1, kind="open")[0]
        self.is_open = True
        return scratch

    def revert(self) -> str:
        return self.command("revert", results=1, kind="open")[0]

    def close(self) -> None:
        """Close the testbed (the server keeps running: `open` may follow)."""
        self.command("close")
        self.is_open = False

    def execute_command(self) -> list[str]:
        (encoded,) = self.command("print-execute-command", results=1, decode=False)
        # The program and each argument are URL-encoded, then joined with
        # commas: split first, then decode each.
        argv = [unquote(part) for part in encoded.split(",")]
        if not argv[0]:
            self._fail("gave an empty execute command")
        return argv

    def copydown(self, host: str, inside: str) -> None:
        self.command("copydown", host, inside, kind="copy")

    def copyup(self, inside: str, host: str) -> None:
        self.command("copyup", inside, host, kind="copy")

    # -- the end --

    def stop(self) -> None:
        """Close the testbed, quit, and make sure no process of the server is left.
        Idempotent; never raises for the server's misbehaviour."""
        proc = self.proc
        if proc.returncode is None and proc.poll() is None:
            with contextlib.suppress(VirtServerError, OSError):
                if self.is_open:
                    self.is_open = False
                    self.command("close")
                # The answer to `quit` is not awaited: servers differ on it.
                self._send("quit")
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()
            try:
                proc.wait(timeout=EXIT_GRACE)
            except subprocess.TimeoutExpired:
                pass
        self.is_open = False
        self._kill_group()
        if proc.stdout is not None:
            proc.stdout.close()
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        self._close_stderr()

    def _kill_group(self) -> None:
        """Terminate what is left of the server's process group (it leads it)."""
        pgid = self.proc.pid
        for sig, grace in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, KILL_GRACE)):
            if not _group_alive(pgid) and self.proc.poll() is not None:
                return
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                self.proc.poll()
                if self.proc.returncode is not None and not _group_alive(pgid):
                    return
                time.sleep(0.02)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=KILL_GRACE)

    def _close_stderr(self) -> None:
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    # -- lines --

    def _send(self, line: str) -> None:
        if self.debug:
            print(f"nsbuild: virt -> {line}", flush=True, file=sys.stderr)
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            self._died(f"sending `{line}'")

    def _expect(self, what: str, timeout: float, *, exact: bool = False) -> list[str]:
        line = self._readline(what, timeout)
        words = line.split()
        if not words or words[0] != "ok" or (exact and len(words) != 1):
            self._fail(f"answered {what} with '{printable(line, 80)}', expected 'ok'")
        return words[1:]

    def _readline(self, what: str, timeout: float) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        # The server's exit is watched apart from its output: a helper it
        # started may hold the pipe open long after the server itself died.
        exited = False
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail(f"gave no answer to {what} within {timeout:g} s")
            watch = [fd] if exited else [fd, self._pidfd]
            ready, _, _ = select.select(watch, [], [], 0 if exited else left)
            if self._pidfd in ready:
                exited = True
            if fd in ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    self._died(f"waiting for the answer to {what}")
                self._buffer += chunk
            elif exited:
                # Gone, and all it wrote before is read: no answer will come.
                self._died(f"waiting for the answer to {what}")
        raw, _, self._buffer = self._buffer.partition(b"\n")
        line = raw.decode(errors="replace").strip()
        if self.debug:
            print(f"nsbuild: virt <- {printable(line)}", flush=True, file=sys.stderr)
        return line

    def _died(self, doing: str) -> NoReturn:
        try:
            status = self.proc.wait(timeout=KILL_GRACE)
            how = (
                f"exited with status {status}" if status >= 0 else f"was killed by signal {-status}"
            )
        except subprocess.TimeoutExpired:
            how = "closed its output"
        self._fail(f"{how} while {doing}")

    def _fail(self, message: str) -> NoReturn:
        last = self._last_stderr_line()
        # Before raising, so that an error never leaves the server running.
        self.is_open = False
        self._kill_group()
        raise VirtServerError(
            f"virt server {self.name} {message}" + (f" (it said: {last})" if last else "")
        )

    def _last_stderr_line(self) -> str:
        if self._stderr is None:
            return ""
        try:
            self._stderr.seek(0, os.SEEK_END)
            size = self._stderr.tell()
            self._stderr.seek(max(0, size - 4096))
            lines = self._stderr.read().decode(errors="replace").strip().splitlines()
        except (OSError, ValueError):
            return ""
        # The server's stderr carries what its testbed printed: escaped.
        return printable(lines[-1].strip(), 200) if lines else ""


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
