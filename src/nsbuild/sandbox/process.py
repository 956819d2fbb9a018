"""The handle of a running sandbox: wait for it, pass signals on, kill it."""

from __future__ import annotations

import _socket
import os

from nsbuild.sandbox.channel import FORWARDED_SIGNALS, SETUP_EXIT
from nsbuild.sandbox.errors import SandboxError
from nsbuild.sandbox.streams import Relay

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from collections.abc import Callable
    from typing import IO
else:
    import _signal as signal

PIPE = -1


class Process:
    """A running sandbox. `pid` is the helper process on the host side; it
    writes the command's status on a pipe (status_fd) once init, and with it
    every process and mount of the sandbox, is gone, then exits itself.
    `relay` copies the command's streams that it could not reopen
    (streams.py): the command has ended once it copied all its output too."""

    def __init__(self, pid: int, stdin: IO[bytes] | None, stdout: IO[bytes] | None,
                 stderr: IO[bytes] | None, sockets: list[_socket.socket],
                 exec_error: str | None, status_fd: int | None = None,
                 relay: Relay | None = None) -> None:
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.sockets = sockets
        self.exec_error = exec_error
        self.returncode: int | None = None
        self._status_fd = status_fd
        self._relay = relay
        self._status: int | None = None  # the helper's wait status, once reaped

    def _set(self, status: int) -> int:
        """The command's status, from the helper's wait status."""
        code = os.waitstatus_to_exitcode(status)
        self.returncode = 128 - code if code < 0 else code
        # The helper exits with the command's status, which it also wrote on
        # the pipe; SETUP_EXIT without that is its own failure.
        failed = code == SETUP_EXIT and self._status_fd is not None and not self._told()
        self._close_status()
        if failed:
            raise SandboxError("the sandbox's helper failed after the command started")
        return self.returncode

    def _told(self) -> bool:
        assert self._status_fd is not None
        os.set_blocking(self._status_fd, False)
        try:
            return os.read(self._status_fd, 16) != b""
        except BlockingIOError:
            return False

    def _close_status(self) -> None:
        if self._status_fd is not None:
            os.close(self._status_fd)
            self._status_fd = None

    def poll(self) -> int | None:
        if self.returncode is None:
            if self._status is None:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self._status = status
            if self._status is not None and (self._relay is None or self._relay.finished()):
                self._set(self._status)
        return self.returncode

    def wait(self) -> int:
        """The command's exit status, once all its output is copied."""
        if self.returncode is None:
            if self._status is None:
                _, self._status = os.waitpid(self.pid, 0)
            if self._relay is not None:
                self._relay.join()
            self._set(self._status)
        assert self.returncode is not None
        return self.returncode

    def wait_relaying(self) -> int:
        """Say why the command could not be executed, if so; then wait for
        its exit status, with SIGINT, SIGTERM, SIGHUP and SIGQUIT passed on
        to it meanwhile (main thread only). The command does not outlive a
        failure here."""
        self.tell_exec_error(2)
        restore = self.relay_signals()
        try:
            return self.wait()
        except BaseException:
            self.kill()
            self.wait()
            raise
        finally:
            restore()

    def tell_exec_error(self, fd: int) -> None:
        """Say on `fd` why the command could not be executed, if it could not."""
        if self.exec_error:
            try:
                os.write(fd, f"nsbuild: {self.exec_error}\n".encode(errors="replace"))
            except OSError:
                pass  # the caller's stderr is gone: nothing else to tell it with

    def relay_signals(self) -> Callable[[], None]:
        """Pass SIGINT, SIGTERM, SIGHUP and SIGQUIT on to the command (main
        thread only); returns what undoes it."""
        previous = {sig: signal.signal(sig, lambda n, _f: self.send_signal(n))
                    for sig in FORWARDED_SIGNALS}  # fmt: skip

        def restore() -> None:
            for sig, handler in previous.items():
                # None: a handler not set from Python; the default is the nearest.
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)

        return restore

    def send_signal(self, sig: int) -> None:
        """Deliver `sig` to the command (relayed by the helper and init)."""
        if self._status is None:  # the helper's pid is not yet free for reuse
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """Kill the whole sandbox: the helper's death takes init and all with it.
        Its output is no longer waited for (the caller may not be reading),
        and the caller's terminal, if relayed, is given back as it was."""
        if self._relay is not None:
            self._relay.abandon()
        self._relay = None
        if self._status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
