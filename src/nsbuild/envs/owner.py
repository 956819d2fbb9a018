"""Who owns a session or a half-made store entry, and whether it still lives.

A pid alone is not enough: pids are reused. The pair (pid, start time in clock
ticks since boot, field 22 of /proc/PID/stat) names one process for the life
of the system, so gc can tell a live owner from a dead one whose pid was
recycled.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

TMP_PREFIX = ".tmp-"


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after
    # the last ')'. Field 3 is then index 0, so field 22 is index 19.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[19])


@dataclass(frozen=True)
class Owner:
    pid: int
    start: int

    @classmethod
    def me(cls) -> Owner:
        pid = os.getpid()
        start = _start_time(pid)
        assert start is not None  # our own /proc entry always exists
        return cls(pid, start)

    def alive(self) -> bool:
        return _start_time(self.pid) == self.start

    def to_json(self) -> dict[str, int]:
        return {"pid": self.pid, "start": self.start}

    @classmethod
    def from_json(cls, data: object) -> Owner | None:
        if not isinstance(data, dict):
            return None
        pid, start = data.get("pid"), data.get("start")
        if isinstance(pid, int) and isinstance(start, int):
            return cls(pid, start)
        return None


def tmp_name() -> str:
    """A name for something being created: says which process makes it."""
    me = Owner.me()
    return f"{TMP_PREFIX}{me.pid}-{me.start}-{secrets.token_hex(4)}"


def tmp_owner(name: str) -> Owner | None:
    """The owner encoded in a `tmp_name()`, or None if `name` is not one."""
    if not name.startswith(TMP_PREFIX):
        return None
    parts = name[len(TMP_PREFIX) :].split("-")
    if len(parts) != 3 or not (parts[0].isdigit() and parts[1].isdigit()):
        return None
    return Owner(int(parts[0]), int(parts[1]))


def sandbox_root_ids() -> tuple[int, int] | None:
    """Host uid and gid of uid/gid 0 in the caller's sandboxes, when that is not
    the caller (only when run by root: then its subordinate range's first id)."""
    if os.geteuid() != 0:
        return None
    from nsbuild.sandbox import caller_idmap

    idmap = caller_idmap()
    uid = next((r.outside for r in idmap.uids if r.inside == 0), None)
    gid = next((r.outside for r in idmap.gids if r.inside == 0), None)
    if uid is None or gid is None or (uid, gid) == (0, 0):
        return None
    return uid, gid


def give_to_sandbox_root(*paths: os.PathLike[str] | str) -> None:
    """Make `paths` belong to uid/gid 0 of the caller's sandboxes.

    For a user that is already so (inside uid 0 is the caller). Run by root,
    the sandbox's root is the first id of root's subordinate range, never host
    root: an overlay upper dir made by host root would be read-only inside."""
    ids = sandbox_root_ids()
    if ids is None:
        return
    for path in paths:
        os.chown(path, *ids)
