"""Execute a `Sandbox`: the process pipeline and its setup steps.

    nsbuild (parent, host)                 writes id maps, relays signals, waits
      └─ helper (new user namespace, or    unshares PID, IPC, UTS and cgroup
           │    a kept one: userns.py)     namespaces, forks init at once, then
           │                               makes the network namespace (lo up,
           │                               inside sockets) and hands it to init;
           │                               maps init's nested namespace, waits
           └─ init, PID 1                  makes the mount namespace, waits for
                │                          the id maps, builds the root, joins
                │                          the network namespace, pivots, locks
                │                          the mounts, hardens itself, reaps
                └─ command                 posix_spawn()ed: vfork and exec, no
                                           copy of the Python process

Setup failures travel back over a close-on-exec SEQPACKET channel; EOF on it
means the command was exec'd. The same channel carries sockets made inside the
sandbox's network namespace back to the parent (SCM_RIGHTS). The helper and
init die with their parents (PR_SET_PDEATHSIG), and when init dies the kernel
kills every process in the PID namespace, the command too, so nothing of the
sandbox outlives a killed nsbuild (a user namespace keeper, userns.py, holds
none of it). Only init and the command are ever in the
sandbox's mount namespaces, so no mount is left once init is gone; the helper
then writes the command's status to the parent on a pipe before its own exit,
which a caller about to exit need not wait for (Process.wait(reap_helper=False)).

Children never raise into the caller's code: everything after fork() ends in
_exit(), and output from them goes through write(2) (no locks shared with
the parent's threads).
"""

from __future__ import annotations

# _socket and _signal, not socket and signal: those import enum, several
# milliseconds of the startup of every `nsbuild run`.
import _socket

# _struct, the C module that struct.py re-exports (one module fewer), not
# array: it imports collections (~2 ms on every run).
import _struct as struct
import errno
import fcntl  # here, not where used: after the pivot the host's Python may be out of sight
import posix  # not os: see posixutil

from nsbuild.sandbox import mounts as m
from nsbuild.sandbox import syscalls as sc
from nsbuild.sandbox import userns
from nsbuild.sandbox.errors import SandboxError, SetupError
from nsbuild.sandbox.idmap import write_maps
from nsbuild.sandbox.spec import IdMap, InsideSocket, Sandbox

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from collections.abc import Callable
    from typing import IO, NoReturn, TypeVar

    _T = TypeVar("_T")
else:
    import _signal as signal

PIPE = -1
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
# Helper/init exit status when setup failed; the real error is on the channel.
SETUP_EXIT = 125

_SIOCSIFFLAGS = 0x8914
_IFF_UP_LOOPBACK_RUNNING = 0x1 | 0x8 | 0x40


def _debug_printer(enabled: bool) -> Callable[[str], None]:
    import time

    start = time.monotonic()

    def say(msg: str) -> None:
        if enabled:
            ms = (time.monotonic() - start) * 1000
            posix.write(2, f"nsbuild: [{ms:6.1f} ms] {msg}\n".encode(errors="replace"))

    return say


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


def report_failure(chan: Channel, e: BaseException) -> NoReturn:
    try:
        if isinstance(e, SetupError):
            chan.send("ERR", e.step, str(e.errno), e.path or "", e.hint or "")
        elif isinstance(e, OSError):
            chan.send("ERR", m.Step.current, str(e.errno or 0), str(e.filename or ""), "")
        else:
            chan.send("MSG", f"{m.Step.current}: {type(e).__name__}: {e}")
    finally:
        posix._exit(SETUP_EXIT)


class Process:
    """A running sandbox. `pid` is the helper process on the host side; it
    writes the command's status on a pipe (status_fd) once init, and with it
    every process and mount of the sandbox, is gone, then exits itself."""

    def __init__(self, pid: int, stdin: IO[bytes] | None, stdout: IO[bytes] | None,
                 stderr: IO[bytes] | None, sockets: list[_socket.socket],
                 exec_error: str | None, status_fd: int | None = None) -> None:
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.sockets = sockets
        self.exec_error = exec_error
        self.returncode: int | None = None
        self._status_fd = status_fd

    def _set(self, status: int) -> int:
        code = posix.waitstatus_to_exitcode(status)
        self.returncode = 128 - code if code < 0 else code
        self._close_status()
        return self.returncode

    def _close_status(self) -> None:
        if self._status_fd is not None:
            posix.close(self._status_fd)
            self._status_fd = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = posix.waitpid(self.pid, posix.WNOHANG)
            if pid:
                self._set(status)
        return self.returncode

    def wait(self, *, reap_helper: bool = True) -> int:
        """The command's exit status. With reap_helper=False, return as soon
        as the sandbox is gone, leaving the helper's own exit (a few hundred
        microseconds of freeing its copy of this process) unwaited for: for a
        caller about to exit, whose helper its reaper then collects."""
        if self.returncode is None:
            # Only then: a helper forked meanwhile for another sandbox (a
            # threaded caller) would hold this pipe open too.
            told = (posix.read(self._status_fd, 16)
                    if not reap_helper and self._status_fd is not None
                    else b"")
            if told:
                self.returncode = int(told)
                self._close_status()
            else:
                _, status = posix.waitpid(self.pid, 0)
                self._set(status)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Deliver `sig` to the command (relayed by the helper and init)."""
        if self.returncode is None:
            try:
                posix.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """Kill the whole sandbox: the helper's death takes init and all with it."""
        if self.returncode is None:
            try:
                posix.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run(spec: Sandbox, on_start: Callable[[Process], object] | None = None, *,
        reap_helper: bool = True, leave_keeper: bool = True) -> int:
    """Run the sandbox with the caller's stdio; return the command's exit status
    (128+N when killed by signal N). `on_start` gets the Process once the
    command runs (e.g. to serve its inside sockets). reap_helper: see
    Process.wait; leave_keeper: see spawn."""
    proc = spawn(spec, leave_keeper=leave_keeper)
    previous = {s: signal.getsignal(s) for s in FORWARDED_SIGNALS}  # restored at the end
    try:
        if on_start is not None:
            try:
                on_start(proc)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        for s in FORWARDED_SIGNALS:
            signal.signal(s, lambda sig, _f: proc.send_signal(sig))
        status = proc.wait(reap_helper=reap_helper)
        if proc.exec_error:
            posix.write(2, f"nsbuild: {proc.exec_error}\n".encode(errors="replace"))
        return status
    finally:
        for s, h in previous.items():
            # None: not set from Python; the default is the nearest to it.
            signal.signal(s, signal.SIG_DFL if h is None else h)


def spawn(spec: Sandbox, *, stdin: int | None = None, stdout: int | None = None,
          stderr: int | None = None, leave_keeper: bool = True) -> Process:
    """Start the sandbox; return once the command was exec'd (or raise SetupError).
    leave_keeper=False: if this run makes its user namespace, it leaves no
    keeper in it (userns.py), as for a run whose caller sits in a cgroup of
    the run's own (resource limits), which must be empty when the run ends."""
    spec.validate()
    lifetime = userns.lifetime()  # a bad setting fails first, whoever runs
    if not spec.idmap.helper:
        lifetime = 0  # ids written directly: nothing to keep
    plan = m.prepare(spec)  # host-side checks: sources exist, resolved once
    say = _debug_printer(spec.debug)
    if spec.idmap.warning:
        posix.write(2, f"nsbuild: warning: {spec.idmap.warning}\n".encode())

    # A user namespace kept mapped by an earlier run (userns.py); else this
    # run makes one, and leaves a keeper in it unless the run has a cgroup of
    # its own (which must be empty when the run ends).
    kept = userns.join_fd(spec.idmap) if lifetime else None
    keep = (lifetime if kept is None and lifetime and leave_keeper and not spec.cgroup
            and userns.can_record() else 0)
    parent_ends: list[int | None] = [None, None, None]
    child_ends: list[int | None] = [None, None, None]
    for i, want in enumerate((stdin, stdout, stderr)):
        if want == PIPE:
            r, w = posix.pipe()
            parent_ends[i], child_ends[i] = (w, r) if i == 0 else (r, w)
        elif want is not None:
            child_ends[i] = want

    status_r = status_w = -1
    try:
        status_r, status_w = posix.pipe()
        parent_sock, child_sock = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        parent_pid = posix.getpid()
        try:
            pid = posix.fork()
        except OSError as e:
            parent_sock.close()
            child_sock.close()
            raise SetupError("fork the sandbox's helper", e.errno or errno.EAGAIN) from None
    except BaseException:
        m.release(plan)
        for fd in {*parent_ends, *child_ends} - {None, stdin, stdout, stderr}:
            posix.close(fd)  # type: ignore[arg-type]
        for fd in (status_r, status_w, -1 if kept is None else kept[0]):
            if fd >= 0:
                posix.close(fd)
        raise
    if pid == 0:
        parent_sock.close()
        posix.close(status_r)
        for fd in parent_ends:
            if fd is not None:
                posix.close(fd)
        _helper(spec, plan, Channel(child_sock), child_ends, parent_pid,
                None if kept is None else kept[0], keep, status_w, say)

    child_sock.close()
    posix.close(status_w)
    m.release(plan)  # the cloned trees live on in the child only
    if kept is not None:
        posix.close(kept[0])
    for i, fd in enumerate(child_ends):
        if fd is not None and (stdin, stdout, stderr)[i] == PIPE:
            posix.close(fd)
    try:
        sockets, exec_error = _parent_side(spec, pid, parent_sock,
                                           None if kept is None else kept[1], say)
    except BaseException:
        try:
            posix.kill(pid, signal.SIGKILL)
            posix.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        for fd in parent_ends:
            if fd is not None:
                posix.close(fd)
        posix.close(status_r)
        raise
    finally:
        parent_sock.close()
    files = [None if fd is None else open(fd, "wb" if i == 0 else "rb")
             for i, fd in enumerate(parent_ends)]
    return Process(pid, files[0], files[1], files[2], sockets, exec_error, status_r)


def _relay(pid: int, sig: int) -> None:
    try:
        posix.kill(pid, sig)
    except ProcessLookupError:
        pass


def _parent_side(spec: Sandbox, pid: int, sock: _socket.socket, keeper: int | None,
                 say: Callable[[str], None]) -> tuple[list[_socket.socket], str | None]:
    if spec.cgroup:
        # Before the helper forks init or makes its cgroup namespace, whose
        # root is the cgroup at that moment; it waits for the word.
        say(f"place sandbox in cgroup {spec.cgroup}")
        try:
            with open(f"{spec.cgroup}/cgroup.procs", "w") as f:
                f.write(str(pid))
        except OSError as e:
            raise SandboxError(f"placing the sandbox in cgroup {spec.cgroup}: "
                               f"{e.strerror}") from None
        sock.send(b"C")
    # Step: the helper joined a kept user namespace ("J"), or made one ("U",
    # with the pid of the keeper it left there, or 0): give it ids (init waits
    # for them), then record the keeper for the next runs.
    ready = sock.recv(64)
    if ready == b"J":
        if spec.debug:
            say(f"user namespace: joined the one kept by process {keeper}; "
                + _describe_idmap(pid, spec.idmap).partition(": ")[2] + " already mapped")
    elif ready[:2] == b"U\t":
        new_keeper = int(ready[2:])
        if spec.debug:
            say(_describe_idmap(pid, spec.idmap))
        try:
            write_maps(pid, spec.idmap)
        except BaseException:
            if new_keeper:
                posix.kill(new_keeper, signal.SIGKILL)  # its namespace has no ids
            raise
        sock.send(b"M")
        if new_keeper:
            say(f"leave process {new_keeper} ({userns.KEEPER_NAME!r}) keeping this user "
                f"namespace mapped for {userns.lifetime()} s: later runs join it")
            userns.publish(new_keeper, spec.idmap)
    else:
        raise_report(ready, [], pid)
    return _reports(sock, pid)


def _reports(sock: _socket.socket, pid: int) -> tuple[list[_socket.socket], str | None]:
    """What the sandbox sends until the command was exec'd (EOF): inside
    sockets and the command's exec error; a setup failure is raised."""
    sockets: list[_socket.socket] = []
    exec_error = None
    while True:
        data, fds = recv_with_fds(sock)
        if not data:
            return sockets, exec_error
        kind = data.split(b"\t", 1)[0]
        if kind == b"SOCK":
            # The C-level socket type: socket.socket costs ~4 ms to import
            # (its enums) on every run; wrap with socket.socket(fileno=s.detach()).
            sockets += [_socket.socket(fileno=fd) for fd in fds]
        elif kind == b"EXEC":
            _, err, name = data.decode(errors="replace").split("\t", 2)
            code = int(err)
            exec_error = (f"{name}: command not found" if code == errno.ENOENT
                          else f"{name}: cannot execute: {posix.strerror(code)}")
        else:
            raise_report(data, fds, pid)


def raise_report(data: bytes, fds: list[int], pid: int) -> NoReturn:
    for fd in fds:
        posix.close(fd)
    text = data.decode(errors="replace")
    fields = text.split("\t")
    if fields[0] == "ERR" and len(fields) == 5:
        _, step, err, path, hint = fields
        raise SetupError(step, int(err), path or None, hint or _hint_for(step, int(err)))
    if fields[0] == "MSG":
        raise SandboxError(fields[1])
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


def _describe_idmap(pid: int, idmap: IdMap) -> str:
    how = "newuidmap/newgidmap" if idmap.helper else "direct write"
    ranges = ", ".join(f"{r.inside}-{r.inside + r.count - 1} -> {r.outside}-"
                       f"{r.outside + r.count - 1}" for r in idmap.uids)
    return f"map ids of helper {pid} ({how}): uids {ranges}"


# ---------------------------------------------------------------- the helper

def _helper(spec: Sandbox, plan: m.Plan, chan: Channel, stdio: list[int | None],
            parent_pid: int, kept: int | None, keep: int, status_w: int,
            say: Callable[[str], None]) -> NoReturn:
    try:
        for s in FORWARDED_SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if posix.getppid() != parent_pid:
            posix._exit(SETUP_EXIT)  # nsbuild died before the signal was set
        if spec.cgroup and chan.sock.recv(1) != b"C":
            posix._exit(SETUP_EXIT)  # nsbuild is gone, or failed to place us
        if spec.new_session:
            # Out of the caller's process group: terminal signals reach nsbuild
            # only, which relays them once, down the chain, to the command.
            posix.setsid()
        m.Step.current = "unshare user namespace"
        joined = False
        if kept is not None:
            try:
                sc.setns(kept, sc.CLONE_NEWUSER)
                joined = True
            except OSError:
                pass  # make one, as if none had been kept
            posix.close(kept)
        if joined:
            chan.send("J")
        else:
            say("unshare user namespace (first, so it owns every other namespace)")
            sc.unshare(sc.CLONE_NEWUSER)
            chan.send("U", str(userns.leave_keeper(keep) if keep else 0))
        # The other namespaces, and init, need only the capabilities unshare
        # just gave, not mapped ids: make them while nsbuild writes the maps.
        # This helper never changes its ids: it stays dumpable and keeps its
        # parent-death signal.
        link = _start_init(spec, plan, chan, stdio, not joined, status_w, say)
        init = link.init
        _close_stdio(stdio)
        m.release(plan)
        _tend_init(spec, link, chan, say)
        chan.sock.close()
        _, status = posix.waitpid(init, 0)
        code = posix.waitstatus_to_exitcode(status)
        code = 128 - code if code < 0 else code
        # init, its namespaces and every mount of the sandbox are gone now.
        posix.write(status_w, str(code).encode())
        posix._exit(code)
    except BaseException as e:
        report_failure(chan, e)


class _InitLink:
    """The outside ends of a just-forked init: its lifeline, the lock's
    request and answer, the host's /proc, the network namespace's way in."""

    def __init__(self, init: int, life_w: int, ask_r: int, mapped_w: int, proc: int,
                 net: _socket.socket | None) -> None:
        self.init, self.life_w, self.ask_r, self.mapped_w = init, life_w, ask_r, mapped_w
        self.proc, self.net = proc, net


def _start_init(spec: Sandbox, plan: m.Plan, chan: Channel, stdio: list[int | None],
                maps_pending: bool, status_w: int, say: Callable[[str], None]) -> _InitLink:
    """In the sandbox's user namespace: make the PID, IPC, UTS and cgroup
    namespaces and fork init into them. Not the mount namespace: init makes
    that, so that no mount of the sandbox outlives init."""
    m.Step.current = "unshare PID, IPC, UTS and cgroup namespaces"
    say("unshare PID, IPC, UTS and cgroup namespaces")
    sc.unshare(sc.CLONE_NEWPID | sc.CLONE_NEWIPC | sc.CLONE_NEWUTS | sc.CLONE_NEWCGROUP)
    # A lifeline: init reads EOF on it if this process is already gone.
    life_r, life_w = posix.pipe()
    # init asks on `ask` for the id map of its nested user namespace (the
    # mount lock), which only a process of this namespace can write.
    ask_r, ask_w = posix.pipe()
    mapped_r, mapped_w = posix.pipe()
    # The host's /proc, held open for init's id map and the network namespace.
    proc = posix.open("/proc", posix.O_RDONLY | posix.O_DIRECTORY | posix.O_CLOEXEC)
    # The network namespace is made out here while init builds the root (the
    # kernel takes a while over a new one), then handed to init.
    net_here, net_init = (None, None) if spec.share_net else _socket.socketpair(
        _socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    m.Step.current = "fork init (PID 1)"
    init = posix.fork()
    if init == 0:
        for s in FORWARDED_SIGNALS:
            signal.signal(s, signal.SIG_DFL)  # until init relays them
        for fd in (life_w, ask_r, mapped_w, proc, status_w):
            posix.close(fd)
        if net_here is not None:
            net_here.close()
        _init(spec, plan, chan, stdio, life_r, (ask_w, mapped_r), maps_pending, net_init, say)
    for fd in (life_r, ask_w, mapped_r):
        posix.close(fd)
    if net_init is not None:
        net_init.close()
    return _InitLink(init, life_w, ask_r, mapped_w, proc, net_here)


def _tend_init(spec: Sandbox, link: _InitLink, chan: Channel,
               say: Callable[[str], None]) -> None:
    """While init builds the root: make the network namespace and hand it to
    init, relay signals, map init's nested user namespace when it asks. The
    inside sockets go to nsbuild on `chan`."""
    if link.net is not None:
        _make_network(spec, chan, Channel(link.net), link.proc, say)
    for s in FORWARDED_SIGNALS:
        signal.signal(s, lambda sig, _f: _relay(link.init, sig))
    if posix.read(link.ask_r, 1) == b"L":  # EOF: init failed, and reported why
        m.Step.current = "map the ids of the nested user namespace"
        _identity_map(link.proc, link.init, spec.idmap)
        posix.write(link.mapped_w, b"M")
    for fd in (link.ask_r, link.mapped_w, link.proc):
        posix.close(fd)


# ------------------------------------------------------------------ PID 1

def new_network(inside_sockets: tuple[InsideSocket, ...], chan: Channel,
                say: Callable[[str], None]) -> None:
    """Move into a new network namespace with lo up, and send nsbuild the
    inside sockets made there."""
    m.Step.current = "unshare network namespace"
    say("unshare the network namespace")
    sc.unshare(sc.CLONE_NEWNET)
    m.Step.current = "bring up loopback"
    say("bring up lo (127.0.0.1, ::1): the only network interface")
    loopback_up()
    if inside_sockets:
        m.Step.current = "create inside sockets"
        socks = [inside_socket(s, say) for s in inside_sockets]
        chan.send("SOCK", fds=[s.fileno() for s in socks])
        for s in socks:
            s.close()


def _make_network(spec: Sandbox, chan: Channel, to_init: Channel, proc: int,
                  say: Callable[[str], None]) -> None:
    """Outside init, while it builds the root: the sandbox's network
    namespace, handed to init."""
    new_network(spec.inside_sockets, chan, say)
    ns = posix.open("self/ns/net", posix.O_RDONLY | posix.O_CLOEXEC, dir_fd=proc)
    try:
        to_init.send("N", fds=[ns])
    finally:
        posix.close(ns)
        to_init.sock.close()


def _join_network(net: _socket.socket | None) -> None:
    """In init: join the helper's network namespace (before sysfs is mounted:
    it shows the mounter's). Once; init exits if the helper failed."""
    if net is None or net.fileno() < 0:
        return
    m.Step.current = "join the network namespace"
    data, fds = recv_with_fds(net)
    net.close()
    if data != b"N" or len(fds) != 1:
        posix._exit(SETUP_EXIT)  # the helper failed, and reported why
    try:
        sc.setns(fds[0], sc.CLONE_NEWNET)
    finally:
        posix.close(fds[0])


def _init(spec: Sandbox, plan: m.Plan, chan: Channel, stdio: list[int | None],
          life_r: int, lock: tuple[int, int], maps_pending: bool,
          net: _socket.socket | None, say: Callable[[str], None]) -> NoReturn:
    try:
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        m.Step.current = "name PID 1"
        # Its memory still shows nsbuild's host command line and environment.
        sc.set_process_title("nsbuild-init")
        posix.set_blocking(life_r, False)
        _check_lifeline(life_r)
        m.Step.current = "wait for the id maps"
        if maps_pending and chan.sock.recv(1) != b"M":
            posix._exit(SETUP_EXIT)  # nsbuild is gone, or failed to map ids
        m.Step.current = "unshare mount namespace"
        say("unshare the mount namespace")
        sc.unshare(sc.CLONE_NEWNS)
        m.Step.current = "become root in the user namespace"
        posix.setresgid(0, 0, 0)
        if spec.idmap.full:
            posix.setgroups([])
        posix.setresuid(0, 0, 0)
        # Changing ids (nsbuild run by root: host root becomes the range's
        # first id) clears the parent-death signal: set it again, then check
        # the helper lives. (It also makes init non-dumpable, which is fine:
        # the helper that writes init's nested id map is then host root too.)
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        _check_lifeline(life_r)
        posix.close(life_r)

        m.build_root(spec, plan, say, m.Step, before_sys=lambda: _join_network(net))
        _join_network(net)  # no /sys mounted

        m.Step.current = "set hostname"
        say(f"set hostname {spec.hostname}")
        sc.sethostname(spec.hostname)

        m.pivot(say, m.Step)

        m.Step.current = "resolve user"
        creds = _resolve_user(spec.user) if spec.user else None
        _lock_mounts(*lock, say)
        sources = _harden(spec, chan, stdio, creds, say)
        command = _spawn_command(spec, chan, sources, creds, say)
        chan.sock.close()
        _close_stdio(sources)  # the lifted copies, if any: the originals are closed
        _reap(command, say)
    except BaseException as e:
        report_failure(chan, e)


def _check_lifeline(life_r: int) -> None:
    try:
        if posix.read(life_r, 1) == b"":
            posix._exit(SETUP_EXIT)  # the helper died before we were watching
    except BlockingIOError:
        pass


def _lock_mounts(ask_w: int, mapped_r: int, say: Callable[[str], None]) -> None:
    """Move init, and so the command it starts, into a nested user and mount
    namespace. Mounts passed to a less privileged mount namespace are locked by
    the kernel: root inside can no longer make a read-only bind writable, or
    unmount one to see what is under it. The helper, outside, gives the nested
    namespace the same ids."""
    m.Step.current = "lock mounts (nested user namespace)"
    say("lock every mount: move into a nested user and mount namespace")
    sc.unshare(sc.CLONE_NEWUSER | sc.CLONE_NEWNS)
    posix.write(ask_w, b"L")
    if posix.read(mapped_r, 1) != b"M":
        posix._exit(SETUP_EXIT)  # the helper failed, and reported why
    posix.close(ask_w)
    posix.close(mapped_r)
    # Init now shares the command's user namespace: non-dumpable, so that root
    # in there cannot ptrace PID 1 or read its memory (the kernel then asks for
    # a capability in the namespace where init's memory began: the host's).
    sc.prctl(sc.PR_SET_DUMPABLE, 0)
    posix.setresgid(0, 0, 0)
    posix.setresuid(0, 0, 0)


def _identity_map(proc: int, pid: int, idmap: IdMap) -> None:
    # One line per outer range: the kernel refuses an extent that spans two
    # extents of the parent map.
    for name, ranges in (("uid_map", idmap.uids), ("gid_map", idmap.gids)):
        text = "\n".join(f"{r.inside} {r.inside} {r.count}" for r in ranges)
        fd = posix.open(f"{pid}/{name}", posix.O_WRONLY | posix.O_CLOEXEC, dir_fd=proc)
        try:
            posix.write(fd, text.encode())
        finally:
            posix.close(fd)


def loopback_up() -> None:
    s = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS,
                    struct.pack("16sH22x", b"lo", _IFF_UP_LOOPBACK_RUNNING))
    finally:
        s.close()
    _large_loopback_segments()


_RTM_NEWLINK = 16
_NLM_F_REQUEST_ACK = 0x1 | 0x4
_IFLA_GSO_MAX_SIZE = 41
_IFLA_GSO_IPV4_MAX_SIZE = 63
_LO_GSO_MAX = 524280  # lo's own maximum; the default is 64 KiB
_LOOPBACK_IFINDEX = 1


def _large_loopback_segments() -> None:
    """Let TCP on this namespace's lo send segments up to lo's maximum: a
    download through the egress proxy, whose listening socket lives on this
    lo, then costs about a quarter less CPU (bench/egress --sandbox). Only
    here can it be set: the command inside has no capability over the
    network namespace. Best effort: an older kernel refuses or ignores it."""
    attrs = b"".join(struct.pack("HHI", 8, kind, _LO_GSO_MAX)
                     for kind in (_IFLA_GSO_MAX_SIZE, _IFLA_GSO_IPV4_MAX_SIZE))
    body = struct.pack("BxHiII", _socket.AF_UNSPEC, 0, _LOOPBACK_IFINDEX, 0, 0) + attrs
    message = struct.pack("IHHII", 16 + len(body), _RTM_NEWLINK, _NLM_F_REQUEST_ACK, 1, 0)
    try:
        s = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW, 0)  # NETLINK_ROUTE
        try:
            s.sendto(message + body, (0, 0))
            s.recv(4096)  # the acknowledgement, or the error it carries
        finally:
            s.close()
    except OSError:
        pass


def inside_socket(spec: InsideSocket, say: Callable[[str], None]) -> _socket.socket:
    say(spec.describe())
    family = _socket.AF_INET6 if ":" in spec.host else _socket.AF_INET
    kind = _socket.SOCK_STREAM if spec.kind == "tcp" else _socket.SOCK_DGRAM
    s = _socket.socket(family, kind)
    s.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
    s.bind((spec.host, spec.port))
    if spec.kind == "tcp":
        s.listen(128)
    return s


def _resolve_user(user: str) -> tuple[int, int, list[int], str]:
    """NAME, UID or UID:GID against the sandbox root's own /etc/passwd."""
    name_or_uid, _, gid_text = user.partition(":")
    entries = _read_db("/etc/passwd")
    entry = next((e for e in entries if name_or_uid in (e[0], e[2])), None)
    if entry is None and not name_or_uid.isdigit():
        raise SetupError("resolve user", errno.ENOENT, name_or_uid,
                         "no such user in the sandbox's /etc/passwd")
    uid = int(entry[2]) if entry else int(name_or_uid)
    if gid_text:
        if not gid_text.isdigit():
            raise SetupError("resolve user", errno.EINVAL, user, "use NAME, UID or UID:GID")
        gid = int(gid_text)
    else:
        gid = int(entry[3]) if entry and entry[3].isdigit() else uid
    home = entry[5] if entry and len(entry) > 5 else "/"
    groups = [gid]
    if entry:
        for g in _read_db("/etc/group"):
            if len(g) > 3 and entry[0] in g[3].split(",") and g[2].isdigit():
                groups.append(int(g[2]))
    return uid, gid, groups, home


def _read_db(path: str) -> list[list[str]]:
    try:
        with open(path) as f:
            return [line.split(":") for line in f.read().splitlines() if line]
    except OSError:
        return []


def _reap(child: int, say: Callable[[str], None]) -> NoReturn:
    """PID 1: relay signals to the command, reap orphans, and when the command
    exits kill whatever is left so nothing outlives it."""

    def relay(sig: int, _frame: object) -> None:
        try:
            posix.kill(child, sig)
        except ProcessLookupError:
            pass

    for s in FORWARDED_SIGNALS:
        signal.signal(s, relay)
    code = 0
    while True:
        try:
            pid, status = posix.wait()
        except ChildProcessError:
            break
        if pid == child:
            code = posix.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code
            break
    say(f"command exited with status {code}; killing what is left in the sandbox")
    try:
        posix.kill(-1, signal.SIGKILL)
    except OSError:
        pass
    posix._exit(code)


def _close_stdio(stdio: list[int | None]) -> None:
    """Close the command's stdio sources (each once: one fd may serve twice)."""
    for fd in {fd for fd in stdio if fd is not None and fd > 2}:
        posix.close(fd)


# ---------------------------------------------------------------- command

# Python ignores SIGPIPE and SIGXFSZ, and ignored dispositions survive exec;
# the forwarded ones may have been ignored by nsbuild's own caller.
_DEFAULT_IN_COMMAND = (signal.SIGPIPE, signal.SIGXFSZ, *FORWARDED_SIGNALS)


def _harden(spec: Sandbox, chan: Channel, stdio: list[int | None],
            creds: tuple[int, int, list[int], str] | None,
            say: Callable[[str], None]) -> list[int | None]:
    """init's own hardening, which the command inherits through posix_spawn:
    the session keyring, no_new_privs, the seccomp filter, the working
    directory, no stray descriptors; for another user, its groups and
    bounding set. Returns the command's stdio sources, none of them in 0..2
    unless in its own place (posix_spawn dup2s them in order)."""
    if creds:
        uid, gid, groups, _home = creds
        m.Step.current = "switch user"
        say(f"switch to uid {uid} gid {gid} at exec")
        if uid != 0:
            _drop_bounding_caps()
        posix.setgroups(groups)
        # The real ids become the user's; posix_spawn's RESETIDS makes them the
        # effective ones in the command, and exec the saved ones.
        posix.setresgid(gid, 0, 0)
        posix.setresuid(uid, 0, 0)
    m.Step.current = "new session keyring"
    say("new, empty session keyring: the caller's keys are out of reach")
    sc.join_new_session_keyring()
    m.Step.current = "change directory"
    # As the user, not as root: access() checks with the real ids, which are
    # now the user's, and without root's capabilities.
    if creds and creds[0] != 0 and not posix.access(spec.cwd, posix.X_OK):
        raise PermissionError(errno.EACCES, posix.strerror(errno.EACCES), spec.cwd)
    posix.chdir(spec.cwd)
    m.Step.current = "set no_new_privs"
    say("set no_new_privs; close inherited descriptors")
    sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
    m.Step.current = "install the seccomp filter"
    shared = spec.shared_writable()
    if sc.install_seccomp_filter(deny_setid=bool(shared)):
        say("keyring system calls fail (ENOSYS): the caller's keys are out of reach")
        if shared:
            say(f"setuid/setgid modes and new mounts fail (EPERM) in the whole sandbox: "
                f"{shared[0].src} is bound writable and other users may reach it")
    elif shared:
        say(f"no seccomp filter on this architecture: setuid/setgid files made in "
            f"{shared[0].src} would keep their bits")
    m.Step.current = "close inherited descriptors"
    stdio = lift_stdio(stdio)
    keep = {chan.sock.fileno(), *spec.pass_fds, *(fd for fd in stdio if fd is not None)}
    close_fds(keep=keep)
    for fd in spec.pass_fds:
        posix.set_inheritable(fd, True)
    return stdio


def _spawn_command(spec: Sandbox, chan: Channel, stdio: list[int | None],
                   creds: tuple[int, int, list[int], str] | None,
                   say: Callable[[str], None]) -> int:
    """Start the command with posix_spawn (vfork and exec: no copy of this
    Python process, which costs a fork and its page faults on every run) in a
    new session, so that TIOCSTI cannot reach the caller's terminal. (glibc's
    posix_spawn leaves its own two internal signals, 32 and 33, ignored in
    the command: no glibc program can use them.)"""
    env = dict(spec.env)
    if creds and "HOME" not in env:
        env["HOME"] = creds[3]
    actions = [(posix.POSIX_SPAWN_DUP2, fd, i) for i, fd in enumerate(stdio)
               if fd is not None and fd != i]
    m.Step.current = "exec"
    if spec.new_session:
        say("new session: no controlling terminal, so TIOCSTI cannot reach yours")
    say(f"exec {' '.join(spec.argv)}")
    argv = list(spec.argv)
    try:
        return _first_on_path(argv[0], env, lambda path: posix.posix_spawn(
            path, argv, env, file_actions=actions, setsid=spec.new_session,
            setsigdef=_DEFAULT_IN_COMMAND, resetids=creds is not None),
            probe=creds is None)  # init's stat sees as root: only when the command is root
    except OSError as e:
        code = e.errno or errno.ENOENT
        chan.send("EXEC", str(code), argv[0])
        posix._exit(127 if code == errno.ENOENT else 126)


def _first_on_path(name: str, env: dict[str, str], start: Callable[[str], _T], *,
                   probe: bool = False) -> _T:
    """`start(path)` for each place of `name` on the command's own PATH (not
    nsbuild's), as execvp looks: past missing entries; the first other error
    (e.g. EACCES) is raised if nothing starts. probe: places where nothing is
    are skipped after a stat, for a start that costs more than a failed exec
    (posix_spawn: a vfork, an exec and a wait, about 0.1-0.2 ms each; nine
    places before /usr/bin on root's PATH); only where the stat sees what the
    command would (the same ids: a directory the command may not search
    must give its EACCES, not root's ENOENT)."""
    if "/" in name:
        return start(name)
    first: OSError | None = None
    for directory in (env.get("PATH") or "/usr/local/bin:/usr/bin:/bin").split(":"):
        path = f"{directory or '.'}/{name}"
        if probe:
            try:
                posix.stat(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError:
                pass  # let the start itself meet the error (EACCES, ELOOP...)
        try:
            return start(path)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR) and first is None:
                first = e
    raise first or FileNotFoundError(errno.ENOENT, posix.strerror(errno.ENOENT), name)


def lift_stdio(stdio: list[int | None]) -> list[int | None]:
    """The stdio sources, copied above 2 when one of them is itself in 0..2
    but not in its own place (stdout and stderr swapped): dup2 onto 0, 1, 2 in
    order would overwrite it first."""
    if any(fd is not None and fd <= 2 and fd != i for i, fd in enumerate(stdio)):
        return [None if fd is None else fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
                for fd in stdio]
    return stdio


def install_stdio(stdio: list[int | None]) -> None:
    """dup2 each source onto 0, 1, 2."""
    for i, fd in enumerate(lift_stdio(stdio)):
        if fd is not None and fd != i:
            posix.dup2(fd, i)


def execvpe(argv: tuple[str, ...], env: dict[str, str]) -> NoReturn:
    """os.execvpe without os.get_exec_path, which imports warnings (~1 ms
    before every command): search the command's own PATH."""
    _first_on_path(argv[0], env, lambda path: posix.execve(path, list(argv), env))
    raise AssertionError("unreachable: execve returned")


def _drop_bounding_caps() -> None:
    for cap in range(sc.last_cap() + 1):
        try:
            sc.prctl(sc.PR_CAPBSET_DROP, cap)
        except OSError:
            pass
    try:
        sc.prctl(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError:
        pass


def close_fds(keep: set[int]) -> None:
    lo = 3
    for fd in sorted(f for f in keep if f >= 3):
        posix.closerange(lo, fd)
        lo = fd + 1
    posix.closerange(lo, 1 << 20)

