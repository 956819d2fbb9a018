"""The sectioned build log, in the manner of sbuild's `.build` files.

    +==============================================================================+
    | hello 2.10-3 (amd64)                         Mon, 01 Jan 2024 10:00:00 +0000 |
    +==============================================================================+

    Package: hello
    ...

    +------------------------------------------------------------------------------+
    | Install package build dependencies                                           |
    +------------------------------------------------------------------------------+

    (output of the commands of that phase)

    +------------------------------------------------------------------------------+
    | Summary                                                                      |
    +------------------------------------------------------------------------------+

    Status: successful
    ...

People and tools (e.g. scripts that grep `Status:`) read these, so the shape
follows sbuild's. Command output is written straight to the file descriptor,
never held in memory.
"""

from __future__ import annotations

import email.utils
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO

WIDTH = 80


def logs_root() -> Path:
    """Where the logs of builds that did not succeed are kept ($XDG_CACHE_HOME/nsbuild/logs)."""
    from nsbuild.envs.paths import cache_dir

    return cache_dir() / "logs"


def kept_logs_dir(name: str) -> Path:
    """A new folder for one failed build's logs: PKG_VERSION_ARCH-UTCTIME-PID."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return logs_root() / f"{name}-{stamp}-{os.getpid()}"


def _box(title: str, right: str = "", rule: str = "-") -> str:
    inner = WIDTH - 4
    text = title if not right else title + right.rjust(inner - len(title))
    bar = "+" + rule * (WIDTH - 2) + "+"
    return f"{bar}\n| {text[:inner].ljust(inner)} |\n{bar}\n"


class BuildLog:
    """An open .build log. `fileno()` lets commands write into it directly."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: IO[bytes] = open(path, "wb", buffering=0)  # closed in close()

    def fileno(self) -> int:
        return self._f.fileno()

    @property
    def file(self) -> IO[bytes]:
        return self._f

    def write(self, text: str) -> None:
        self._f.write(text.encode(errors="replace"))

    def line(self, text: str = "") -> None:
        self.write(text + "\n")

    def header(self, title: str, fields: Iterable[tuple[str, str]]) -> None:
        now = email.utils.formatdate(localtime=False, usegmt=False)
        self.write(_box(title, now, "="))
        self.line()
        for k, v in fields:
            self.line(f"{k}: {v}")
        self.line()

    def section(self, title: str) -> None:
        self.line()
        self.write(_box(title))
        self.line()

    def fields(self, fields: Iterable[tuple[str, str]]) -> None:
        for k, v in sorted(fields):
            self.line(f"{k}: {v}")

    def close(self) -> None:
        if not self._f.closed:
            os.fsync(self._f.fileno())
            self._f.close()
