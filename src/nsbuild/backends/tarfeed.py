"""The host's side of a copy in: a tree or file of the user's, walked by
descriptor (never by a path a writer may swap) into a tar stream, each
entry checked and bounded as it is read."""

from __future__ import annotations

import os
import stat
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

from nsbuild.backends.errors import BackendError, CopyRefused
from nsbuild.errors import NsbuildError
from nsbuild.printable import printable


class TarFeeder:
    """The write side of copy_in: a tar stream of `host_path` (as `name`)
    written by a thread into a pipe whose read end is `fd`, for the command
    that unpacks it. What went wrong on this side is in `error` once done."""

    def __init__(self, host_path: Path, name: str, limit: int) -> None:
        self.error: NsbuildError | None = None
        self._limit = limit
        self._what = str(host_path)
        # The file or folder is opened (and checked) now: a refusal comes
        # before any run.
        self._dir = _open_dir(host_path) if host_path.is_dir() else None
        self._file = open_regular(host_path, limit) if self._dir is None else None
        self._name = name
        self.fd, self._write_fd = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._feed, name="nsbuild-copy-in", daemon=True)
        self._thread.start()

    def __enter__(self) -> TarFeeder:
        return self

    def __exit__(self, *exc: object) -> None:
        # The reader is gone: a writer still at it gets EPIPE, not a hang.
        os.close(self.fd)
        self._thread.join()
        if self._file is not None:
            self._file.close()
        if self._dir is not None:
            os.close(self._dir)

    def _feed(self) -> None:
        try:
            with open(self._write_fd, "wb") as pipe, tarfile.open(
                fileobj=pipe, mode="w|", format=tarfile.PAX_FORMAT
            ) as tar:
                try:
                    if self._file is not None:
                        tar.addfile(self._info(), _Padded(self._file, self._fail, self._what))
                    else:
                        self._add_tree(tar)
                except BrokenPipeError:
                    raise
                except (NsbuildError, OSError, tarfile.TarError) as e:
                    self._fail(e)
                # The archive is ended even after a refusal: the reader stops
                # there, where waiting for EOF would wait on every copy of the
                # pipe's write end (a process forked meanwhile holds one).
        except (OSError, tarfile.TarError) as e:
            # EPIPE: the command stopped reading; its status says why.
            if not isinstance(e, BrokenPipeError):
                self._fail(e)

    def _fail(self, e: Exception) -> None:
        if self.error is None:
            wrapped = BackendError(f"copying {self._what} in: {e}")
            self.error = e if isinstance(e, NsbuildError) else wrapped

    def _info(self) -> tarfile.TarInfo:
        assert self._file is not None
        st = os.fstat(self._file.fileno())
        if st.st_size > self._limit:  # grown since it was opened
            raise CopyRefused(f"refusing to copy {self._what}: larger than {self._limit} bytes")
        return _tar_info(self._name, st, tarfile.REGTYPE)

    def _add_tree(self, tar: tarfile.TarFile) -> None:
        """The folder opened in __init__ and all below it, walked by descriptor:
        each entry is pinned by an O_PATH descriptor (which opens nothing: a
        FIFO cannot block, a device cannot act) before its type is looked at,
        and what is read is that very inode. A writer of the tree swapping an
        entry for a link to one of the user's files, or for a FIFO, meanwhile
        gets a link stored as a link, a FIFO as a FIFO."""
        assert self._dir is not None
        top = self._dir
        tar.addfile(_tar_info(self._name, os.fstat(top), tarfile.DIRTYPE))
        stack = [(top, self._name, iter(sorted(os.listdir(top))))]
        try:
            while stack:
                folder, arcname, names = stack[-1]
                name = next(names, None)
                if name is None:
                    stack.pop()
                    if folder != top:
                        os.close(folder)
                    continue
                child = self._add_entry(tar, folder, f"{arcname}/{name}", name)
                if child is not None:
                    stack.append((child, f"{arcname}/{name}", iter(sorted(os.listdir(child)))))
        finally:
            for folder, _, _ in stack:
                if folder != top:
                    os.close(folder)

    def _add_entry(self, tar: tarfile.TarFile, folder: int, arcname: str, name: str) -> int | None:
        """Add `name` of the open `folder` as `arcname`; a subfolder's open
        descriptor is returned, for the caller to walk and close."""
        handle = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
        try:
            st = os.fstat(handle)
            if stat.S_ISLNK(st.st_mode):
                info = _tar_info(arcname, st, tarfile.SYMTYPE)
                info.linkname = os.readlink("", dir_fd=handle)
                tar.addfile(info)
                return None
            if stat.S_ISDIR(st.st_mode):
                tar.addfile(_tar_info(arcname, st, tarfile.DIRTYPE))
                # Through /proc: the inode just looked at, not the name again.
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
                return os.open(f"/proc/self/fd/{handle}", flags)
            if stat.S_ISFIFO(st.st_mode):  # stays a FIFO, never opened
                tar.addfile(_tar_info(arcname, st, tarfile.FIFOTYPE))
                return None
            shown = printable(arcname[len(self._name) + 1 :])
            if stat.S_ISSOCK(st.st_mode):  # as tar: nothing a copy can carry
                return None
            if not stat.S_ISREG(st.st_mode):
                raise CopyRefused(f"refusing to copy {self._what}: {shown} is a device")
            if st.st_size > self._limit:
                raise CopyRefused(
                    f"refusing to copy {self._what}: {shown} is larger than {self._limit} bytes"
                )
            # The size looked at is what is sent: a file grown since is cut
            # there, one shrunk is padded and fails the copy.
            with open(f"/proc/self/fd/{handle}", "rb") as data:
                padded = _Padded(data, self._fail, f"{self._what}: {shown}")
                tar.addfile(_tar_info(arcname, st, tarfile.REGTYPE), padded)
            return None
        finally:
            os.close(handle)


class _Padded:
    """A file read as a tar member of a size fixed beforehand: what it lacks (it shrank,
    a read failed) is sent as zeros, the archive kept whole, and `fail` is told."""

    def __init__(self, file: IO[bytes], fail: Callable[[Exception], None], what: str) -> None:
        self._file, self._fail, self._what = file, fail, what
        self._short = False

    def read(self, size: int = -1, /) -> bytes:
        if size < 0:  # tar always asks for its size
            return self._file.read()
        data = b""
        if not self._short:
            try:
                data = self._file.read(size)
            except OSError as e:
                self._fail(BackendError(f"copying {self._what} in: {e.strerror}"))
            if len(data) == size:
                return data
            self._short = True
            self._fail(BackendError(f"copying {self._what} in: it shrank as it was read"))
        return data + bytes(size - len(data))


def _tar_info(name: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
    """A tar member `name` of type `kind`: time, mode (no setid bit) and size of `st`."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime, info.mode = st.st_mtime, st.st_mode & 0o777
    info.size = st.st_size if kind == tarfile.REGTYPE else 0
    return info


def _open_dir(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise CopyRefused(f"refusing to copy {path}: {e.strerror}") from None


def open_regular(path: Path, limit: int) -> IO[bytes]:
    """`path` open for reading, when it is a regular file (not a link, a
    FIFO or a device, whose very opening can hang or act) of at most `limit`
    bytes; CopyRefused otherwise."""
    try:
        handle = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise CopyRefused(f"refusing to copy {path}: {e.strerror}") from None
    try:
        st = os.fstat(handle)
        if not stat.S_ISREG(st.st_mode):
            raise CopyRefused(f"refusing to copy {path}: not a regular file")
        if st.st_size > limit:
            raise CopyRefused(f"refusing to copy {path}: larger than {limit} bytes")
        return open(f"/proc/self/fd/{handle}", "rb")
    finally:
        os.close(handle)
