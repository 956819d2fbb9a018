"""Execute a `Sandbox`: the launch pipeline (spawn, run) and the helper.

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
none of it). Only init and the command are ever in the sandbox's mount
namespaces, so no mount is left once init is gone; the helper
then writes the command's status to the parent on a pipe before its own exit
(so that a setup failure of the helper is told apart from a command's 125).

Children never raise into the caller's code: everything after fork() ends in
_exit(), and output from them goes through write(2) (no locks shared with
the parent's threads).

The parts, each in a module of its own: process.py (the Process handle),
channel.py (what the children report), netns.py (the network namespace),
init.py (PID 1), command.py (the command's hardening and start), streams.py
(the command's standard streams, reopenable by name inside), ptyrelay.py (the
caller's terminal while a pty made inside stands for it).
"""

from __future__ import annotations

import _socket
import errno
import os

from nsbuild.sandbox import mounts as m
from nsbuild.sandbox import syscalls as sc
from nsbuild.sandbox import userns
from nsbuild.sandbox.channel import (
    FORWARDED_SIGNALS,
    SETUP_EXIT,
    Channel,
    raise_report,
    report_failure,
    reports,
)
from nsbuild.sandbox.command import close_fds, close_stdio
from nsbuild.sandbox.errors import SandboxError, SetupError
from nsbuild.sandbox.idmap import write_maps
from nsbuild.sandbox.init import run_init
from nsbuild.sandbox.netns import make_network
from nsbuild.sandbox.process import PIPE, Process
from nsbuild.sandbox.spec import IdMap, Sandbox
from nsbuild.sandbox.streams import Relay, TerminalSlot

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from collections.abc import Callable
    from typing import NoReturn
else:
    import _signal as signal


def _debug_printer(enabled: bool) -> Callable[[str], None]:
    import time

    start = time.monotonic()

    def say(msg: str) -> None:
        if enabled:
            ms = (time.monotonic() - start) * 1000
            os.write(2, f"nsbuild: [{ms:6.1f} ms] {msg}\n".encode(errors="replace"))

    return say


def run(spec: Sandbox) -> int:
    """Run the sandbox with the caller's stdio; return the command's exit status
    (128+N when killed by signal N). A sandbox with network services to serve
    runs through nsbuild.net.launch instead."""
    return spawn(spec).wait_relaying()


def spawn(spec: Sandbox, *, stdin: int | None = None, stdout: int | None = None,
          stderr: int | None = None, leave_keeper: bool = True,
          forked: Callable[[], None] | None = None) -> Process:
    """Start the sandbox; return once the command was exec'd (or raise SetupError).
    leave_keeper=False: if this run makes its user namespace, it leaves no
    keeper in it (userns.py), as for a run whose caller sits in a cgroup of
    the run's own (resource limits), which must be empty when the run ends.
    forked: called in this process once the sandbox's first process exists
    (to leave such a cgroup before this process starts any thread of its own)."""
    spec.validate()
    lifetime = userns.lifetime()  # a bad setting fails first, whoever runs
    if not spec.idmap.helper:
        lifetime = 0  # ids written directly: nothing to keep
    plan = m.prepare(spec)  # host-side checks: sources exist, resolved once
    say = _debug_printer(spec.debug)
    if spec.idmap.warning:
        os.write(2, f"nsbuild: warning: {spec.idmap.warning}\n".encode())

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
            r, w = os.pipe()
            parent_ends[i], child_ends[i] = (w, r) if i == 0 else (r, w)
            _give_to_sandbox_root(r, spec.idmap)
        elif want is not None:
            child_ends[i] = want

    status_r = status_w = -1
    try:
        status_r, status_w = os.pipe()
        parent_sock, child_sock = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        parent_pid = os.getpid()
        try:
            pid = os.fork()
        except OSError as e:
            parent_sock.close()
            child_sock.close()
            raise SetupError("fork the sandbox's helper", e.errno or errno.EAGAIN) from None
    except BaseException:
        m.release(plan)
        for fd in {*parent_ends, *child_ends} - {None, stdin, stdout, stderr}:
            os.close(fd)  # type: ignore[arg-type]
        for fd in (status_r, status_w, -1 if kept is None else kept[0]):
            if fd >= 0:
                os.close(fd)
        raise
    if pid == 0:
        # Only what the sandbox needs: any other descriptor of nsbuild's
        # (the read end of another command's bounded output, say) held open
        # here for the sandbox's whole life would keep its writer blocked.
        parent_sock.close()  # closed as an object: the child never closes it again
        trees = (plan.root_tree, *(p.tree for p in plan.mounts))
        close_fds(keep={child_sock.fileno(), status_w, *spec.pass_fds,
                        *(fd for fd in (*child_ends, *trees) if fd is not None),
                        *(() if kept is None else (kept[0],))})  # fmt: skip
        _helper(spec, plan, Channel(child_sock), child_ends, parent_pid,
                None if kept is None else kept[0], keep, status_w, say)

    if forked is not None:
        forked()
    child_sock.close()
    os.close(status_w)
    m.release(plan)  # the cloned trees live on in the child only
    if kept is not None:
        os.close(kept[0])
    # The caller's end of each stream the command could not reopen: the
    # descriptor given, or this process's own.
    callers = [i if fd is None else fd for i, fd in enumerate(child_ends)]
    slot = TerminalSlot(callers)
    try:
        sockets, exec_error, pipes = _parent_side(spec, pid, parent_sock,
                                                  None if kept is None else kept[1], say, slot)
        relay = (Relay([(i, callers[i], fd) for i, fd in pipes], slot.terminal)
                 if pipes or slot.terminal else None)  # fmt: skip
    except BaseException:
        slot.restore()
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        for fd in parent_ends:
            if fd is not None:
                os.close(fd)
        os.close(status_r)
        raise
    finally:
        parent_sock.close()
        for i, fd in enumerate(child_ends):
            if fd is not None and (stdin, stdout, stderr)[i] == PIPE:
                os.close(fd)
    if pipes:
        say(f"relay streams {', '.join(_STREAMS[i] for i, _ in pipes)}: "
            "the command may not reopen the caller's")
    if slot.terminal is not None:
        say("relay the terminal: the command may not reopen it, and has a pty of its own")
    files = [None if fd is None else open(fd, "wb" if i == 0 else "rb")
             for i, fd in enumerate(parent_ends)]
    return Process(pid, files[0], files[1], files[2], sockets, exec_error, status_r, relay)


_STREAMS = ("stdin", "stdout", "stderr")


def _give_to_sandbox_root(fd: int, idmap: IdMap) -> None:
    """A pipe nsbuild makes for the command belongs to the sandbox's root, as
    the caller's own would if the caller were not root: reopenable inside
    without a relay (streams.py). Only root may give a file away."""
    outside = next((r.outside for r in idmap.uids if r.inside == 0), None)
    group = next((r.outside for r in idmap.gids if r.inside == 0), None)
    if os.geteuid() == 0 and outside is not None and group is not None and outside != 0:
        os.fchown(fd, outside, group)


def _relay(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _parent_side(spec: Sandbox, pid: int, sock: _socket.socket, keeper: int | None,
                 say: Callable[[str], None], terminal: TerminalSlot
                 ) -> tuple[list[_socket.socket], str | None, list[tuple[int, int]]]:
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
                os.kill(new_keeper, signal.SIGKILL)  # its namespace has no ids
            raise
        sock.send(b"M")
        if new_keeper:
            say(f"leave process {new_keeper} ({userns.KEEPER_NAME!r}) keeping this user "
                f"namespace mapped for {userns.lifetime()} s: later runs join it")
            userns.publish(new_keeper, spec.idmap)
    else:
        raise_report(ready, [], pid)
    return reports(sock, pid, terminal)


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
        if os.getppid() != parent_pid:
            os._exit(SETUP_EXIT)  # nsbuild died before the signal was set
        if spec.cgroup and chan.sock.recv(1) != b"C":
            os._exit(SETUP_EXIT)  # nsbuild is gone, or failed to place us
        if spec.new_session:
            # Out of the caller's process group: terminal signals reach nsbuild
            # only, which relays them once, down the chain, to the command.
            os.setsid()
        m.Step.current = "unshare user namespace"
        joined = False
        if kept is not None:
            try:
                sc.setns(kept, sc.CLONE_NEWUSER)
                joined = True
            except OSError:
                pass  # make one, as if none had been kept
            os.close(kept)
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
        init = _start_init(spec, plan, chan, stdio, not joined, status_w, say)
        chan.sock.close()
        _, status = os.waitpid(init, 0)
        code = os.waitstatus_to_exitcode(status)
        code = 128 - code if code < 0 else code
        # init, its namespaces and every mount of the sandbox are gone now.
        os.write(status_w, str(code).encode())
        os._exit(code)
    except BaseException as e:
        report_failure(chan, e)


def _start_init(spec: Sandbox, plan: m.Plan, chan: Channel, stdio: list[int | None],
                maps_pending: bool, status_w: int, say: Callable[[str], None]) -> int:
    """In the sandbox's user namespace: make the PID, IPC, UTS and cgroup
    namespaces and fork init into them (not the mount namespace: init makes
    that, so that no mount of the sandbox outlives init). Then, while init
    builds the root: make the network namespace and hand it to init, relay
    signals, map init's nested user namespace when it asks. The inside
    sockets go to nsbuild on `chan`. Returns init's PID."""
    m.Step.current = "unshare PID, IPC, UTS and cgroup namespaces"
    say("unshare PID, IPC, UTS and cgroup namespaces")
    sc.unshare(sc.CLONE_NEWPID | sc.CLONE_NEWIPC | sc.CLONE_NEWUTS | sc.CLONE_NEWCGROUP)
    # A lifeline: init reads EOF on it if this process is already gone (life_w
    # stays open here until it exits).
    life_r, life_w = os.pipe()
    # init asks on `ask` for the id map of its nested user namespace (the
    # mount lock), which only a process of this namespace can write.
    ask_r, ask_w = os.pipe()
    mapped_r, mapped_w = os.pipe()
    # The host's /proc, held open for init's id map and the network namespace.
    proc = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    # The network namespace is made out here while init builds the root (the
    # kernel takes a while over a new one), then handed to init.
    net_here, net_init = (None, None) if spec.share_net else _socket.socketpair(
        _socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    m.Step.current = "fork init (PID 1)"
    init = os.fork()
    if init == 0:
        for s in FORWARDED_SIGNALS:
            signal.signal(s, signal.SIG_DFL)  # until init relays them
        for fd in (life_w, ask_r, mapped_w, proc, status_w):
            os.close(fd)
        if net_here is not None:
            net_here.close()
        run_init(spec, plan, chan, stdio, life_r, (ask_w, mapped_r), maps_pending, net_init, say)
    for fd in (life_r, ask_w, mapped_r):
        os.close(fd)
    if net_init is not None:
        net_init.close()
    close_stdio(stdio)
    m.release(plan)
    if net_here is not None:
        make_network(spec, chan, Channel(net_here), proc, say)
    for s in FORWARDED_SIGNALS:
        signal.signal(s, lambda sig, _f: _relay(init, sig))
    if os.read(ask_r, 1) == b"L":  # EOF: init failed, and reported why
        m.Step.current = "map the ids of the nested user namespace"
        _identity_map(proc, init, spec.idmap)
        os.write(mapped_w, b"M")
    for fd in (ask_r, mapped_w, proc):
        os.close(fd)
    return init


def _identity_map(proc: int, pid: int, idmap: IdMap) -> None:
    # One line per outer range: the kernel refuses an extent that spans two
    # extents of the parent map.
    for name, ranges in (("uid_map", idmap.uids), ("gid_map", idmap.gids)):
        text = "\n".join(f"{r.inside} {r.inside} {r.count}" for r in ranges)
        fd = os.open(f"{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC, dir_fd=proc)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
