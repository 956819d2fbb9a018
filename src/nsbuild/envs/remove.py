"""Delete trees that hold files of the subuid range, never crossing a mount.

Files created inside a sandbox belong to the caller's subordinate ids; the
caller cannot delete those on the host. So: first delete what the caller can
(most of a tree: uid 0 inside is the caller), then finish with `rm` inside a
user namespace with the same id map, where those files are ours again.

Before anything, /proc/self/mountinfo is checked: a tree with a mount point
in it is refused, not descended into (a bind mount of $HOME into a stale
session must never be "cleaned").

The tree may be of any depth (a build can make one deeper than Python's
recursion limit and than PATH_MAX): it is walked without recursion, through
one descriptor at a time (`walk.Cursor`), never following a symlink.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

from nsbuild.envs.errors import EnvError
from nsbuild.envs.walk import Cursor
from nsbuild.printable import printable

# What is kept of rm's messages (the rest is read and dropped).
_ERR_KEPT = 64 << 10


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path` in this mount namespace."""
    root = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            point = _unescape(line.split(" ", 5)[4])
            if point == root or point.startswith(root.rstrip("/") + "/"):
                found.append(point)
    return found


def read_messages(stream: IO[bytes], keep: int = _ERR_KEPT) -> str:
    """The first `keep` bytes of a child's message pipe, as text; the rest is
    read and dropped, then the pipe closed. Read to the end: a child must
    never block on a full pipe, nor die of a closed one with work left."""
    kept = bytearray()
    while chunk := stream.read(keep):
        kept += chunk[: keep - len(kept)]
    stream.close()
    return kept.decode(errors="replace").strip()


def _rm_in_userns(path: Path) -> None:
    from nsbuild.sandbox import PIPE, Bind, Sandbox, Tmpfs, caller_idmap, host_view, spawn

    # Bind the parent, so that `path` itself can be removed too.
    parent, name = path.parent, path.name
    spec = Sandbox(
        argv=("rm", "-rf", "--one-file-system", "--", f"/target/{name}"),
        idmap=caller_idmap(),
        root=Tmpfs("/"),
        # rm makes nothing; `private` only spares it the setuid filter.
        mounts=(*host_view(), Bind(str(parent), "/target", private=True)),
    )
    proc = spawn(spec, stderr=PIPE)
    assert proc.stderr is not None
    # rm's messages name files a sandbox made: bounded, and escaped.
    err = read_messages(proc.stderr)
    if proc.wait() != 0 or os.path.lexists(path):
        why = printable(err.splitlines()[0], 300) if err else "rm failed"
        raise EnvError(f"{path}: cannot remove inside the user namespace: {why}")


def remove_tree(path: Path) -> None:
    """Remove `path` and everything below it; a missing `path` is fine."""
    if not os.path.lexists(path):
        return
    busy = mounts_under(path)
    if busy:
        raise EnvError(f"{path}: refusing to remove: {busy[0]} is mounted there; unmount it first")
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    if not _remove_own(path) or os.path.lexists(path):
        _rm_in_userns(path)


class _Remover:
    """Deletes, under one folder, whatever the caller may delete; notes the rest."""

    def __init__(self, cursor: Cursor) -> None:
        self.cur = cursor
        self.complete = True

    def clear(self) -> list[str]:
        """Unlink what is not a folder in the current folder; return its subfolders."""
        try:
            entries = self.cur.entries()
        except OSError:
            self.complete = False
            return []
        subdirs = []
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry.name)
                    continue
                os.unlink(entry.name, dir_fd=self.cur.fd)
            except FileNotFoundError:
                pass
            except OSError:
                self.complete = False  # a subordinate id's file: rm in the namespace
        return subdirs

    def rmdir(self, name: str) -> None:
        try:
            os.rmdir(name, dir_fd=self.cur.fd)
        except OSError:
            self.complete = False

    def run(self) -> bool:
        """Depth first, children before their folder; True if nothing was left."""
        pending = [self.clear()]  # per level: subfolders still to visit
        names: list[str] = []  # per level below the top: the folder's own name
        while pending:
            if pending[-1]:
                name = pending[-1].pop()
                if self.cur.down(name):
                    names.append(name)
                    pending.append(self.clear())
                else:
                    self.complete = False  # unreadable, or another filesystem
                continue
            pending.pop()
            if names:
                self.cur.up()
                self.rmdir(names.pop())
        return self.complete


def _remove_own(path: Path) -> bool:
    """Delete what the caller may in the folder `path`, then `path` itself;
    True if all of it went."""
    try:
        cursor = Cursor(path)
    except OSError:
        return False
    with cursor:
        complete = _Remover(cursor).run()
    if complete:
        try:
            os.rmdir(path)
        except OSError:
            return False
    return complete
