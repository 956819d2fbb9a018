"""What nsbuild's own processes tell one another while a sandbox starts.

A child (the helper, init, the joiner of enter.py) reports on a
close-on-exec SEQPACKET channel: a setup failure ("ERR" or "MSG", or "GONE"
when the sandbox to enter ended), the command's exec error ("EXEC"), sockets
made inside the sandbox ("SOCK", SCM_RIGHTS), the host end of a pipe that
stands for one of the command's standard streams ("PIPE", streams.py), the
master of a pty that stands for the caller's terminal ("PTY", answered "T"
once the terminal is set up). EOF on it means the command was exec'd. The
parent turns a failure into a raised SetupError or SandboxError (NotRunning
for "GONE").
"""

from __future__ import annotations

import _socket
import errno
import os
import struct

from nsbuild.sandbox import mounts as m
from nsbuild.sandbox.errors import NotRunning, SandboxError, SetupError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from collections.abc import Callable
    from typing import NoReturn
else:
    import _signal as signal

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
# A child's exit status when setup failed, between nsbuild's own processes
# only: the real error is on the channel, and the parent raises it.
SETUP_EXIT = 125


class Channel:
    """The child side of the report channel."""

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock

    def send(self, *fields: str, fds: list[int] | None = None) -> None:
        data = "\t".join(fields).encode(errors="replace")
        anc = ([(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
               if fds else [])
        self.sock.sendmsg([data], anc)


def recv_with_fds(sock: _socket.socket) -> tuple[bytes, list[int]]:
    """One message and the descriptors that came with it."""
    data, anc, _flags, _addr = sock.recvmsg(4096, _socket.CMSG_LEN(16 * 4))
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds += struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4])
    return data, fds


def reports(sock: _socket.socket, pid: int,
            on_terminal: Callable[[str, int], None] | None = None
            ) -> tuple[list[_socket.socket], str | None, list[tuple[int, int]]]:
    """What the sandbox sends until the command was exec'd (EOF): inside
    sockets, the command's exec error, and (stream index, pipe end) for each
    stream relayed; a setup failure is raised. A pty's master, with the
    indices of the streams it stands for, goes to `on_terminal` (which takes
    it), and the sandbox is told to go on."""
    sockets: list[_socket.socket] = []
    exec_error = None
    pipes: list[tuple[int, int]] = []
    try:
        while True:
            data, fds = recv_with_fds(sock)
            if not data:
                return sockets, exec_error, pipes
            if data.startswith(b"PTY\t") and len(fds) == 1 and _stream_set(data[4:]):
                _terminal(sock, data[4:].decode(), fds[0], on_terminal)
                continue
            exec_error = _report(data, fds, pid, sockets, pipes) or exec_error
    except BaseException:
        for _, fd in pipes:
            os.close(fd)
        raise


def _stream_set(indices: bytes) -> bool:
    return 0 < len(indices) <= 3 and all(c in b"012" for c in indices) \
        and len(set(indices)) == len(indices)


def _terminal(sock: _socket.socket, indices: str, master: int,
              on_terminal: Callable[[str, int], None] | None) -> None:
    os.set_inheritable(master, False)
    if not os.isatty(master):
        os.close(master)
        raise SandboxError("the sandbox sent a pseudo-terminal that is not one")
    if on_terminal is None:
        os.close(master)  # nothing to relay to: the command's terminal shows nothing
    else:
        on_terminal(indices, master)
    sock.send(b"T")


def _report(data: bytes, fds: list[int], pid: int, sockets: list[_socket.socket],
            pipes: list[tuple[int, int]]) -> str | None:
    """One report: a socket or a pipe kept, an exec error returned."""
    kind, _, rest = data.partition(b"\t")
    if kind == b"SOCK":
        # The C-level socket type (the run path, cli/main.py); callers
        # may wrap it: socket.socket(fileno=s.detach()).
        sockets += [_socket.socket(fileno=fd) for fd in fds]
    elif kind == b"PIPE" and len(fds) == 1 and rest in (b"0", b"1", b"2"):
        # Received without close-on-exec: a copy in a later child would keep
        # the command's stdin from its EOF.
        os.set_inheritable(fds[0], False)
        pipes.append((int(rest), fds[0]))
    elif kind == b"EXEC":
        _, err, name = data.decode(errors="replace").split("\t", 2)
        code = int(err)
        return (f"{name}: command not found" if code == errno.ENOENT
                else f"{name}: cannot execute: {os.strerror(code)}")
    else:
        raise_report(data, fds, pid)
    return None


def report_failure(chan: Channel, e: BaseException) -> NoReturn:
    try:
        if isinstance(e, SetupError):
            chan.send("ERR", e.step, str(e.errno), e.path or "", e.hint or "")
        elif isinstance(e, OSError):
            chan.send("ERR", m.Step.current, str(e.errno or 0), str(e.filename or ""), "")
        else:
            chan.send("MSG", f"{m.Step.current}: {type(e).__name__}: {e}")
    finally:
        os._exit(SETUP_EXIT)


def raise_report(data: bytes, fds: list[int], pid: int) -> NoReturn:
    for fd in fds:
        os.close(fd)
    text = data.decode(errors="replace")
    fields = text.split("\t")
    if fields[0] == "ERR" and len(fields) == 5:
        _, step, err, path, hint = fields
        raise SetupError(step, int(err), path or None, hint or _hint_for(step, int(err)))
    if fields[0] == "MSG":
        raise SandboxError(fields[1])
    if fields[0] == "GONE":
        raise NotRunning("the sandbox ended before the command could enter it")
    if not data:
        raise SandboxError("the sandbox helper died before it started the command")
    raise SandboxError(f"unexpected message from the sandbox helper: {text!r}")


def _hint_for(step: str, err: int) -> str | None:
    if step == "unshare user namespace" and err in (errno.EPERM, errno.EACCES, errno.ENOSPC):
        return ("unprivileged user namespaces are disabled or exhausted: check "
                "'sysctl kernel.unprivileged_userns_clone' (must be 1), "
                "'sysctl kernel.apparmor_restrict_unprivileged_userns' (must be 0) and "
                "'sysctl user.max_user_namespaces'")
    if "bind" in step and step.startswith("mount") and err == errno.EACCES:
        return ("the sandbox's ids (your subordinate range) cannot reach this path: "
                "a parent directory is private (e.g. mode 0700); run from, or bind, a "
                "directory they can traverse")
    if step.startswith("mount overlay") and err in (errno.EPERM, errno.EINVAL):
        return "overlayfs in a user namespace needs Linux >= 5.11 (userxattr)"
    return None
