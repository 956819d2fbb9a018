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
follows sbuild's. Commands never hold the log file: they write into a pipe
that nsbuild copies into it as the output comes (never held in memory), so a
build cannot seek in its log, truncate it or write over nsbuild's sections.
With an echo stream (`-v`), all of it is also shown there as it is written,
its control characters escaped: the build chose them, the terminal is the user's.
With a copy (`--log-file`), all of it also goes there as it is written.
"""

from __future__ import annotations

import codecs
import contextlib
import email.utils
import functools
import os
import select
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

from nsbuild.debbuild.errors import BuildInputError
from nsbuild.printable import printable

WIDTH = 80


def logs_root() -> Path:
    """Where the logs of builds that did not succeed are kept ($XDG_CACHE_HOME/nsbuild/logs)."""
    from nsbuild.envs.paths import private_cache_dir

    return private_cache_dir() / "logs"


def kept_logs_dir(name: str) -> Path:
    """A new folder for one failed build's logs: PKG_VERSION_ARCH-UTCTIME-PID."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return logs_root() / f"{name}-{stamp}-{os.getpid()}"


def _box(title: str, right: str = "", rule: str = "-") -> str:
    inner = WIDTH - 4
    text = title if not right else title + right.rjust(inner - len(title))
    bar = "+" + rule * (WIDTH - 2) + "+"
    return f"{bar}\n| {text[:inner].ljust(inner)} |\n{bar}\n"


def open_copy(path: Path) -> IO[bytes]:
    """`path` opened for --log-file: a new file, or a regular file of the
    caller's, emptied; never through a symbolic link (nor a FIFO or a
    device, which opening alone could block on or act on). BuildInputError
    naming the path otherwise."""
    shown = f"--log-file {printable(str(path))}"
    try:
        st: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise BuildInputError(f"{shown}: {e.strerror}") from None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise BuildInputError(f"{shown}: a symbolic link, not followed")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise BuildInputError(f"{shown}: not a regular file")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NOCTTY
                     | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)  # fmt: skip
    except OSError as e:
        raise BuildInputError(f"{shown}: {e.strerror}") from None
    # Checked again on what was opened: the path may have changed meanwhile.
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise BuildInputError(f"{shown}: not a regular file of this user's")
    os.ftruncate(fd, 0)
    return open(fd, "wb", buffering=0)


class BuildLog:
    """An open .build log, written by nsbuild alone; also shown on `echo`
    (a text stream) and written to `copy` (--log-file) as it is written,
    when they are given. The log owns the copy from then on."""

    def __init__(self, path: Path, echo: IO[str] | None = None,
                 copy: IO[bytes] | None = None) -> None:  # fmt: skip
        self.path = path
        self._f: IO[bytes] = open(path, "wb", buffering=0)  # closed in close()
        self._copy = copy
        self._echo = echo

    def _put(self, data: bytes) -> None:
        # Each file on its own: a full disk loses log text, never the build.
        for f in (self._f, self._copy):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.write(data)

    @contextlib.contextmanager
    def command_output(self, limit: int | None = None) -> Iterator[int]:
        """The write end of a pipe for one command's output (stdout and
        stderr), copied into the log until the command is over: its first
        `limit` bytes when a limit is given, the rest read and dropped."""
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        copier = _Copier(read_fd, self._put, self._echo, limit)
        try:
            yield write_fd
        finally:
            os.close(write_fd)
            copier.finish()
        if copier.dropped:
            self.line(f"\n[nsbuild: output cut after {limit} bytes; "
                      f"{copier.dropped} more bytes not kept]")  # fmt: skip

    def write(self, text: str) -> None:
        self._put(text.encode(errors="replace"))
        if self._echo is not None:
            show(self._echo, text)

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
        for f in (self._f, self._copy):
            if f is not None and not f.closed:
                with contextlib.suppress(OSError):
                    os.fsync(f.fileno())
                f.close()


@functools.cache
def _escapes() -> dict[int, str]:
    """What `show` puts in place of each unsafe character: printable()'s
    escapes, but for line ends and tabs, which a stream of output needs."""
    chars = (*range(0x206A), *range(0xDC80, 0xDD00))  # up to the last bidi control
    return {c: printable(chr(c)) for c in chars
            if chr(c) not in "\n\t\\" and printable(chr(c)) != chr(c)}  # fmt: skip


def show(stream: IO[str], text: str) -> None:
    """Write `text` (what a build printed, perhaps) on a terminal's stream,
    each control character escaped. A stream that is gone costs the build nothing."""
    with contextlib.suppress(OSError, ValueError):
        stream.write(text.translate(_escapes()))
        stream.flush()


class _Copier:
    """Copies a pipe into the log in a thread, so that a command never waits
    on a full pipe (no deadlock) and nothing it wrote is lost."""

    def __init__(self, fd: int, out: Callable[[bytes], None], echo: IO[str] | None = None,
                 limit: int | None = None) -> None:  # fmt: skip
        self._fd = fd
        self._out = out
        self._echo = echo
        # Output may end in the middle of a character: decoded as it comes.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self._left = limit
        self.dropped = 0  # bytes read past the limit
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._copy, name="nsbuild-log", daemon=True)
        self._thread.start()

    def finish(self) -> None:
        """Called once the command is over: what it wrote is taken, then the copy ends."""
        os.write(self._wake_w, b"x")
        self._thread.join()
        os.close(self._wake_w)
        os.close(self._wake_r)

    def _copy(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        over = False
        try:
            while True:
                # Once the command is over, only what is already in the pipe
                # is taken: a process it left behind (in a testbed that
                # outlives the command) may hold the pipe open for ever.
                ready = dict(poller.poll(0 if over else None))
                if self._wake_r in ready:
                    poller.unregister(self._wake_r)
                    over = True
                if self._fd not in ready:
                    if over:
                        break
                    continue
                data = os.read(self._fd, 1 << 16)
                if not data:
                    break
                self._take(data)
        finally:
            os.close(self._fd)

    def _take(self, data: bytes) -> None:
        if self._left is not None:
            kept = data[: self._left]
            self.dropped += len(data) - len(kept)
            self._left -= len(kept)
            data = kept
        self._out(data)
        if self._echo is not None and data:
            show(self._echo, self._decoder.decode(data))
