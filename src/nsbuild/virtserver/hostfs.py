"""The host side's access to files a testbed made: never through a link it did not make.

Root in a testbed shapes everything under the shared downtmp and apt's
folders: any name there may be a symlink to a host file, a FIFO that blocks
a reader, or a sparse file of any size. These functions open such paths one
component at a time without following links, check the type (and the size)
on the open descriptor, and only then read or write.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from nsbuild.printable import printable

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO in place of a file must not block the open.
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_SETID = stat.S_ISUID | stat.S_ISGID
# openat2(2) resolve flags (linux/openat2.h).
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08


class Refused(OSError):
    """A path the host side does not take: a link, a device, too large."""


def shown(name: str | bytes) -> str:
    """A name from a testbed, fit for a one-line message."""
    if isinstance(name, bytes):
        name = name.decode(errors="surrogateescape")
    return printable(name, 200)


def split(rel: str | bytes) -> list[bytes]:
    """The components of a relative name; `..` and absolute names are refused."""
    raw = os.fsencode(rel)
    if b"\0" in raw:
        raise Refused(f"{shown(raw)}: a name with a NUL byte")
    if raw.startswith(b"/"):
        raise Refused(f"{shown(raw)}: an absolute name")
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise Refused(f"{shown(raw)}: a name that climbs out with ..")
    return parts


def open_dir(
    dir_fd: int,
    parts: list[bytes],
    *,
    create: bool = False,
    mode: int = 0o755,
    on_mkdir: Callable[[bytes], object] | None = None,
) -> int:
    """A descriptor of the directory `parts` below `dir_fd`, each component
    opened without following a symlink (created with `mode` when missing and
    `create`; `on_mkdir` is called with its name first and may raise to
    refuse it). A symlink on the way is refused, never followed."""
    fd = os.dup(dir_fd)
    try:
        for i, part in enumerate(parts):
            try:
                child = os.open(part, _DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                if on_mkdir is not None:
                    on_mkdir(part)
                os.mkdir(part, mode, dir_fd=fd)
                child = os.open(part, _DIR, dir_fd=fd)
            except OSError as e:
                # ELOOP: a symlink; ENOTDIR: anything else that is no directory.
                where = shown(b"/".join(parts[: i + 1]))
                kind = "a symlink" if _is_link(fd, part) else "not a directory"
                raise Refused(f"{where}: {kind} on the host, not followed") from e
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_link(dir_fd: int, name: bytes) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _below(path: str, top: str | None) -> list[bytes] | None:
    """The components of `path` below `top`, or None when it is not under it."""
    if top is None:
        return None
    rel = os.path.relpath(path, top)
    if rel == ".." or rel.startswith("../"):
        return None
    return split(rel)


def host_dir(path: str, beneath: str | None, *, create: bool = False) -> int:
    """A descriptor of the host directory `path`. When `path` lies under
    `beneath` (a directory a testbed writes), the components below it are
    opened without following links; above it the path is the caller's own."""
    path = os.path.abspath(path)
    parts = _below(path, beneath)
    if parts is not None:
        assert beneath is not None
        top = os.open(beneath, _DIR)
        try:
            return open_dir(top, parts, create=create)
        finally:
            os.close(top)
    if create:
        os.makedirs(path, exist_ok=True)
    # The caller's own path: its links are the caller's to follow.
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def open_host_file(path: str, beneath: str | None) -> int:
    """A descriptor to read the host file `path`: under `beneath`, opened
    without following a link and only if it is a regular file; elsewhere it
    is the caller's own path, followed as the caller means it."""
    path = os.path.abspath(path)
    if _below(path, beneath) is None:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    parent = host_dir(os.path.dirname(path), beneath)
    try:
        fd = os.open(os.path.basename(path), _READ, dir_fd=parent)
    finally:
        os.close(parent)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Refused(f"{shown(path)}: not a regular file")
    os.set_blocking(fd, True)
    return fd


@contextmanager
def opened_regular(path: str | os.PathLike[str], limit: int | None = None,
                   dir_fd: int | None = None) -> Iterator[int]:  # fmt: skip
    """A descriptor of `path` opened without following a symlink, checked to
    be a regular file (of at most `limit` bytes)."""
    fd = os.open(path, _READ, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"{shown(os.fsdecode(path))}: not a regular file")
        if limit is not None and st.st_size > limit:
            raise Refused(f"{shown(os.fsdecode(path))}: larger than {limit >> 20} MiB")
        os.set_blocking(fd, True)
        yield fd
    finally:
        os.close(fd)


def read_bounded(path: str | os.PathLike[str], limit: int, dir_fd: int | None = None) -> bytes:
    """The whole of a regular file of at most `limit` bytes (checked before
    reading, and again while reading: the file may grow)."""
    with opened_regular(path, limit, dir_fd) as fd:
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, min(1 << 20, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise Refused(f"{shown(os.fsdecode(path))}: larger than {limit >> 20} MiB")
    return b"".join(chunks)


def open_in_layer(layer: str, rel: str, flags: int) -> int:
    """`rel` below the directory `layer`, opened with no symlink on the way
    and no `..` above it (ELOOP, EXDEV otherwise). A layer unpacked from a
    tarball holds what its author chose: a link there may name any host path,
    for a host lookup (and a mount) would follow it."""
    from nsbuild.sandbox import syscalls as sc

    top = os.open(layer, _DIR)
    try:
        return sc.openat2(top, rel, flags, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS)
    finally:
        os.close(top)


def check_shared(top: str, rel: str, *, is_dir: bool) -> None:
    """That `rel` under the shared downtmp `top` is what a client may read on
    the host: a regular file (or a tree of only directories and regular
    files), reached without a symlink; setuid and setgid bits are cleared.
    Refused otherwise."""
    parts = split(rel)
    if not parts and not is_dir:
        raise Refused("the downtmp itself is no file")
    top_fd = os.open(top, _DIR)
    try:
        if not is_dir:
            parent = open_dir(top_fd, parts[:-1])
            try:
                _check_file(parent, parts[-1], rel, "not a regular file")
            finally:
                os.close(parent)
            return
        # Depth first, with a list rather than recursion: a tree may be deep.
        todo = [parts]
        while todo:
            here = todo.pop()
            fd = open_dir(top_fd, here)
            try:
                todo.extend(_check_dir(fd, here))
            finally:
                os.close(fd)
    finally:
        os.close(top_fd)


def _check_dir(dir_fd: int, parts: list[bytes]) -> list[list[bytes]]:
    """Check the files of one directory; return its subdirectories."""
    subdirs = []
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            name = os.fsencode(entry.name)
            if entry.is_dir(follow_symlinks=False):
                subdirs.append([*parts, name])
            else:
                where = os.fsdecode(b"/".join([*parts, name]))
                _check_file(dir_fd, name, where, "not a regular file or directory")
    return subdirs


def _check_file(dir_fd: int, name: bytes, where: str, what: str) -> None:
    # O_PATH: the type is checked without opening the file itself (a FIFO
    # would block, a file the caller cannot read is no reason to refuse).
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        raise Refused(f"{shown(where)}: {what} ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"{shown(where)}: {what}")
        if st.st_mode & _SETID:
            # The client may copy it on: a setuid program of the testbed
            # loses its bit on the host. (An O_PATH descriptor takes no
            # fchmod; its /proc link names this very inode.)
            try:
                os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(st.st_mode) & ~_SETID)
            except OSError as e:
                raise Refused(f"{shown(where)}: setuid or setgid, and {e.strerror}") from None
    finally:
        os.close(fd)
