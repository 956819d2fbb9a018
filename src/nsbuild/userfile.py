"""Small files a user names on the command line or in a configuration (a
settings file, a key): read once, from one descriptor, bounded."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path


class NotSmallFile(ValueError):
    """The file is not a regular file, or is larger than allowed."""


def read_small(
    path: Path, limit: int, check: Callable[[os.stat_result], None] | None = None
) -> bytes:
    """The bytes of `path`, a regular file of at most `limit` bytes. Opened
    without blocking and checked by fstat before any read, so a FIFO or a
    device named there is never read from. `check` sees the file's status
    first (an owner's rule). Raises OSError as the kernel says, or
    NotSmallFile naming what is wrong."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotSmallFile("not a regular file")
        if check is not None:
            check(st)
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise NotSmallFile(f"larger than {limit} bytes")
    return data
