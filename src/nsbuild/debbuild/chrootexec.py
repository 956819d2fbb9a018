"""%SBUILD_CHROOT_EXEC: a host command that runs its arguments as root inside
the build's session, its standard input, output and error those of the host
command (so `cat f | %e sh -c "cat > f"` copies a file in).

    host script ─ python -I chrootexec.py SOCKET -- ARGV
                      │ one SEQPACKET message: ARGV, and fds 0, 1, 2 (SCM_RIGHTS)
                      ▼
    nsbuild ─ ExecServer, on SOCKET in the build's private work folder
                      │ peer checked (SO_PEERCRED: the build's own uid)
                      ▼
              backend.run(ARGV, user="root", cwd="/", network="none",
                          stdin/stdout/stderr = the client's descriptors)
                      │ one message back: the exit status, or why not
                      ▼
              the client exits with the inside command's status

The client is this file run as a script: the standard library only, no
nsbuild import, so it starts fast and whatever nsbuild's install is. The
server serves only while an outside stage runs (`started`), and only the
user who runs the build: the socket lives in a folder of mode 0700, and a
peer of another uid (root passes the folder's mode) is refused by its
credentials; the client, in turn, sends its descriptors only to a server
of its own uid. One command runs at a time (the session's runs cannot overlap);
a second is refused while one runs, rather than left waiting. A client that
goes away (Ctrl-C) takes its inside command with it, and the end of the
stage takes whatever still runs.
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import shlex
import signal
import socket
import struct
import sys
import threading

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from nsbuild.backends import Backend

MAGIC = b"NSBUILD-EXEC 1\0"
ESCAPE = "%SBUILD_CHROOT_EXEC"
# One SEQPACKET message carries the whole request: kept well under the
# socket's default send buffer (~208 KiB), which an unprivileged sender
# cannot raise.
MAX_REQUEST = 128 << 10
# What the client exits with when its command could not be run inside.
NOT_RUN = 125
_PROG = "nsbuild chroot-exec"


# -- the client --


def main(argv: list[str]) -> int:
    """SOCKET -- COMMAND [ARG...]: run COMMAND inside; its exit status."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends it, quietly
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if len(argv) < 3 or argv[1] != "--" or not argv[2]:
        return _fail("usage: chrootexec.py SOCKET -- COMMAND [ARG...]", 2)
    path, command = argv[0], argv[2:]
    request = MAGIC + b"\0".join(os.fsencode(a) for a in command)
    if len(request) > MAX_REQUEST or any(b"\0" in os.fsencode(a) for a in command):
        return _fail(f"the command line is longer than {MAX_REQUEST} bytes: not run")
    for fd in (0, 1, 2):
        _ensure_open(fd)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        return _fail("the build's session is not available (the build ended, "
                     "or is not at a stage that offers it): not run")  # fmt: skip
    except OSError as e:
        return _fail(f"cannot reach the build's session: {e.strerror}")
    with sock:
        # The descriptors are the caller's terminal or files: only the
        # build's own server gets them, not whoever listens at the path (a
        # folder another user could move is not enough to take them).
        uid = _peer_uid(sock)
        if uid != os.getuid():
            return _fail(f"refused: {path} is served by uid {uid}, not by this user's "
                         "build: not run")  # fmt: skip
        unsent = None
        try:
            sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                      array.array("i", (0, 1, 2)))])  # fmt: skip
        except OSError as e:
            unsent = e  # a refusal may have come first: it is read below
        try:
            reply = sock.recv(4096)
        except OSError as e:
            reply, unsent = b"", unsent or e
    if not reply and unsent is not None:
        return _fail(f"the build's session went away: {unsent.strerror}")
    if reply.startswith(b"S") and reply[1:].isdigit():
        return min(int(reply[1:]), 255)
    if reply.startswith(b"E"):
        return _fail(reply[1:].decode(errors="replace"))
    return _fail("the build's session ended before the command did")


def _peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end (its listener's, for a client)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def _ensure_open(fd: int) -> None:
    """A closed standard descriptor becomes /dev/null: one is sent for each."""
    try:
        os.fstat(fd)
    except OSError:
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)


def _fail(message: str, status: int = NOT_RUN) -> int:
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in message[:1000])
    with contextlib.suppress(OSError):
        os.write(2, f"{_PROG}: {text}\n".encode(errors="replace"))
    return status


# -- the server --


class ExecServer:
    """Serves the exec escape on `folder`/exec.sock while started, running
    each request in `backend` as root, cwd /, with `env` and no network."""

    def __init__(self, backend: Backend, folder: Path, env: Mapping[str, str]) -> None:
        self.backend = backend
        self.path = folder / "exec.sock"
        self.env = dict(env)
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._lock = threading.Lock()
        # Each connection's thread, and its id in /proc once it runs.
        self._conns: dict[threading.Thread, int | None] = {}
        self._stopping = False
        self._busy = False  # a request runs

    @property
    def busy(self) -> bool:
        """Whether a command runs inside through the escape now."""
        return self._busy

    def command(self) -> str:
        """The %e text: the client with the socket, ready for arguments."""
        script = os.path.abspath(__file__)
        return shlex.join([sys.executable, "-I", script, str(self.path), "--"])

    def start(self) -> None:
        """Listen; a no-op when listening already."""
        if self._listener is not None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a previous stage's, gone with its server
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._accept, name="nsbuild-exec", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and end what still runs (a command left in the
        background, or whose client is gone); idempotent."""
        if self._listener is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.write(self._wake_w, b"x")
        assert self._thread is not None
        self._thread.join()
        with self._lock:
            self._stopping = True
            conns = list(self._conns)
        for thread in conns:
            while thread.is_alive():
                tid = self._conns.get(thread)
                if tid is not None:
                    _kill_children(tid)
                thread.join(0.2)
        self._conns.clear()
        self._listener.close()
        self._listener = None
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _accept(self) -> None:
        assert self._listener is not None
        poller = select.poll()
        poller.register(self._listener, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._wake_r in ready:
                return
            try:
                conn, _ = self._listener.accept()
            except OSError:
                continue
            thread = threading.Thread(target=self._serve, args=(conn,),
                                      name="nsbuild-exec-run", daemon=True)  # fmt: skip
            with self._lock:
                for done in [t for t in self._conns if not t.is_alive() and t.ident]:
                    del self._conns[done]
                self._conns[thread] = None
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns[threading.current_thread()] = threading.get_native_id()
        with conn:
            try:
                reply = self._handle(conn)
            except Exception as e:  # the client hears why; nsbuild goes on
                reply = b"E" + f"failed: {e}".encode(errors="replace")[:2000]
            if reply:
                with contextlib.suppress(OSError):
                    conn.send(reply)

    def _handle(self, conn: socket.socket) -> bytes:
        """The reply to one connection: b"S" and the status, b"E" and why
        not, or b"" when the server stops before the request came."""
        poller = select.poll()
        poller.register(conn, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        if self._wake_r in dict(poller.poll()):
            return b""
        uid = _peer_uid(conn)
        refusal = None
        with self._lock:
            if uid != os.getuid():
                refusal = f"refused: uid {uid} did not start this build"
            elif self._stopping:
                refusal = "the build's session is not available: not run"
            elif self._busy:
                # The session's runs cannot overlap (each mounts its overlay);
                # waiting instead would hang a pipeline of two forever.
                refusal = (f"refused: another command runs inside through {ESCAPE}; "
                           "they run one at a time (a pipeline of two: run it all "
                           "inside, %e sh -c 'a | b')")  # fmt: skip
            else:
                self._busy = True
        if refusal is not None:
            # Taken off the socket unread, its descriptors dropped by the
            # kernel (no room given for them): a socket closed on unread data
            # would reset the connection, and the refusal be lost.
            with contextlib.suppress(OSError):
                conn.recvmsg(1)
            return b"E" + refusal.encode()
        try:
            return self._run(conn)
        finally:
            with self._lock:
                self._busy = False

    def _run(self, conn: socket.socket) -> bytes:
        data, fds = _receive(conn)
        try:
            if len(fds) != 3:
                return b"E" + b"refused: the request must carry exactly 3 descriptors"
            argv = _parse(data)
            if argv is None:
                return b"E" + f"refused: a malformed request (at most {MAX_REQUEST} bytes)".encode()
            watch = _Watch(conn, threading.get_native_id())
            try:
                status = self.backend.run(argv, user="root", network="none", cwd="/",
                                          env=self.env, stdin=fds[0], stdout=fds[1],
                                          stderr=fds[2])  # fmt: skip
            finally:
                watch.stop()
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        return b"S" + str(status).encode()


def _receive(conn: socket.socket) -> tuple[bytes, tuple[int, ...]]:
    """One request: its bytes (b"" if larger than the bound) and the
    descriptors it carried, whatever they are (the caller closes them)."""
    space = socket.CMSG_SPACE(3 * array.array("i").itemsize)
    wanted = socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT  # poll said it is there
    data, ancdata, flags, _ = conn.recvmsg(MAX_REQUEST, space, wanted)
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if flags & socket.MSG_TRUNC:
        data = b""
    if flags & socket.MSG_CTRUNC:
        fds.append(-1)  # not exactly three, whatever arrived
    return data, tuple(fds)


def _parse(data: bytes) -> list[str] | None:
    if not data.startswith(MAGIC):
        return None
    argv = [os.fsdecode(a) for a in data[len(MAGIC):].split(b"\0")]
    return argv if argv and argv[0] else None


class _Watch:
    """While a request runs: its client going away (Ctrl-C, killed) ends the
    run, as a command of its own would end with it."""

    def __init__(self, conn: socket.socket, tid: int) -> None:
        self._conn, self._tid = conn, tid
        self._done_r, self._done_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._watch, name="nsbuild-exec-watch",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def _watch(self) -> None:
        poller = select.poll()
        poller.register(self._conn, select.POLLRDHUP)
        poller.register(self._done_r, select.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._done_r in ready:
                return
            if ready.get(self._conn.fileno(), 0) & (select.POLLRDHUP | select.POLLHUP
                                                     | select.POLLERR):  # fmt: skip
                _kill_children(self._tid)
                poller.unregister(self._conn)

    def stop(self) -> None:
        os.write(self._done_w, b"x")
        self._thread.join()
        os.close(self._done_r)
        os.close(self._done_w)


def _kill_children(tid: int) -> None:
    """Kill the processes thread `tid` started: the helper of its sandbox,
    whose death ends the sandbox (its init and every process in it)."""
    try:
        with open(f"/proc/self/task/{tid}/children") as f:
            pids = f.read().split()
    except OSError:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
