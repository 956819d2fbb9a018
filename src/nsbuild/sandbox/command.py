"""The command's start: init's last hardening, then posix_spawn.

init hardens itself (user, keyring, no_new_privs, seccomp, descriptors) and
the command inherits all of it; the command is started with posix_spawn, in
a new session. enter.py uses the same steps for a command started in a
running sandbox.
"""

from __future__ import annotations

import errno
import fcntl  # here, not where used: after the pivot the host's Python may be out of sight
import os

from nsbuild.sandbox import mounts as m
from nsbuild.sandbox import syscalls as sc
from nsbuild.sandbox.channel import FORWARDED_SIGNALS, Channel
from nsbuild.sandbox.errors import SetupError
from nsbuild.sandbox.spec import Sandbox

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from collections.abc import Callable
    from typing import NoReturn, TypeVar

    _T = TypeVar("_T")
else:
    import _signal as signal

# Python ignores SIGPIPE and SIGXFSZ, and ignored dispositions survive exec;
# the forwarded ones may have been ignored by nsbuild's own caller.
_DEFAULT_IN_COMMAND = (signal.SIGPIPE, signal.SIGXFSZ, *FORWARDED_SIGNALS)


def resolve_user(user: str) -> tuple[int, int, list[int], str]:
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


def harden(spec: Sandbox, chan: Channel, stdio: list[int | None],
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
        os.setgroups(groups)
        # The real ids become the user's; posix_spawn's RESETIDS makes them the
        # effective ones in the command, and exec the saved ones.
        os.setresgid(gid, 0, 0)
        os.setresuid(uid, 0, 0)
    m.Step.current = "new session keyring"
    say("new, empty session keyring: the caller's keys are out of reach")
    sc.join_new_session_keyring()
    m.Step.current = "change directory"
    # As the user, not as root: access() checks with the real ids, which are
    # now the user's, and without root's capabilities.
    if creds and creds[0] != 0 and not os.access(spec.cwd, os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), spec.cwd)
    os.chdir(spec.cwd)
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
        os.set_inheritable(fd, True)
    return stdio


def spawn_command(spec: Sandbox, chan: Channel, stdio: list[int | None],
                  creds: tuple[int, int, list[int], str] | None,
                  say: Callable[[str], None], tty: str | None = None) -> int:
    """Start the command with posix_spawn (vfork and exec: no copy of this
    Python process, which costs a fork and its page faults on every run) in a
    new session, so that TIOCSTI cannot reach the caller's terminal. (glibc's
    posix_spawn leaves its own two internal signals, 32 and 33, ignored in
    the command: no glibc program can use them.)

    `tty`: the path of the sandbox's own pty, whose slave is among `stdio`.
    Those streams are opened by path in the command, after its setsid: a
    session leader's first terminal opened becomes its controlling terminal
    (a dup2 does not make one). Always a new session then."""
    env = dict(spec.env)
    if creds and "HOME" not in env:
        env["HOME"] = creds[3]
    device = os.stat(tty).st_rdev if tty else None
    actions: list[tuple[object, ...]] = [
        (os.POSIX_SPAWN_OPEN, i, tty, os.O_RDWR, 0)
        if tty and os.fstat(fd).st_rdev == device
        else (os.POSIX_SPAWN_DUP2, fd, i)
        for i, fd in enumerate(stdio) if fd is not None and (fd != i or tty)]  # fmt: skip
    if spec.new_session:
        say("new session: no controlling terminal, so TIOCSTI cannot reach yours")
    argv = list(spec.argv)
    # The persona is inherited through posix_spawn: init takes it for the
    # spawn only, so that init itself (and what it reads of uname) is unchanged.
    persona = None
    if spec.personality is not None:
        m.Step.current = "set the personality"
        say(f"personality {spec.personality:#x}: {persona_words(spec.personality)}")
        persona = sc.personality(spec.personality)
    m.Step.current = "exec"
    say(f"exec {' '.join(spec.argv)}")
    try:
        return _first_on_path(argv[0], env, lambda path: os.posix_spawn(
            path, argv, env, file_actions=actions, setsid=spec.new_session or bool(tty),
            setsigdef=_DEFAULT_IN_COMMAND, resetids=creds is not None),
            probe=creds is None)  # init's stat sees as root: only when the command is root
    except OSError as e:
        code = e.errno or errno.ENOENT
        chan.send("EXEC", str(code), argv[0])
        os._exit(127 if code == errno.ENOENT else 126)
    finally:
        if persona is not None:
            sc.personality(persona)


def persona_words(persona: int) -> str:
    """What a persona changes, for --debug."""
    if persona & sc.PER_MASK == sc.PER_LINUX32:
        return "32-bit machine (uname says i686 on x86_64, armv8l on arm64)"
    return "the default" if persona == sc.PER_LINUX else "as given"


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
                os.stat(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError:
                pass  # let the start itself meet the error (EACCES, ELOOP...)
        try:
            return start(path)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR) and first is None:
                first = e
    raise first or FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)


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
            os.dup2(fd, i)


def execvpe(argv: tuple[str, ...], env: dict[str, str]) -> NoReturn:
    """os.execvpe without os.get_exec_path, which imports warnings (~1 ms
    before every command): search the command's own PATH."""
    _first_on_path(argv[0], env, lambda path: os.execve(path, list(argv), env))
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
        os.closerange(lo, fd)
        lo = fd + 1
    os.closerange(lo, 1 << 20)


def close_stdio(stdio: list[int | None]) -> None:
    """Close the command's stdio sources (each once: one fd may serve twice)."""
    for fd in {fd for fd in stdio if fd is not None and fd > 2}:
        os.close(fd)
