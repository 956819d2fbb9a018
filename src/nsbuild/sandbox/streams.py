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

A terminal is never replaced: behind a pipe the command would lose it as its
terminal (an interactive shell, line editing), which weighs more than its
name. A socket is kept too: no one can open one by name, on a machine either.

    inside (init, or an entered command), with the command's ids:
        stdio = substitute(stdio, chan, owner)   # sends ("PIPE", index) + fd
    host side, with what channel.reports() collected:
        relay = Relay([(index, caller_fd, pipe_fd), ...]); ... relay.join()
"""

from __future__ import annotations

import _thread
import fcntl  # here, not where used: after the pivot the host's Python may be out of sight
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from nsbuild.sandbox.channel import Channel

_CHUNK = 1 << 16
# What the command does with each stream: read stdin, write the others.
_ACCESS = (os.R_OK, os.W_OK, os.W_OK)


def _reopenable(fd: int, index: int) -> bool:
    """Whether this process's real ids (the command's) may open `fd` by name.
    access() judges as open() does, capabilities in the namespace included.
    Without /proc, or with `fd` closed, a pipe would change nothing."""
    name = f"/proc/self/fd/{fd}"
    if not os.access(name, os.F_OK) or os.isatty(fd):
        return True
    return os.access(name, _ACCESS[index])


def substitute(stdio: list[int | None], chan: Channel,
               owner: tuple[int, int] | None) -> list[int | None]:
    """The command's stdio sources (None: this process's own 0, 1, 2), each
    one the command could not reopen replaced by a pipe, the command's end
    owned by `owner` (uid, gid; None: this process's ids); the other end goes
    to nsbuild on `chan` ("PIPE", index). stdout and stderr on one inode
    (2>&1) share one pipe, so that their order holds."""
    result = list(stdio)
    outputs: dict[tuple[int, int], int] = {}
    for i, given in enumerate(stdio):
        fd = i if given is None else given
        if _reopenable(fd, i):
            continue
        st = os.fstat(fd)
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
    return result


def _above_stdio(fd: int) -> int:
    """`fd`, moved above 2 if there (this process's own 0, 1 or 2 was closed):
    posix_spawn dup2s the sources onto 0, 1, 2 in order."""
    if fd > 2:
        return fd
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    finally:
        os.close(fd)


class Relay:
    """Copies between the caller's descriptors and the command's pipes, a
    thread for each (blocking reads and writes: the caller's descriptions
    keep their flags). Each pair: (stream index, caller's descriptor, which
    the relay duplicates, pipe end, which it takes)."""

    def __init__(self, pairs: list[tuple[int, int, int]]) -> None:
        self._outputs: list[_thread.LockType] = []
        for i, caller, pipe in pairs:
            try:
                mine = os.dup(caller)
            except OSError:
                os.close(pipe)  # the command then meets EOF, or EPIPE
                continue
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
        return not any(done.locked() for done in self._outputs)

    def join(self) -> None:
        for done in self._outputs:
            done.acquire()
            done.release()


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
