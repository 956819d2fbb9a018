"""Enter a running sandbox: run one more command in the namespaces of a process inside it.

    proc = start(pid, ("make", "check"), cwd="/src", stdin=fd)  # a Process: .wait() .kill()
    status = start(pid, argv).wait_relaying()  # the caller's stdio; 128+N on signal N

`pid` is the host PID of a process in the sandbox, normally its command: the
runtime moves the command into a nested user and mount namespace where every
mount is locked (runner.py), so only the command's namespaces give the locked
view. The entered command runs as root in that sandbox, in its PID namespace
(orphans are reaped by the sandbox's init, and die with it), and gets the
runtime's hardening before exec: a new session (TIOCSTI cannot reach the
caller's terminal), a new empty session keyring and the seccomp filter
(keyrings; setuid/setgid modes and mounts with deny_setid), no_new_privs, the
parent-death signal, no descriptor but 0, 1 and 2; and the persona of the
process entered (a 32-bit one in an i386 environment: uname says i686 for
every command of the sandbox).

    caller (host)                        waits, relays signals
      └─ joiner (host PID namespace)     setns() into the sandbox; [a fresh network ns]
           └─ command (sandbox PID ns)   hardening, exec

setns(CLONE_NEWPID) moves only the children of the caller: hence the joiner,
which also keeps the caller itself out of the sandbox (the caller may be a
server with threads and host sockets). Killing the caller or the joiner kills
the command (parent-death signals down the chain); what the command started
in the background stays, as in any machine, until the sandbox ends.

Setup failures come back over a close-on-exec channel, as in runner.py; EOF on
it means the command was exec'd.
"""

from __future__ import annotations

import _socket
import errno
import os

from nsbuild.sandbox import mounts as m
from nsbuild.sandbox import syscalls as sc
from nsbuild.sandbox import userns

# The same channel, failure report, exec and descriptor handling as a
# sandbox's own start (runner.py).
from nsbuild.sandbox.channel import (
    FORWARDED_SIGNALS,
    SETUP_EXIT,
    Channel,
    report_failure,
    reports,
)
from nsbuild.sandbox.command import close_fds, execvpe, install_stdio
from nsbuild.sandbox.errors import NotRunning, SandboxError
from nsbuild.sandbox.netns import new_network
from nsbuild.sandbox.process import Process
from nsbuild.sandbox.spec import InsideSocket
from nsbuild.sandbox.streams import Relay, TerminalSlot, substitute

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from collections.abc import Callable, Sequence
    from typing import NoReturn
else:
    import _signal as signal

# Every namespace the runtime makes. No time namespace: the runtime has none.
_ALL = (sc.CLONE_NEWUSER | sc.CLONE_NEWNS | sc.CLONE_NEWPID | sc.CLONE_NEWNET
        | sc.CLONE_NEWIPC | sc.CLONE_NEWUTS | sc.CLONE_NEWCGROUP)  # fmt: skip
_NOT_RUNNING = (errno.ESRCH, errno.ENOENT)


def start_time(pid: int) -> int:
    """The start time of `pid` (clock ticks since boot): with the PID, it
    names one process, whatever later reuses the number."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return userns.start_time(f.read())
    except (FileNotFoundError, ProcessLookupError):
        raise NotRunning(f"process {pid} is not running") from None


def sandbox_pids(proc: Process) -> tuple[int, int]:
    """(init, command): the host PIDs of a sandbox from spawn(). The command is
    the process to enter; init's exit means the whole sandbox ended. spawn()
    returns once the command was exec'd: both exist by then."""
    found = []
    pid = proc.pid
    for _ in ("init", "command"):
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                children = f.read().split()
        except (FileNotFoundError, ProcessLookupError):
            children = []
        if len(children) != 1:
            raise NotRunning(f"the sandbox of process {proc.pid} is not running")
        pid = int(children[0])
        found.append(pid)
    return found[0], found[1]


def environ(pid: int) -> tuple[tuple[str, str], ...]:
    """The environment `pid` was started with (e.g. the sandbox's own)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        # PermissionError: the pid is now another user's process.
        raise NotRunning(f"process {pid} is not running") from None
    pairs = (item.decode(errors="surrogateescape").partition("=")
             for item in raw.split(b"\0") if item)  # fmt: skip
    return tuple((k, v) for k, _, v in pairs)


def persona(pid: int) -> int:
    """The personality(2) persona of `pid` as a command entering its sandbox
    runs under it: PER_LINUX32 if `pid` runs under it (what a Sandbox gives),
    else PER_LINUX. Nothing else the sandbox's own command may have set on
    itself (a flag such as ADDR_NO_RANDOMIZE, PER_BSD) is passed on."""
    try:
        with open(f"/proc/{pid}/personality", "rb") as f:
            text = f.read(32)
    except (FileNotFoundError, ProcessLookupError):
        raise NotRunning(f"process {pid} is not running") from None
    except OSError as e:
        # A process that made itself non-dumpable: its persona is not ours to read.
        raise SandboxError(f"read the persona of process {pid}: {e.strerror} "
                           "(give the command's personality instead)") from None
    try:
        found = int(text.strip() or b"0", 16) & sc.PER_MASK
    except ValueError:
        raise SandboxError(f"/proc/{pid}/personality: unreadable: {text[:32]!r}") from None
    return sc.PER_LINUX32 if found == sc.PER_LINUX32 else sc.PER_LINUX


def start(
    pid: int,
    argv: Sequence[str],
    *,
    env: Sequence[tuple[str, str]] | None = None,
    cwd: str = "/",
    stdin: int | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
    new_net: bool = False,
    inside_sockets: Sequence[InsideSocket] = (),
    cgroup: str | None = None,
    expect_start: int | None = None,
    deny_setid: bool = False,
    personality: int | None = None,
) -> Process:
    """Start `argv` in the sandbox that process `pid` runs in; return once it
    was exec'd (or raise SetupError, NotRunning).

    env: the command's environment (default: that of `pid`). stdin, stdout,
    stderr: descriptors to give it (default: the caller's). new_net: a fresh
    network namespace with only lo up instead of the sandbox's, with
    `inside_sockets` made in it and handed back as proc.sockets. cgroup: a host
    cgroup v2 directory to join first (the sandbox's, when the runtime placed
    it in one). expect_start: refuse unless `pid` started then (see
    start_time), so that a reused PID is never entered. deny_setid: the
    command may not make setuid/setgid files nor mount, as in a sandbox with
    writable binds others may reach (Sandbox.shared_writable(): give its value).
    personality: the command's persona (Sandbox.personality); default: that
    of `pid`, which the sandbox's command got from its Sandbox."""
    if not argv:
        raise SandboxError("no command given")
    if inside_sockets and not new_net:
        raise SandboxError("inside sockets need a fresh network namespace")
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise NotRunning(f"process {pid} is not running") from None
    try:
        # After pidfd_open: a PID reused since is seen here, and the pidfd
        # keeps naming the process checked.
        if expect_start is not None and start_time(pid) != expect_start:
            raise NotRunning(f"process {pid} is not running")
        flags = _ALL
        if new_net or _same_net(pid):
            # A sandbox sharing the caller's network needs no join (and the
            # kernel would refuse one: the host's is not the sandbox's to give).
            flags &= ~sc.CLONE_NEWNET
        command_env = tuple(env) if env is not None else environ(pid)
        persona_ = persona(pid) if personality is None else personality
        stdio = [stdin, stdout, stderr]
        return _fork_joiner(pidfd, flags, list(argv), command_env, cwd, stdio, new_net,
                            tuple(inside_sockets), cgroup, deny_setid, persona_)  # fmt: skip
    finally:
        os.close(pidfd)


def _same_net(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    except (FileNotFoundError, ProcessLookupError):
        raise NotRunning(f"process {pid} is not running") from None


def _fork_joiner(pidfd: int, flags: int, argv: list[str], env: tuple[tuple[str, str], ...],
                 cwd: str, stdio: list[int | None], new_net: bool,
                 inside_sockets: tuple[InsideSocket, ...],
                 cgroup: str | None, deny_setid: bool, persona_: int) -> Process:  # fmt: skip
    ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    caller = os.getpid()
    joiner = -1
    # The caller's end of each stream the command could not reopen.
    callers = [i if fd is None else fd for i, fd in enumerate(stdio)]
    slot = TerminalSlot(callers)
    try:
        joiner = os.fork()
        if joiner == 0:
            ours.close()
            _joiner(pidfd, flags, argv, env, cwd, stdio, new_net, inside_sockets, cgroup,
                    deny_setid, persona_, Channel(theirs), caller)  # fmt: skip
        theirs.close()
        sockets, exec_error, pipes = reports(ours, joiner, slot)
        relay = (Relay([(i, callers[i], fd) for i, fd in pipes], slot.terminal)
                 if pipes or slot.terminal else None)  # fmt: skip
    except BaseException as e:
        slot.restore()
        theirs.close()
        if joiner < 0 and isinstance(e, OSError):
            raise SandboxError(f"fork the joiner: {e.strerror}") from None
        if joiner > 0:
            # Nothing half-entered stays behind: the command dies with it.
            os.kill(joiner, signal.SIGKILL)
            os.waitpid(joiner, 0)
        raise
    finally:
        ours.close()
    return Process(joiner, None, None, None, sockets, exec_error, relay=relay)


# ---------------------------------------------------------------- the joiner


def _joiner(pidfd: int, flags: int, argv: list[str], env: tuple[tuple[str, str], ...],
            cwd: str, stdio: list[int | None], new_net: bool,
            inside_sockets: tuple[InsideSocket, ...], cgroup: str | None,
            deny_setid: bool, persona_: int, chan: Channel, caller: int) -> NoReturn:  # fmt: skip
    try:
        for s in FORWARDED_SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        # The command's stdio now, then nothing else of the caller's (a server's
        # sockets, its protocol pipe) stays open in a process of the sandbox.
        install_stdio(stdio)
        close_fds(keep={chan.sock.fileno(), pidfd})
        if cgroup:
            m.Step.current = f"join cgroup {cgroup}"
            fd = os.open(os.path.join(cgroup, "cgroup.procs"), os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        m.Step.current = "enter the sandbox's namespaces"
        try:
            # With a pidfd, one call joins them all and checks each against
            # the credentials the new user namespace gives: no order to get right.
            sc.setns(pidfd, flags)
        except OSError as e:
            if e.errno in _NOT_RUNNING:
                chan.send("GONE")
                os._exit(SETUP_EXIT)
            raise
        os.close(pidfd)
        m.Step.current = "become root in the sandbox"
        # The caller's ids need not be mapped (root's are not): take the
        # sandbox's root ones, without the caller's supplementary groups
        # (refused with a single-id map, where setgroups is denied).
        try:
            os.setgroups([])
        except PermissionError:
            pass
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        if new_net:
            new_network(inside_sockets, chan, _quiet)
        # Credential changes clear the parent-death signal: set it now, then
        # check the caller did not die in between.
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != caller:
            os._exit(SETUP_EXIT)
        # Forwarded signals and SIGCHLD wait, blocked, for sigwaitinfo below:
        # one that comes before the command exists is relayed, not lost.
        signal.pthread_sigmask(signal.SIG_BLOCK, _WAITED)
        # Until it execs, the command is a copy of the caller (its memory, its
        # environment) inside a sandbox where earlier commands may still run as
        # root: non-dumpable, its /proc files and memory are out of their reach.
        # exec makes it dumpable again.
        sc.prctl(sc.PR_SET_DUMPABLE, 0)
        m.Step.current = "fork command"
        try:
            command = os.fork()
        except OSError as e:
            # A PID namespace whose init died takes no new process: ENOMEM.
            if e.errno == errno.ENOMEM:
                chan.send("GONE")
                os._exit(SETUP_EXIT)
            raise
        if command == 0:
            _command(argv, env, cwd, deny_setid, persona_, chan)
        chan.sock.close()
        for fd in (0, 1, 2):
            os.close(fd)
        _relay_until_exit(command)
    except BaseException as e:
        report_failure(chan, e)


_WAITED = {*FORWARDED_SIGNALS, signal.SIGCHLD}


def _relay_until_exit(command: int) -> NoReturn:
    """Pass forwarded signals on to the command; exit with its status."""
    while True:
        info = signal.sigwaitinfo(_WAITED)
        if info.si_signo != signal.SIGCHLD:
            try:
                os.kill(command, info.si_signo)
            except ProcessLookupError:
                pass
            continue
        pid, status = os.waitpid(command, os.WNOHANG)
        if pid:
            code = os.waitstatus_to_exitcode(status)
            os._exit(128 - code if code < 0 else code)


def _quiet(_msg: str) -> None:
    pass


def _streams(chan: Channel) -> None:
    """The command's streams (streams.py); a pty in place of the caller's
    terminal becomes its controlling terminal: opened by path in the new
    session it leads."""
    sources, tty = substitute([None, None, None], chan, None)
    install_stdio(sources)
    if tty is not None:
        os.close(os.open(tty, os.O_RDWR))


def _command(argv: list[str], env: tuple[tuple[str, str], ...], cwd: str, deny_setid: bool,
             persona_: int, chan: Channel) -> NoReturn:  # fmt: skip
    def set_no_new_privs() -> None:
        sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)

    def die_with_the_joiner() -> None:
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        # The joiner is outside this PID namespace: getppid() is 0 while it
        # lives, the sandbox's init once it died.
        if os.getppid() != 0:
            os._exit(SETUP_EXIT)

    # The runtime's hardening, in its order (runner.py): the seccomp filter
    # needs no_new_privs; descriptors close last, the channel excepted.
    steps: tuple[tuple[str, Callable[[], object]], ...] = (
        ("new session", os.setsid),
        ("new session keyring", sc.join_new_session_keyring),
        ("change directory", lambda: os.chdir(cwd)),
        # Here, in the sandbox's PID namespace (its /proc/self), as root.
        ("make the standard streams reopenable", lambda: _streams(chan)),
        ("set no_new_privs", set_no_new_privs),
        ("set the parent-death signal", die_with_the_joiner),
        ("install the seccomp filter", lambda: sc.install_seccomp_filter(deny_setid=deny_setid)),
        ("close inherited descriptors", lambda: close_fds(keep={chan.sock.fileno()})),
        # Last: what runs before exec is nsbuild's own, as the joiner saw it.
        ("set the personality", lambda: sc.personality(persona_)),
    )
    try:
        # Python ignores SIGPIPE and SIGXFSZ, the joiner blocked some: neither
        # is for the command (ignored dispositions and the mask survive exec).
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, *FORWARDED_SIGNALS):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        for m.Step.current, step in steps:
            step()
        try:
            execvpe(tuple(argv), dict(env))
        except OSError as e:
            chan.send("EXEC", str(e.errno or errno.ENOENT), argv[0])
            os._exit(127 if e.errno == errno.ENOENT else 126)
    except BaseException as e:
        report_failure(chan, e)
