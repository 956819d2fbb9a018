"""The default root of `nsbuild run`: a read-only view of the host's system.

/usr and its merged-usr links, /etc, fresh /proc, minimal /dev, read-only /sys,
tmpfs on /tmp, /var/tmp and /run, and the working directory read-write at its
own path. Nothing else of the host (home directories, /root, /var, other
users' files) is visible.
"""

from __future__ import annotations

import os

from nsbuild.sandbox.spec import Bind, Dev, Dir, Mount, Proc, Symlink, Sys, Tmpfs

_SYSTEM_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


def host_view(cwd: str | None = None) -> tuple[Mount, ...]:
    mounts: list[Mount] = [Bind("/usr", "/usr", readonly=True)]
    for name in _SYSTEM_DIRS:
        path = "/" + name
        if os.path.islink(path):
            mounts.append(Symlink(os.readlink(path), path))
        elif os.path.isdir(path):
            # A system without merged /usr: show the real directory.
            mounts.append(Bind(path, path, readonly=True))
    mounts += [
        Bind("/etc", "/etc", readonly=True),
        Proc(),
        Dev(),
        Sys(),
        Tmpfs("/tmp", 0o1777),
        Dir("/var"),
        Tmpfs("/var/tmp", 0o1777),
        Tmpfs("/run", 0o755),
    ]
    if cwd and cwd != "/":
        mounts.append(Bind(cwd, cwd))
    return tuple(mounts)
