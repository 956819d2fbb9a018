"""The file system of a session, listed before an install and after the purge,
and what differs, as piuparts compares them: new files are left behind,
missing ones were removed, and a file of another type, mode, owner, size,
time or link target was changed. What piuparts ignores is ignored here:
logs, caches, apt's and dpkg's own state, the user databases.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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


def take(steps: Steps) -> Snapshot:
    """The session's files now (run as root, no network); find's complaints
    go to the log."""
    steps.log.line("$ find / -xdev ... (the session's files)")
    with steps.log.command_output() as err:
        status, text = steps.backend.check_output(["sh", "-c", FIND], stderr=err)
    fields = text.split("\0")
    if status != 0 or len(fields) % _FIELDS != 1:
        raise CheckError(f"cannot list the session's files (find exit status {status})")
    snap: Snapshot = {}
    for i in range(0, len(fields) - 1, _FIELDS):
        kind, mode, uid, gid, size, mtime, target, path = fields[i : i + _FIELDS]
        if not IGNORED.match(path):
            snap[path] = Entry(kind, mode, f"{uid}:{gid}", size, mtime, target)
    return snap


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
