"""Delete trees that hold files of the subuid range, never crossing a mount.

Files created inside a sandbox belong to the caller's subordinate ids; the
caller cannot delete those on the host. So: first delete what the caller can
(most of a tree: uid 0 inside is the caller), then finish with `rm` inside a
user namespace with the same id map, where those files are ours again.

Before anything, /proc/self/mountinfo is checked: a tree with a mount point
in it is refused, not descended into (a bind mount of $HOME into a stale
session must never be "cleaned").
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from nsbuild.envs.errors import EnvError
from nsbuild.printable import printable


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
    err = proc.stderr.read(64 << 10).decode(errors="replace").strip()
    proc.stderr.close()
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
    failed: list[str] = []

    def note(_func: object, p: str, _exc: object) -> None:
        failed.append(p)

    shutil.rmtree(path, onerror=note)
    if failed or os.path.lexists(path):
        _rm_in_userns(path)
