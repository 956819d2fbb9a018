"""Which ids the sandbox gets, and writing them into a new user namespace.

An unprivileged caller: uid 0 inside is the caller (files the sandbox writes
into bind mounts belong to the caller, as with podman), 1..65535 inside are
the caller's subordinate ids from /etc/subuid and /etc/subgid, written by the
setuid helpers newuidmap/newgidmap. Root as caller: 0..65535 inside map onto
root's subordinate range, so nothing inside is ever host uid 0.
"""

from __future__ import annotations

import os
import pwd

from nsbuild.sandbox.errors import SandboxError
from nsbuild.sandbox.spec import IdMap, IdRange

INSIDE_IDS = 65536
NOBODY = 65534
# Where useradd starts subordinate ranges (login.defs' SUB_UID_MIN default).
SUB_ID_MIN = 100000

# Tests point these at other files to exercise the fallback.
_SUBUID_ENV = "NSBUILD_SUBUID_FILE"
_SUBGID_ENV = "NSBUILD_SUBGID_FILE"


def _subordinate_range(path: str, user: str, uid: int) -> tuple[int, int] | None:
    """First range for `user` (by name or number) in a subuid/subgid file."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) != 3 or parts[0] not in (user, str(uid)):
            continue
        try:
            start, count = int(parts[1]), int(parts[2])
        except ValueError:
            continue
        if count > 0:
            return start, count
    return None


def _ranges(path: str) -> list[tuple[int, int]]:
    """Every range of a subuid/subgid file, whoever it belongs to."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            found.append((int(parts[1]), int(parts[2])))
    return found


def _subid_files() -> tuple[str, str]:
    return (
        os.environ.get(_SUBUID_ENV) or "/etc/subuid",
        os.environ.get(_SUBGID_ENV) or "/etc/subgid",
    )


def free_range(count: int = INSIDE_IDS) -> int:
    """The first start, from SUB_ID_MIN up, of `count` ids that no range in
    /etc/subuid or /etc/subgid overlaps: usable for both uids and gids."""
    start = SUB_ID_MIN
    for first, n in sorted(r for path in _subid_files() for r in _ranges(path)):
        if first < start + count and start < first + n:
            start = first + n
    return start


def range_hint(user: str) -> str:
    """The command that gives `user` a free range of 65536 subordinate ids."""
    import shlex

    start = free_range()
    ids = f"{start}-{start + INSIDE_IDS - 1}"
    sudo = "" if os.getuid() == 0 else "sudo "
    return f"{sudo}usermod --add-subuids {ids} --add-subgids {ids} {shlex.quote(user)}"


def caller_user() -> str:
    """The caller's user name as /etc/subuid names it (its uid if it has none)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def caller_idmap() -> IdMap:
    uid, gid = os.getuid(), os.getgid()
    user = caller_user()
    uid_file, gid_file = _subid_files()
    subuid = _subordinate_range(uid_file, user, uid)
    subgid = _subordinate_range(gid_file, user, uid)

    if uid == 0:
        if subuid and subgid:
            n = min(subuid[1], subgid[1], INSIDE_IDS)
            return IdMap((IdRange(0, subuid[0], n),), (IdRange(0, subgid[0], n),), helper=False)
        # Root without a range still never appears as host root inside.
        return IdMap(
            (IdRange(0, NOBODY, 1),), (IdRange(0, NOBODY, 1),), helper=False,
            warning="root has no range in /etc/subuid and /etc/subgid: the sandbox runs "
            f"as host uid 65534 with a single id; add one with '{range_hint(user)}'",
        )

    if subuid and subgid:
        n = min(subuid[1], subgid[1], INSIDE_IDS - 1)
        return IdMap(
            (IdRange(0, uid, 1), IdRange(1, subuid[0], n)),
            (IdRange(0, gid, 1), IdRange(1, subgid[0], n)),
            helper=True,
        )
    return IdMap(
        (IdRange(0, uid, 1),), (IdRange(0, gid, 1),), helper=False,
        warning=f"no range for {user} in /etc/subuid and /etc/subgid: only one id is mapped, "
        f"so programs that change user (apt's _apt, su, setpriv) will fail; add one with "
        f"'{range_hint(user)}'",
    )


def _start_helper(tool: str, pid: int, ranges: tuple[IdRange, ...]) -> int:
    path = next((f"{d}/{tool}" for d in ("/usr/bin", "/usr/local/bin", "/bin")
                 if os.access(f"{d}/{tool}", os.X_OK)), None)
    if path is None:
        sudo = "" if os.getuid() == 0 else "sudo "
        raise SandboxError(f"{tool} not found; hint: install it with '{sudo}apt install uidmap'")
    args = [tool, str(pid)]
    for r in ranges:
        args += [str(r.inside), str(r.outside), str(r.count)]
    return os.posix_spawn(path, args, os.environ)


def _check_helper(tool: str, child: int, pid: int) -> None:
    _, status = os.waitpid(child, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SandboxError(
            f"{tool} {pid} failed; hint: check your entry in /etc/sub{tool[3]}id and that "
            f"/usr/bin/{tool} is setuid root (ls -l /usr/bin/{tool})"
        )


def write_maps(pid: int, idmap: IdMap) -> None:
    """Give the user namespace of process `pid` its id maps."""
    if idmap.helper:
        # Both setuid helpers at once: each costs a few milliseconds to start.
        uids = _start_helper("newuidmap", pid, idmap.uids)
        try:
            gids = _start_helper("newgidmap", pid, idmap.gids)
        finally:
            _check_helper("newuidmap", uids, pid)
        _check_helper("newgidmap", gids, pid)
        return
    try:
        if os.getuid() != 0:
            # An unprivileged single-id gid map is refused unless setgroups is
            # denied first (otherwise dropping groups could gain access).
            _write(f"/proc/{pid}/setgroups", "deny")
        _write(f"/proc/{pid}/uid_map", "\n".join(r.line() for r in idmap.uids))
        _write(f"/proc/{pid}/gid_map", "\n".join(r.line() for r in idmap.gids))
    except OSError as e:
        raise SandboxError(f"writing id map {e.filename}: {e.strerror}") from None


def _write(path: str, data: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)
