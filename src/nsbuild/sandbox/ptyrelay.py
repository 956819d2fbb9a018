"""The caller's terminal, while a pty made inside the sandbox stands for it.

Before the command starts, the pty gets the terminal's mode and window size;
the terminal itself goes raw, so that every key (^C, ^Z, ^D included)
reaches the command's terminal, whose line discipline acts on it, as with
`docker run -t`, `machinectl shell` or `script`. Later window sizes follow
(SIGWINCH). The mode comes back when the relay ends (streams.Relay): the
command ended, nsbuild failed or gave up on it, or nsbuild exits, or a
signal that would end it arrives.

Imported only when a pty was made: termios is kept off the run path.
"""

from __future__ import annotations

import _thread
import atexit
import fcntl
import os
import termios

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
    from types import FrameType
    from typing import Any
else:
    import _signal

# Signals whose default ends nsbuild: the mode is restored first.
_ENDING = (_signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT)
_WINSIZE = b"\0" * 8


class Terminal:
    """The caller's terminal (which is each caller descriptor in `callers`
    at the stream `indices`, "0", "12", ...) and the pty `master` (taken)."""

    def __init__(self, master: int, indices: str, callers: list[int]) -> None:
        self.master = master
        streams = [int(c) for c in indices]
        self._tty = callers[streams[0]]
        self._input = callers[0] if 0 in streams else None
        # Without stdout or stderr at the terminal, what the command's terminal
        # shows (the echo of typed keys) goes to the terminal all the same.
        self._output = callers[next((i for i in streams if i), 0)]
        self._saved: list[Any] | None = None
        self._handlers: dict[int, Any] = {}
        self._wakeup: tuple[int, int] | None = None  # (write end, the wakeup fd before)
        self._done = False
        try:
            self._set_up()
        except BaseException:
            self.restore()
            raise

    def _set_up(self) -> None:
        try:
            mode = termios.tcgetattr(self._tty)
        except termios.error:
            mode = None  # not a terminal after all (gone): the pty's own mode
        if mode is not None:
            termios.tcsetattr(self.master, termios.TCSANOW, mode)
        _copy_size(self._tty, self.master)
        self._watch_signals()
        if self._input is not None and mode is not None and self._foreground():
            for sig in _ENDING:
                # Main thread only: where the wakeup fd could be set.
                if self._wakeup is not None and _signal.getsignal(sig) == _signal.SIG_DFL:
                    self._handle(sig, self._end)
            atexit.register(self.restore)
            termios.tcsetattr(self._tty, termios.TCSADRAIN, _raw(mode))
            self._saved = mode

    def _watch_signals(self) -> None:
        """Follow SIGWINCH from a thread of its own, woken through Python's
        signal wakeup fd: the kernel may give a signal to any thread that
        does not block it (another part of nsbuild may have started one),
        while Python runs handlers in the main thread only, which may be
        waiting for the command. Main thread only (the others cannot)."""
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            before = _signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:
            os.close(r)
            os.close(w)
            return
        self._wakeup = (w, before)
        # A handler of Python's, which writes the number to the wakeup fd.
        self._handle(_signal.SIGWINCH, _nothing)
        mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, _signal.valid_signals())
        try:
            _thread.start_new_thread(self._watch, (r, os.dup(self.master)))
        finally:
            _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)

    def _watch(self, wakeup: int, master: int) -> None:
        """Until the wakeup fd is given back: pass on each window size, and
        restore the mode at once on a signal that will end nsbuild."""
        import select

        poller = select.poll()
        poller.register(wakeup, select.POLLIN)
        try:
            while True:
                poller.poll()
                try:
                    signals = os.read(wakeup, 64)
                except BlockingIOError:
                    continue
                if not signals:
                    break  # restore() closed the write end
                if _signal.SIGWINCH in signals:
                    _copy_size(self._tty, master)
                if any(sig in signals and _signal.getsignal(sig) == self._end
                       for sig in _ENDING):  # fmt: skip
                    self._restore_mode()
        except OSError:
            pass
        finally:
            os.close(wakeup)
            os.close(master)

    def pairs(self) -> list[tuple[int, int, int]]:
        """Relay pairs (streams.Relay): keys to the master, and what the
        command's terminal shows back to the caller's."""
        pairs = [(1, self._output, os.dup(self.master))]
        if self._input is not None:
            pairs.append((0, self._input, os.dup(self.master)))
        return pairs

    def restore(self) -> None:
        """The terminal's mode and nsbuild's signal handling as they were
        (idempotent)."""
        if self._done:
            return
        self._done = True
        try:
            self._restore_mode()
        finally:
            atexit.unregister(self.restore)
            for sig, handler in self._handlers.items():
                try:
                    _signal.signal(sig, handler)
                except ValueError:
                    pass  # not the main thread: the handler stays, and does nothing
            if self._wakeup is not None:
                w, before = self._wakeup
                try:
                    _signal.set_wakeup_fd(before)
                    os.close(w)  # the watcher ends
                except ValueError:
                    pass  # not the main thread: Python keeps writing to w
            os.close(self.master)

    def _restore_mode(self) -> None:
        saved, self._saved = self._saved, None
        if saved is not None:
            try:
                termios.tcsetattr(self._tty, termios.TCSADRAIN, saved)
            except termios.error:
                pass  # the terminal is gone: nothing left to restore

    def _foreground(self) -> bool:
        """Whether nsbuild is in the terminal's foreground: a job in the
        background leaves the mode of the terminal alone."""
        try:
            return os.tcgetpgrp(self._tty) == os.getpgrp()
        except OSError:
            return True  # not nsbuild's controlling terminal: no job control on it

    def _handle(self, sig: int, handler: Any) -> None:
        self._handlers[sig] = _signal.signal(sig, handler)

    def _end(self, sig: int, _frame: FrameType | None) -> None:
        """A signal that ends nsbuild: restore the mode, then end as it would have."""
        self.restore()
        _signal.signal(sig, _signal.SIG_DFL)
        os.kill(os.getpid(), sig)


def _nothing(_sig: int, _frame: FrameType | None) -> None:
    pass


def _copy_size(tty: int, master: int) -> None:
    try:
        size = fcntl.ioctl(tty, termios.TIOCGWINSZ, _WINSIZE)
        # The kernel sends the command's foreground SIGWINCH.
        fcntl.ioctl(master, termios.TIOCSWINSZ, size)
    except OSError:
        pass


def _raw(mode: list[Any]) -> list[Any]:
    """cfmakeraw(3): bytes pass unchanged, one at a time, no echo, no signals."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = mode
    assert isinstance(iflag, int) and isinstance(oflag, int)
    assert isinstance(cflag, int) and isinstance(lflag, int) and isinstance(cc, list)
    t = termios
    iflag &= ~(t.IGNBRK | t.BRKINT | t.PARMRK | t.ISTRIP | t.INLCR | t.IGNCR | t.ICRNL
               | t.IXON)  # fmt: skip
    oflag &= ~t.OPOST
    lflag &= ~(t.ECHO | t.ECHONL | t.ICANON | t.ISIG | t.IEXTEN)
    cflag = (cflag & ~(t.CSIZE | t.PARENB)) | t.CS8
    cc = list(cc)
    cc[t.VMIN], cc[t.VTIME] = 1, 0
    return [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]
