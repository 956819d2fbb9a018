"""The archive URLs named by apt sources inside an environment's root.

The root may hold what code in a sandbox wrote: every path is resolved inside
it (a symlink cannot lead to a host file), and only regular files of
reasonable size are read (a FIFO or /dev/zero cannot hang or flood).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from nsbuild.sandbox import syscalls as sc


def apt_mirrors(root: Path) -> tuple[str, ...]:
    """The archive URLs in a root's apt sources (one-line and deb822 formats)."""
    found: list[str] = []
    names = ["etc/apt/sources.list"]
    names += [f"etc/apt/sources.list.d/{n}" for n in _list_in_root(root, "etc/apt/sources.list.d")]
    for name in names:
        text = _read_in_root(root, name)
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            if words[:1] in (["deb"], ["deb-src"]):
                urls = [w for w in words[1:] if "://" in w][:1]
            elif words[:1] == ["URIs:"]:
                urls = [w for w in words[1:] if "://" in w]
            else:
                continue
            found += [u for u in urls if u not in found]
    return tuple(found)


_MAX_SOURCES_FILE = 1 << 20


def _open_in_root(root: Path, name: str, flags: int) -> int | None:
    try:
        dirfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return sc.openat2(dirfd, name, flags, sc.RESOLVE_IN_ROOT | sc.RESOLVE_NO_MAGICLINKS)
    except OSError:
        return None
    finally:
        os.close(dirfd)


def _list_in_root(root: Path, name: str) -> list[str]:
    fd = _open_in_root(root, name, os.O_RDONLY | os.O_DIRECTORY)
    if fd is None:
        return []
    try:
        return sorted(n for n in os.listdir(fd) if n.endswith((".list", ".sources")))
    finally:
        os.close(fd)


def _read_in_root(root: Path, name: str) -> str:
    fd = _open_in_root(root, name, os.O_RDONLY | os.O_NONBLOCK)
    if fd is None:
        return ""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_SOURCES_FILE:
            return ""
        return os.read(fd, _MAX_SOURCES_FILE).decode(errors="replace")
    finally:
        os.close(fd)
