"""A mapped user namespace kept for the caller's next sandboxes.

Mapping subordinate ids takes the setuid programs newuidmap and newgidmap:
two exec()s of setuid binaries, about 2.5 ms of CPU on every run, the largest
fixed cost of `nsbuild run` after Python itself. So, as rootless podman does
with its pause process, the first run of a user leaves one idle process (a
`sleep` named "nsbuild: user namespace keeper") in its freshly mapped user
namespace, for KEEP_SECONDS; runs in that time join the namespace with setns()
instead of making and mapping one. NSBUILD_USERNS_KEEPER=SECONDS sets that
time; 0 turns keepers off (neither join nor leave one). `pkill -f 'nsbuild:
user namespace keeper'` stops them at once.

What is shared is only the outer namespace, whose root is the caller: every
sandbox still makes its own mount, PID, IPC, UTS, cgroup and network
namespaces in it, and its own nested user namespace (the mount lock, see
runner.py), in which its commands run. A command has no capability in the
outer namespace, so it can neither join it nor reach another sandbox through
it. The keeper holds no file, mount, terminal or directory: it runs in its own
session, in "/", with /dev/null as stdio and an empty environment, and leaves
the caller's process tree at once.

A kept namespace is joined only if it is exactly what would have been made:
owned by the caller, a child of the caller's own user namespace (not one made
inside a sandbox), with the expected id maps and setgroups allowed. Anything
else, a stale record included, means a fresh namespace, as without a keeper.
"""

from __future__ import annotations

import fcntl
import os
import struct

from nsbuild.sandbox.errors import SandboxError
from nsbuild.sandbox.spec import IdMap, IdRange

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


def lifetime() -> int:
    """Seconds a new keeper stays; 0: no keepers."""
    value = os.environ.get(_ENV_SWITCH)
    if value is None:
        return KEEP_SECONDS
    if not (value.isascii() and value.isdigit()):
        raise SandboxError(f"{_ENV_SWITCH}={value!r}: expected a number of seconds "
                           "(0: no user namespace keeper)")
    return int(value)


def _directory(create: bool) -> str | None:
    """The caller's private runtime directory for keeper records, or None when
    there is none we can trust (not ours, or open to others)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    path = f"{runtime}/nsbuild" if runtime else f"/tmp/nsbuild-{os.getuid()}"
    for attempt in (0, 1):
        try:
            st = os.lstat(path)
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
        if (st.st_mode & 0o170077) == 0o040000 and st.st_uid == os.getuid():
            return path
        return None
    return None


def can_record() -> bool:
    """A keeper is useful only if later runs can find it."""
    return _directory(create=True) is not None


def _record_name(idmap: IdMap) -> str:
    def ranges(rs: tuple[IdRange, ...]) -> str:
        return ",".join(f"{r.inside}.{r.outside}.{r.count}" for r in rs)

    return f"userns-{ranges(idmap.uids)}_{ranges(idmap.gids)}"


def _read_at(dir_fd: int, name: str) -> str:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return os.read(fd, 4096).decode()
    finally:
        os.close(fd)


def _same_ranges(text: str, ranges: tuple[IdRange, ...]) -> bool:
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
    if not idmap.helper or not lifetime():
        return None
    directory = _directory(create=False)
    if directory is None:
        return None
    try:
        with open(f"{directory}/{_record_name(idmap)}", "rb") as f:
            pid = int(f.read(32))
        # Everything below is read through this directory: if the keeper is
        # gone and its pid reused, the reads fail instead of reading another.
        proc = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    ns = -1
    try:
        ns = os.open("ns/user", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
        # A keeper that ended but was not reaped yet still shows its namespace.
        state = _read_at(proc, "stat").rpartition(")")[2].split()[0]
        if (state not in ("Z", "X")
                and _same_ranges(_read_at(proc, "uid_map"), idmap.uids)
                and _same_ranges(_read_at(proc, "gid_map"), idmap.gids)
                and _read_at(proc, "setgroups").strip() == "allow"
                and _is_ours(ns)):
            ns, found = -1, ns
            return found, pid
        return None
    except (OSError, ValueError):
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
                    setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
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
    directory = _directory(create=True)
    if directory is None:
        return
    name = f"{directory}/{_record_name(idmap)}"
    tmp = f"{name}.{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        try:
            os.write(fd, f"{pid}\n".encode())
        finally:
            os.close(fd)
        os.replace(tmp, name)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass

