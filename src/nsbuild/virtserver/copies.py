"""copydown and copyup: files and trees between the host and the testbed.

Every copy runs a command of the server's own in the testbed (inside.py),
which reads or writes the testbed's side: its symlinks resolve inside, never
on the host. The host's side of a copy is the caller's path, but any part of
it below the shared downtmp is the testbed's to shape: it is opened without
following links (hostfs.py), and a tree that comes up is taken as untar.py
says. What one copyup may write on the host is bounded (--copy-limit).
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from nsbuild.virtserver.inside import Inside, wait
from nsbuild.virtserver.protocol import CommandFailed, Misuse
from nsbuild.virtserver.testbed import DOWNTMP, GONE
from nsbuild.virtserver.untar import ENTRY_COST, Timeout, TooLarge

if TYPE_CHECKING:
    from nsbuild.sandbox import Process

# As long as autopkgtest's own servers wait for a copy.
COPY_TIMEOUT = float(os.environ.get("AUTOPKGTEST_VIRT_COPY_TIMEOUT", "300"))
# What one copyup may write on the host, at most: a sparse file of the
# testbed reaches the host with all its bytes; in a tree, every folder and
# file is charged ENTRY_COST besides (inodes and blocks, not only bytes).
DEFAULT_COPY_LIMIT = "4G"

_COPYDOWN_FILE = 'cat > "$1" && if [ "$2" = x ]; then chmod +x -- "$1"; fi'
_COPYDOWN_DIR = (
    'mkdir -p -- "$1" && cd -- "$1" && '
    "exec tar --warning=none --preserve-permissions --no-same-owner -x -f -"
)
_COPYUP_FILE = 'exec cat -- "$1"'
_COPYUP_DIR = 'cd -- "$1" && exec tar --warning=none -c -f - .'
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Copies:
    """The copies of one open testbed, whose downtmp is `downtmp` on the host."""

    def __init__(self, inside: Inside, downtmp: str, limit: int,
                 notice: Callable[[str], None]) -> None:  # fmt: skip
        self.inside = inside
        self.downtmp = downtmp
        self.limit = limit
        self.notice = notice

    def copy(self, src: str, dst: str, *, up: bool) -> None:
        verb = "copyup" if up else "copydown"
        if not src or not dst:
            raise Misuse(f"{verb} paths must be nonempty")
        is_dir = src.endswith("/")
        if is_dir != dst.endswith("/"):
            raise Misuse(f"{verb} paths must agree about directoryness (trailing /)")
        host, inside = (dst, src) if up else (src, dst)
        if not inside.startswith("/"):
            raise CommandFailed("copy-failed", f"{verb}: {inside}: not an absolute testbed path")
        from nsbuild.sandbox import SandboxError
        from nsbuild.sandbox.errors import NotRunning
        from nsbuild.virtserver.hostfs import check_shared

        try:
            shared = self._shared(host, inside)
            if shared is not None:
                # `ok` tells the client to read the host path: only when the
                # testbed left a regular file (a tree of files) there, not a
                # symlink to a host file or a FIFO.
                if up:
                    check_shared(self.downtmp, shared, is_dir=is_dir)
                return
            deadline = time.monotonic() + COPY_TIMEOUT
            if up:
                self._copyup(inside, host, is_dir, deadline)
            else:
                self._copydown(host, inside, is_dir, deadline)
        except NotRunning:
            raise CommandFailed("copy-failed", f"{verb} {src} {dst}: {GONE}") from None
        except (OSError, SandboxError) as e:
            raise CommandFailed("copy-failed", f"{verb} {src} {dst}: {_why(e)}") from None

    def _shared(self, host: str, inside: str) -> str | None:
        """When `host` is `inside` seen through the shared downtmp (nothing to
        copy): the path below the downtmp, else None."""
        inside = os.path.normpath(inside)
        if inside != DOWNTMP and not inside.startswith(DOWNTMP + "/"):
            return None
        rel = inside[len(DOWNTMP) :]
        mapped = os.path.normpath(self.downtmp + rel)
        return rel.lstrip("/") if os.path.normpath(os.path.abspath(host)) == mapped else None

    def _copydown(self, host: str, inside: str, is_dir: bool, deadline: float) -> None:
        # Writes go through the testbed even into the shared downtmp: code in
        # it may have put symlinks there, which must resolve inside.
        from nsbuild.virtserver.hostfs import host_dir, open_host_file

        if not is_dir:
            # A host path in the downtmp is the testbed's to shape: opened
            # without following its links, as a regular file only.
            fd = open_host_file(host, self.downtmp)
            try:
                x = "x" if os.fstat(fd).st_mode & 0o111 else "-"
                argv = ["sh", "-c", _COPYDOWN_FILE, "copydown", inside.rstrip("/"), x]
                status = wait(self.inside.start(argv, fd), deadline, argv)
            finally:
                os.close(fd)
            if status != 0:
                raise CommandFailed("copy-failed", f"copydown to {inside}: status {status}")
            return
        top = host_dir(host, self.downtmp)
        r, w = os.pipe()
        try:
            # The host's own tar, in the folder opened above (its /proc link
            # names that very folder, whatever happens to its path since).
            tar = subprocess.Popen(["tar", "--warning=none", "-C", f"/proc/self/fd/{top}", "-c",
                                    "-f", "-", "."], stdin=subprocess.DEVNULL, stdout=w, stderr=2,
                                   pass_fds=(top,))  # fmt: skip
            os.close(w)
            w = -1
            argv = ["sh", "-c", _COPYDOWN_DIR, "copydown", inside]
            proc = self.inside.start(argv, r)
        finally:
            os.close(r)
            os.close(top)
            if w >= 0:
                os.close(w)
        _both(proc, tar, deadline, f"copydown {host} to {inside}", argv)

    def _copyup(self, inside: str, host: str, is_dir: bool, deadline: float) -> None:
        # Reads go through the testbed: `cat` and `tar` follow its symlinks
        # inside, never on the host. What they write is the testbed's to
        # shape: the host side takes it as described in untar.py.
        from nsbuild.virtserver.hostfs import host_dir
        from nsbuild.virtserver.untar import extract

        if is_dir:
            top = host_dir(host, self.downtmp, create=True)
            try:
                untar = partial(extract, dest_fd=top, deadline=deadline, say=self.notice,
                                limit=self.limit)  # fmt: skip
                self._copyup_through(_COPYUP_DIR, inside, deadline, untar, tree=True)
            finally:
                os.close(top)
            return
        parent = host_dir(os.path.dirname(os.path.abspath(host)), self.downtmp)
        name = os.fsencode(os.path.basename(host))
        try:
            # A new file (an old one is replaced, never written into), never
            # through a symlink; 0644: no mode of the testbed's file is kept.
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(name, dir_fd=parent)
            fd = os.open(name, _NEW_FILE, 0o644, dir_fd=parent)
            try:
                cat = partial(_copy_bounded, out=fd, limit=self.limit, deadline=deadline)
                self._copyup_through(_COPYUP_FILE, inside, deadline, cat, tree=False)
            except BaseException:
                # Nothing half-copied stays behind under the caller's name.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=parent)
                raise
            finally:
                os.close(fd)
        finally:
            os.close(parent)

    def _copyup_through(self, script: str, inside: str, deadline: float,
                        take: Callable[[int], None], *, tree: bool) -> None:  # fmt: skip
        """Runs `script` on `inside` in the testbed with its stdout a pipe
        that `take` reads to the end: this side counts the bytes, and no
        process of the testbed keeps a descriptor of a host file."""
        argv = ["sh", "-c", script, "copyup", inside]
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            proc = self.inside.start(argv, stdout=w)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        try:
            try:
                take(r)
            finally:
                os.close(r)  # the testbed's end sees a closed pipe if it writes on
        except BaseException as e:
            proc.kill()
            proc.wait()
            if isinstance(e, Timeout):
                raise CommandFailed("timeout", f"copyup of {inside}: timed out") from None
            if isinstance(e, TooLarge):
                what = f"{e}: " if str(e) else ""
                raise CommandFailed("copy-failed",
                                    f"copyup of {inside}: {what}{self._over(tree)}") from None
            raise
        status = wait(proc, deadline, argv)
        if status != 0:
            raise CommandFailed("copy-failed", f"copyup of {inside}: status {status} inside")

    def _over(self, tree: bool) -> str:
        counts = "a sparse file of the testbed counts whole"
        if tree:
            each = size_text(ENTRY_COST)
            counts = f"each folder and file counts {each} besides its bytes; {counts}"
        return f"more than {size_text(self.limit)} to copy (the server's --copy-limit; {counts})"


def _copy_bounded(r: int, out: int, limit: int, deadline: float) -> None:
    """Copy from the pipe `r` to `out` until its end: TooLarge past `limit`
    bytes, Timeout past `deadline`."""
    total = 0
    while True:
        ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise Timeout()
        data = os.read(r, 1 << 20)
        if not data:
            return
        total += len(data)
        if total > limit:
            raise TooLarge()
        while data:
            data = data[os.write(out, data) :]


def _both(proc: Process, tar: subprocess.Popen[bytes], deadline: float, what: str,
          argv: list[str]) -> None:  # fmt: skip
    try:
        inside = wait(proc, deadline, argv)
        outside = tar.wait(timeout=max(0.1, deadline - time.monotonic()))
    except (CommandFailed, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()
        tar.kill()
        tar.wait()
        raise CommandFailed("timeout", f"{what}: timed out") from None
    if inside != 0 or outside != 0:
        raise CommandFailed(
            "copy-failed", f"{what}: failed (inside status {inside}, host tar status {outside})"
        )


def _why(e: Exception) -> str:
    """An error in one line; a name in it may be the testbed's (escaped)."""
    from nsbuild.printable import printable
    from nsbuild.virtserver.hostfs import Refused

    if isinstance(e, OSError) and e.strerror and not isinstance(e, Refused):
        name = e.filename if e.filename is not None else ""
        where = os.fsdecode(name) if isinstance(name, bytes) else str(name)
        return e.strerror + (f": {printable(where, 200)}" if where else "")
    return printable(str(e))


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """A size such as 512M or 4G (powers of 1024) in bytes; ValueError otherwise."""
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = text[-1:] if text[-1:] in _UNITS else ""
    number = text[: len(text) - len(unit)]
    if not number.isdigit() or int(number) == 0:
        raise ValueError(f"bad size {text!r}")
    return int(number) * _UNITS[unit]


def size_text(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]} {unit}iB"
    return f"{n} bytes"
