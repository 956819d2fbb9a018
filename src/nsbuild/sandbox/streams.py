"""The command's standard streams, reopenable by name inside as on a machine.

A command reopens a stream by name (/dev/stdout is /proc/self/fd/1), and the
kernel checks the stream's inode as for any open. The caller's pipes, FIFOs
and files may belong to an id the sandbox does not map (root's: its sandbox
runs on its subordinate range; another user's, in a runuser pipeline), or
have a mode the command's user does not pass (pipes are 0600, and the
command may run as another user than root inside). Such a stream reaches the
command through a pipe made inside and owned by the command's user, and
nsbuild copies between that pipe and the caller's descriptor (Relay); the
command holds nothing of the caller's. A stream it can reopen reaches it
untouched: no pipe, no copy.

A terminal it cannot reopen (root's own) is replaced by a pseudo-terminal
made inside, in the sandbox's devpts, owned by the command's user: behind a
pipe the command would lose its terminal (an interactive shell, line
editing, ^C). Every stream that was that terminal becomes the pty's slave,
which the command takes as its controlling terminal; nsbuild relays between
the master and the caller's terminal, which it sets up first (ptyrelay.py).
A socket is kept as it is: no one can open one by name, on a machine either.

    inside (init, or an entered command), with the command's ids:
        stdio, tty = substitute(stdio, chan, owner)
            # sends ("PIPE", index) + fd; ("PTY", indices) + master, and
            # waits for nsbuild's word that the terminal is set up
    host side, with what channel.reports() collected:
        relay = Relay([(index, caller_fd, pipe_fd), ...], terminal); ... relay.join()
"""

from __future__ import annotations

import _thread
import fcntl  # here, not where used: after the pivot the host's Python may be out of sight
import os

from nsbuild.sandbox.channel import SETUP_EXIT

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal

    from nsbuild.sandbox.channel import Channel
    from nsbuild.sandbox.ptyrelay import Terminal
else:
    import _signal as signal

_CHUNK = 1 << 16
# What the command does with each stream: read stdin, write the others.
_ACCESS = (os.R_OK, os.W_OK, os.W_OK)


def _reopenable(fd: int, index: int) -> bool:
    """Whether this process's real ids (the command's) may open `fd` by name.
    access() judges as open() does, capabilities in the namespace included.
    Without /proc, or with `fd` closed, a pipe would change nothing. A
    terminal is used both ways (a shell reads and writes /dev/tty)."""
    name = f"/proc/self/fd/{fd}"
    if not os.access(name, os.F_OK):
        return True
    return os.access(name, os.R_OK | os.W_OK if os.isatty(fd) else _ACCESS[index])


def substitute(stdio: list[int | None], chan: Channel, owner: tuple[int, int] | None
               ) -> tuple[list[int | None], str | None]:
    """The command's stdio sources (None: this process's own 0, 1, 2), each
    one the command could not reopen replaced by a pipe, the command's end
    owned by `owner` (uid, gid; None: this process's ids); the other end goes
    to nsbuild on `chan` ("PIPE", index). stdout and stderr on one inode
    (2>&1) share one pipe, so that their order holds. A terminal is replaced
    by a pty's slave (see _terminal); its path inside is returned with the
    sources, for the command to open as its controlling terminal."""
    result = list(stdio)
    outputs: dict[tuple[int, int], int] = {}
    terminal: list[int] = []  # the indices that were the caller's terminal
    tty_device: int | None = None
    for i, given in enumerate(stdio):
        fd = i if given is None else given
        if _reopenable(fd, i):
            continue
        st = os.fstat(fd)
        if os.isatty(fd):
            if tty_device in (None, st.st_rdev):
                tty_device = st.st_rdev
                terminal.append(i)
            continue  # a second terminal, another device: left as it is
        inode = (st.st_dev, st.st_ino)
        if i and inode in outputs:
            result[i] = outputs[inode]
            continue
        r, w = (_above_stdio(end) for end in os.pipe())
        ours, theirs = (r, w) if i == 0 else (w, r)
        try:
            if owner is not None:
                os.fchown(ours, *owner)
            chan.send("PIPE", str(i), fds=[theirs])
        finally:
            os.close(theirs)
        result[i] = ours
        if i:
            outputs[inode] = ours
    tty = _terminal(terminal, result, chan, owner) if terminal else None
    return result, tty


def _terminal(indices: list[int], result: list[int | None], chan: Channel,
              owner: tuple[int, int] | None) -> str | None:
    """A pty made in the sandbox's devpts (/dev/ptmx inside) in place of the
    caller's terminal at `indices`: its slave, owned by `owner`, becomes those
    streams in `result`; the master goes to nsbuild ("PTY", indices), which
    copies the terminal's mode and size to it before it answers ("T"): the
    command starts with them. Without a devpts (a sandbox's own /dev of
    another kind), the terminal stays as it is. Returns the slave's path."""
    try:
        master, slave = (_above_stdio(end) for end in os.openpty())
    except OSError:
        return None
    try:
        if owner is not None:
            os.fchown(slave, *owner)
        path = os.ttyname(slave)
        chan.send("PTY", "".join(map(str, indices)), fds=[master])
    except BaseException:
        os.close(slave)
        raise
    finally:
        os.close(master)
    if chan.sock.recv(1) != b"T":
        os._exit(SETUP_EXIT)  # nsbuild is gone, or failed: it says why
    for i in indices:
        result[i] = slave
    return path


def _above_stdio(fd: int) -> int:
    """`fd`, moved above 2 if there (this process's own 0, 1 or 2 was closed):
    posix_spawn dup2s the sources onto 0, 1, 2 in order."""
    if fd > 2:
        return fd
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    finally:
        os.close(fd)


class TerminalSlot:
    """channel.reports' on_terminal: sets the caller's terminal up for the
    pty's master that came (ptyrelay.py, imported only then). `callers`: the
    caller's descriptor for each stream."""

    def __init__(self, callers: list[int]) -> None:
        self.callers = callers
        self.terminal: Terminal | None = None

    def __call__(self, indices: str, master: int) -> None:
        from nsbuild.sandbox.ptyrelay import Terminal

        self.terminal = Terminal(master, indices, self.callers)

    def restore(self) -> None:
        if self.terminal is not None:
            self.terminal.restore()


class Relay:
    """Copies between the caller's descriptors and the command's pipes, a
    thread for each (blocking reads and writes: the caller's descriptions
    keep their flags). Each pair: (stream index, caller's descriptor, which
    the relay duplicates, pipe end, which it takes). `terminal`: the pty in
    place of the caller's terminal, copied the same way (a pty's master
    reads as a pipe does, and reports the end of its slave as a hang-up);
    its set-up (raw mode) is undone once the command's output is copied."""

    def __init__(self, pairs: list[tuple[int, int, int]],
                 terminal: Terminal | None = None) -> None:
        self._outputs: list[_thread.LockType] = []
        self._terminal = terminal
        if terminal is not None:
            pairs = [*pairs, *terminal.pairs()]
        # The threads start with every signal blocked: the kernel then gives
        # signals to the main thread, where Python runs the handlers (the ones
        # passed on to the command) at once, even while it waits.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            for i, caller, pipe in pairs:
                self._start(i, caller, pipe)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _start(self, i: int, caller: int, pipe: int) -> None:
        try:
            mine = os.dup(caller)
        except OSError:
            os.close(pipe)  # the command then meets EOF, or EPIPE
            return
        if i == 0:
            # Not waited for: it ends when no process of the command is
            # left to read (or at the caller's EOF), the next time it wakes.
            _thread.start_new_thread(_copy_in, (mine, pipe))
        else:
            done = _thread.allocate_lock()
            done.acquire()
            self._outputs.append(done)
            _thread.start_new_thread(_copy_out, (pipe, mine, done))

    def finished(self) -> bool:
        """All output copied: every process that held the pipes is gone."""
        if any(done.locked() for done in self._outputs):
            return False
        self.abandon()
        return True

    def join(self) -> None:
        try:
            for done in self._outputs:
                done.acquire()
                done.release()
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Give the caller's terminal back as it was (idempotent); what is
        still copied is no longer waited for."""
        if self._terminal is not None:
            self._terminal.restore()


def _copy_out(pipe: int, caller: int, done: _thread.LockType) -> None:
    """The command's output to the caller, up to EOF. If the caller's end is
    gone (EPIPE), closing the pipe gives the command its EPIPE or SIGPIPE, as
    on a machine."""
    try:
        while data := os.read(pipe, _CHUNK):
            _write_all(caller, data)
    except OSError:
        pass
    finally:
        os.close(pipe)
        os.close(caller)
        done.release()


def _copy_in(caller: int, pipe: int) -> None:
    """The caller's input to the command, up to the caller's EOF (then the
    command's), or until no reader of the pipe is left."""
    import select  # only when a stdin is relayed: not on every run's path

    poller = select.poll()
    poller.register(caller, select.POLLIN)
    poller.register(pipe, 0)  # POLLERR, always reported: no reader left
    try:
        while True:
            ready = dict(poller.poll())
            if pipe in ready:
                break
            try:
                data = os.read(caller, _CHUNK)
            except BlockingIOError:
                continue  # another reader of the caller's stdin took it
            if not data:
                break
            _write_all(pipe, data)
    except OSError:
        pass
    finally:
        os.close(pipe)
        os.close(caller)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            # The caller's description is non-blocking (its flags are shared):
            # wait for room.
            import select

            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            poller.poll()
