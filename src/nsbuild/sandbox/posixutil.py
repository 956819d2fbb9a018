"""The few conveniences of the os module that `nsbuild run` needs, on `posix`.

The run path imports `posix` (built into the interpreter), not `os`: os
imports _collections_abc for its environ, a MutableMapping, and building those
abstract classes is about a millisecond of every `nsbuild run` (2 ms and 69
page faults on the benchmark machine). Everything here is the plain system
call, or string work on paths that needs no file system.
"""

from __future__ import annotations

import posix
import sys

# _stat, the C module that stat.py re-exports: one module fewer to import.
from _stat import S_ISDIR, S_ISLNK

_ENCODING = sys.getfilesystemencoding()


def fsencode(name: str) -> bytes:
    """A file name as the kernel sees it (os.fsencode for str)."""
    return name.encode(_ENCODING, "surrogateescape")


def environ() -> dict[str, str]:
    """The process's environment, decoded as os.environ does."""
    return {k.decode(_ENCODING, "surrogateescape"): v.decode(_ENCODING, "surrogateescape")
            for k, v in posix.environ.items()}


def getenv(name: str) -> str | None:
    value = posix.environ.get(fsencode(name))
    return None if value is None else value.decode(_ENCODING, "surrogateescape")


def normalize(path: str) -> str:
    """`path` without empty, "." and ".." components, by its text alone (as
    os.path.normpath, but "//" at the start is "/")."""
    parts: list[str] = []
    for part in path.split("/"):
        if part == "..":
            if parts and parts[-1] != "..":
                parts.pop()
            elif not path.startswith("/"):
                parts.append(part)
        elif part and part != ".":
            parts.append(part)
    text = "/".join(parts)
    if path.startswith("/"):
        return "/" + text
    return text or "."


def absolute(path: str) -> str:
    """`path` made absolute against the working directory, normalized."""
    return normalize(path if path.startswith("/") else f"{posix.getcwd()}/{path}")


def split(path: str) -> tuple[str, str]:
    """(directory part, last component), as os.path.split."""
    cut = path.rfind("/") + 1
    head, tail = path[:cut], path[cut:]
    if head.strip("/"):
        head = head.rstrip("/")
    return head, tail


def exists(path: str) -> bool:
    try:
        posix.stat(path)
    except (OSError, ValueError):
        return False
    return True


def is_dir(path: str) -> bool:
    try:
        return S_ISDIR(posix.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def is_link(path: str) -> bool:
    try:
        return S_ISLNK(posix.lstat(path).st_mode)
    except (OSError, ValueError):
        return False


def real(path: str) -> str:
    """The canonical path of an existing `path`, all symlinks resolved, as the
    kernel names what an O_PATH descriptor of it refers to. OSError (ENOENT,
    EACCES...) if it cannot be opened."""
    fd = posix.open(path, posix.O_PATH | posix.O_CLOEXEC)
    try:
        return posix.readlink(f"/proc/self/fd/{fd}")
    finally:
        posix.close(fd)
