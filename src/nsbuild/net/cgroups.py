"""cgroup v2 for the nftables engine: find the mount, make and remove a run's cgroup.

A run's cgroup is `<cgroup2 mount>/nsbuild-net.<owner pid>.<n>`, at the top
of the hierarchy (level 1) so nftables can match it with `socket cgroupv2
level 1`, and so `gc()` finds leftovers of dead owners in one place.
"""

from __future__ import annotations

import os

from nsbuild.sandbox.cgroupfs import (
    cgroup2_mount,
    make_run_cgroup,
    pid_alive,
    remove_cgroup,
    run_cgroup_owner,
)

__all__ = ["cgroup2_mount", "pid_alive", "remove_cgroup"]

PREFIX = "nsbuild-net."


def nft_cgroup_path(cgroup_dir: str) -> str:
    """The path string nft wants for `socket cgroupv2 ... "PATH"`.

    nft (1.0.x) resolves it as `/sys/fs/cgroup/PATH`, a hard-coded prefix, so
    give it our directory relative to that prefix; it stays right when the
    cgroup2 mount is elsewhere (here: /sys/fs/cgroup/unified)."""
    return os.path.relpath(cgroup_dir, "/sys/fs/cgroup")


def create_run_cgroup(mount: str) -> str:
    return make_run_cgroup(mount, PREFIX)


def owner_pid(name: str) -> int | None:
    return run_cgroup_owner(name, PREFIX)


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

