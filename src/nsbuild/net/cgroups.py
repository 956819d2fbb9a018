"""cgroup v2 for the nftables engine: find the mount, make and remove a run's cgroup.

A run's cgroup is `<cgroup2 mount>/nsbuild-net.<owner pid>.<n>`, at the top
of the hierarchy (level 1) so nftables can match it with `socket cgroupv2
level 1`, and so `gc()` finds leftovers of dead owners in one place.
"""

from __future__ import annotations

import itertools
import os

from nsbuild.sandbox.cgroupfs import cgroup2_mount, pid_alive, remove_cgroup

__all__ = ["cgroup2_mount", "pid_alive", "remove_cgroup"]

PREFIX = "nsbuild-net."
_counter = itertools.count()


def nft_cgroup_path(cgroup_dir: str) -> str:
    """The path string nft wants for `socket cgroupv2 ... "PATH"`.

    nft (1.0.x) resolves it as `/sys/fs/cgroup/PATH`, a hard-coded prefix, so
    give it our directory relative to that prefix; it stays right when the
    cgroup2 mount is elsewhere (here: /sys/fs/cgroup/unified)."""
    return os.path.relpath(cgroup_dir, "/sys/fs/cgroup")


def create_run_cgroup(mount: str) -> str:
    name = f"{PREFIX}{os.getpid()}.{next(_counter)}"
    path = os.path.join(mount, name)
    try:
        os.mkdir(path)
    except FileExistsError:  # a leftover of an earlier process with our pid
        remove_cgroup(path)
        os.mkdir(path)
    return path


def owner_pid(name: str) -> int | None:
    if not name.startswith(PREFIX):
        return None
    pid = name[len(PREFIX) :].split(".")[0]
    return int(pid) if pid.isdigit() else None


def stale_cgroups(mount: str) -> list[str]:
    out = []
    try:
        entries = list(os.scandir(mount))
    except OSError:
        return []
    for entry in entries:
        pid = owner_pid(entry.name)
        if pid is not None and not pid_alive(pid):
            out.append(entry.path)
    return out

