"""A mapped user namespace kept for the caller's next sandboxes.

Mapping subordinate ids takes the setuid programs newuidmap and newgidmap:
two exec()s of setuid binaries, about 2.5 ms of CPU on every run, the largest
fixed cost of `nsbuild run` after Python itself. So, as rootless podman does
with its pause process, a run that made and mapped a user namespace leaves one
idle process in it (a `sleep` named "nsbuild: user namespace keeper") for
KEEP_SECONDS; runs in that time join the namespace with setns() instead of
making and mapping one. NSBUILD_USERNS_KEEPER=SECONDS sets that time; 0 turns
keepers off (neither join nor leave one). `pkill -f 'nsbuild: user namespace
keeper'` stops them at once.

What is shared is only the outer namespace, whose root is the caller: every
sandbox still makes its own mount, PID, IPC, UTS, cgroup and network
namespaces in it, and its own nested user namespace (the mount lock, see
runner.py), in which its commands run. A command has no capability in the
outer namespace, so it can neither join it nor reach another sandbox through
it. The keeper holds no file, mount, terminal or directory: it runs in its own
session, in "/", with /dev/null as stdio and an empty environment, and leaves
the caller's process tree at once (it stays in the caller's cgroup).

A kept namespace is joined only if it is exactly what would have been made:
the record (in a directory of the caller's only) names the keeper by pid,
start time and namespace; the keeper must be alive and named so; the
namespace must be owned by the caller, a child of the caller's own user
namespace (not one made inside a sandbox), mapped as expected with setgroups
allowed. The kernel copies some of its maker's resource limits into a new
user namespace (processes, locked memory, pending signals, message queues),
so they are part of the record's name: a run with other limits makes its own.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct

from nsbuild.sandbox import syscalls as sc
from nsbuild.sandbox.spec import IdMap, IdRange, SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
else:
    import _signal as signal

KEEP_SECONDS = 60
KEEPER_NAME = "nsbuild: user namespace keeper"
SLEEP = "/bin/sleep"  # also right where /bin is not merged into /usr
_ENV_SWITCH = "NSBUILD_USERNS_KEEPER"

# ioctl(2) on namespace files (linux/nsfs.h): _IO(0xb7, 2) and _IO(0xb7, 4).
_NS_GET_PARENT = 0xB702
_NS_GET_OWNER_UID = 0xB704
# The limits a new user namespace takes from its maker (set_userns_rlimits):
# RLIMIT_NPROC, RLIMIT_MEMLOCK, RLIMIT_SIGPENDING, RLIMIT_MSGQUEUE, by their
# numbers in asm-generic (x86, arm, riscv, powerpc, s390; not mips, sparc, alpha).
_INHERITED_LIMITS = (6, 8, 11, 12)


def lifetime() -> int:
    """Seconds a new keeper stays; 0: no keepers. A bad setting is a usage error."""
    value = os.environ.get(_ENV_SWITCH)
    if value is None:
        return KEEP_SECONDS
    if not (value.isascii() and value.isdigit()):
        raise SpecError(f"{_ENV_SWITCH}={value!r}: expected a number of seconds "
                        "(0: no user namespace keeper)")
    return int(value)


def _open_directory(create: bool) -> int | None:
    """The caller's private runtime directory for keeper records, opened; None
    when there is none we can trust (not ours, open to others, a symlink)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    path = f"{runtime}/nsbuild" if runtime else f"/tmp/nsbuild-{os.geteuid()}"
    for attempt in (0, 1):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                            | os.O_CLOEXEC)
        except FileNotFoundError:
            if not create or attempt:
                return None
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
            except OSError:
                return None
            continue
        except OSError:
            return None
        st = os.fstat(fd)
        if st.st_mode & 0o077 == 0 and st.st_uid == os.geteuid():
            return fd
        os.close(fd)
        return None
    return None


def can_record() -> bool:
    """A keeper is useful only if later runs can find it."""
    fd = _open_directory(create=True)
    if fd is None:
        return False
    os.close(fd)
    return True


def _record_name(idmap: IdMap) -> str:
    def ranges(rs: tuple[IdRange, ...]) -> str:
        return ",".join(f"{r.inside}.{r.outside}.{r.count}" for r in rs)

    limits = ",".join(str(sc.soft_limit(r)) for r in _INHERITED_LIMITS)
    return f"userns-{ranges(idmap.uids)}_{ranges(idmap.gids)}_{limits}"


def _read_at(dir_fd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def _read_record(dir_fd: int, name: str) -> bytes:
    """A record: never through a symlink, never waiting on a FIFO, and only a
    regular file of the caller's (a command that can write the directory must
    not make a run block, or read its own stdin through /dev/stdin)."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                 dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise ValueError(f"{name} is not a regular file of the caller's")
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def start_time(stat_line: bytes) -> int:
    """A process's start time (clock ticks since boot) from its /proc stat line:
    with the pid, it names one process, whatever later reuses the number."""
    # Field 22; the command name (field 2) may hold spaces and parentheses.
    return int(stat_line.rsplit(b")", 1)[1].split()[19])


def _same_ranges(text: bytes, ranges: tuple[IdRange, ...]) -> bool:
    return [tuple(map(int, line.split())) for line in text.splitlines()] == \
        [(r.inside, r.outside, r.count) for r in ranges]


def _is_ours(ns: int) -> bool:
    """Owned by the caller and a child of the caller's own user namespace."""
    owner = struct.unpack("I", fcntl.ioctl(ns, _NS_GET_OWNER_UID, b"\0" * 4))[0]
    if owner != os.geteuid():
        return False
    parent = fcntl.ioctl(ns, _NS_GET_PARENT)
    try:
        a, b = os.fstat(parent), os.stat("/proc/self/ns/user")
    finally:
        os.close(parent)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def join_fd(idmap: IdMap) -> tuple[int, int] | None:
    """(fd of a kept user namespace mapped as `idmap`, keeper pid), or None."""
    directory = _open_directory(create=False)
    if directory is None:
        return None
    try:
        # Not a FIFO, device or symlink put there to block or feed this read.
        pid, started, inode = map(int, _read_record(directory, _record_name(idmap)).split())
        # Everything below is read through this directory: if the keeper is
        # gone and its pid reused, the reads fail instead of reading another.
        proc = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    finally:
        os.close(directory)
    ns = -1
    try:
        ns = os.open("ns/user", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
        line = _read_at(proc, "stat")
        # A keeper that ended but was not reaped yet still shows its namespace.
        state = line.rsplit(b")", 1)[1].split()[0]
        if (state not in (b"Z", b"X")
                and start_time(line) == started
                and os.fstat(ns).st_ino == inode
                and _is_ours(ns)
                and _same_ranges(_read_at(proc, "uid_map"), idmap.uids)
                and _same_ranges(_read_at(proc, "gid_map"), idmap.gids)
                and _read_at(proc, "setgroups").strip() == b"allow"
                # Last: reading cmdline takes the process's memory lock.
                and _read_at(proc, "cmdline").split(b"\0")[0] == KEEPER_NAME.encode()):
            ns, found = -1, ns
            return found, pid
        return None
    except (OSError, ValueError, IndexError):
        return None
    finally:
        os.close(proc)
        if ns >= 0:
            os.close(ns)


def leave_keeper(seconds: int) -> int:
    """Called right after unshare(CLONE_NEWUSER), before any other namespace:
    start the keeper in this user namespace, outside the caller's process tree
    (a throwaway child starts it and exits). Its pid, or 0 if it could not."""
    r, w = os.pipe()
    try:
        child = os.fork()
        if child == 0:
            try:
                os.chdir("/")
                os.closerange(3, w)
                os.closerange(w + 1, 1 << 20)
                pid = os.posix_spawn(
                    SLEEP, [KEEPER_NAME, str(seconds)], {}, setsid=True,
                    setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),  # ignored by Python
                    file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDWR, 0),
                                  (os.POSIX_SPAWN_DUP2, 0, 1), (os.POSIX_SPAWN_DUP2, 0, 2)])
                os.write(w, str(pid).encode())
            finally:
                os._exit(0)
        os.close(w)
        w = -1
        os.waitpid(child, 0)
        return int(os.read(r, 32) or 0)
    except (OSError, ValueError):
        return 0
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def publish(pid: int, idmap: IdMap) -> None:
    """Record the keeper once its namespace is mapped; best effort (a run
    without a record only makes its own namespace)."""
    directory = _open_directory(create=True)
    if directory is None:
        return
    tmp = f".userns.{os.getpid()}"
    try:
        name = _record_name(idmap)
        with open(f"/proc/{pid}/stat", "rb") as f:
            started = start_time(f.read())
        inode = os.stat(f"/proc/{pid}/ns/user").st_ino
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                        | os.O_CLOEXEC, 0o600, dir_fd=directory)
        try:
            os.write(fd, f"{pid} {started} {inode}\n".encode())
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=directory, dst_dir_fd=directory)
    except (OSError, ValueError, IndexError):
        try:
            os.unlink(tmp, dir_fd=directory)
        except OSError:
            pass
    finally:
        os.close(directory)
