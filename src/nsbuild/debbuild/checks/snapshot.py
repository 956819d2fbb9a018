"""The file system of a session, listed before an install and after the purge,
and what differs, as piuparts compares them: new files are left behind,
missing ones were removed, and a file of another type, mode, owner, size,
time or link target was changed. What piuparts ignores is ignored here:
logs, caches, apt's and dpkg's own state, the user databases.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass

from nsbuild.backends.base import MAX_OUTPUT
from nsbuild.debbuild.checks.session import CheckError
from nsbuild.debbuild.steps import Steps

# One record per file, every field ended by NUL (a path may hold anything
# else): type, mode, uid, gid, size, mtime, link target, path. Mounts of the
# sandbox's own (/proc, /sys, /dev, /build, apt's caches) are other file
# systems, left by -xdev.
FIND = (
    "find / -xdev \\( -path /tmp -o -path /var/tmp -o -path /run -o -path /proc "
    "-o -path /sys -o -path /dev -o -path /build \\) -prune -o "
    "-printf '%y\\0%m\\0%U\\0%G\\0%s\\0%T@\\0%l\\0%p\\0'"
)
_FIELDS = 8
# How much of a listing past its limit is read and dropped before the pipe is closed.
DRAINED = 8
IGNORED = re.compile(
    r"^/(?:"
    r"var/log/.+|var/cache/.+|var/lib/apt/.+|var/lib/dpkg/.+|var/lib/ucf/.+"
    r"|var/lib/systemd/deb-systemd-helper-[a-z]+/.+|var/lib/polkit-1/.+"
    r"|etc/ld\.so\.cache|etc/(?:passwd|group|shadow|gshadow)-?|etc/sub[ug]id|etc/mtab"
    r"|etc/\.pwd\.lock|root/.+|etc/resolv\.conf|etc/hosts|etc/hostname"
    r")$"
)


@dataclass(frozen=True)
class Entry:
    kind: str  # find's %y: f, d, l...
    mode: str
    owner: str  # uid:gid
    size: str
    mtime: str
    target: str  # a link's

    def same(self, other: Entry) -> bool:
        if (self.kind, self.mode, self.owner) != (other.kind, other.mode, other.owner):
            return False
        if self.kind == "l":
            return self.target == other.target
        # A folder's size and time follow what is added to it and removed again.
        return self.kind == "d" or (self.size, self.mtime) == (other.size, other.mtime)


Snapshot = dict[str, Entry]


class TooMany(CheckError):
    """The listing is larger than what is read of it: it was cut."""


def take(steps: Steps, limit: int = MAX_OUTPUT) -> Snapshot:
    """The session's files now (run as root, no network); find's complaints
    go to the log. TooMany when their names pass `limit` bytes."""
    steps.log.line("$ find / -xdev ... (the session's files)")
    status, data, cut = _listing(steps, limit)
    if cut:
        # Told apart from a failure: after an install and purge, the
        # package's doing (a cut listing would read as files removed).
        raise TooMany(f"more than {limit >> 20} MiB of file names")
    text = data.decode(errors="replace")
    fields = text.split("\0")
    if status != 0 or len(fields) % _FIELDS != 1:
        raise CheckError(f"cannot list the session's files (find exit status {status})")
    snap: Snapshot = {}
    for i in range(0, len(fields) - 1, _FIELDS):
        kind, mode, uid, gid, size, mtime, target, path = fields[i : i + _FIELDS]
        if not IGNORED.match(path):
            snap[path] = Entry(kind, mode, f"{uid}:{gid}", size, mtime, target)
    return snap


def _listing(steps: Steps, limit: int) -> tuple[int, bytes, bool]:
    """find's status, the first `limit` bytes of its output, and whether
    there was more. The rest is read and dropped, up to DRAINED times the
    limit, and only then is the pipe closed: find's output ends with the
    session's files, and a pipe closed early leaves the writer blocked
    wherever another process still holds its read end. (A find replaced
    inside that never ends is stopped by the close alone.)"""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    kept = bytearray()
    cut = False

    def drain() -> None:
        nonlocal cut
        seen = 0
        with open(read_fd, "rb", buffering=0) as pipe:
            while seen <= DRAINED * limit and (chunk := pipe.read(1 << 16)):
                seen += len(chunk)
                room = limit - len(kept)
                cut = cut or len(chunk) > room
                kept.extend(chunk[: max(room, 0)])

    reader = threading.Thread(target=drain, name="nsbuild-listing", daemon=True)
    reader.start()
    try:
        with steps.log.command_output() as err:
            status = steps.backend.run(["sh", "-c", FIND], stdout=write_fd, stderr=err)
    finally:
        os.close(write_fd)
        reader.join()
    return status, bytes(kept), cut


@dataclass(frozen=True)
class Difference:
    left: list[str]  # not there before
    removed: list[str]  # there before, gone
    changed: list[str]

    def __bool__(self) -> bool:
        return bool(self.left or self.removed or self.changed)


def compare(before: Snapshot, after: Snapshot) -> Difference:
    left = sorted(p for p in after if p not in before)
    removed = sorted(p for p in before if p not in after)
    changed = sorted(p for p in before if p in after and not before[p].same(after[p]))
    return Difference(left, removed, changed)
