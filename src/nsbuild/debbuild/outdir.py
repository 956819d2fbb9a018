"""Writing results and logs into a folder the user named (--out, or the
kept logs' folder), which may hold links or files planted by someone else."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from pathlib import Path

from nsbuild.errors import NsbuildError


class Folder:
    """A folder results and logs are written into, opened once (the path the
    user gave followed then, never again). Each file arrives under a name of
    its own and is renamed over its final name: a link or file already there
    is replaced, never written through."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise NsbuildError(f"cannot open {path}: {e.strerror}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def same_as(self, path: Path) -> bool:
        try:
            return os.path.samestat(os.fstat(self.fd), os.stat(path))
        except OSError:
            return False

    def has(self, name: str) -> bool:
        """Whether `name` is here (as anything, a link included)."""
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def put(self, src: Path, name: str, *, replace: bool = True) -> Path:
        """Move the private file `src` here as `name`: renamed on the same
        filesystem, else copied into a new file beside `name`, then renamed.
        With replace=False, linked into place instead: an existing `name` is
        left as it is, and the move refused."""
        src_dir = os.open(src.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._place(src.name, src_dir, name, replace)
            if not replace:
                os.unlink(src.name, dir_fd=src_dir)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise self._refused(name, e) from None
            self._copy(src, name, replace)
            os.unlink(src.name, dir_fd=src_dir)
        finally:
            os.close(src_dir)
        return self.path / name

    def _place(self, src: str, src_dir: int, name: str, replace: bool) -> None:
        if replace:
            os.rename(src, name, src_dir_fd=src_dir, dst_dir_fd=self.fd)
        else:
            os.link(src, name, src_dir_fd=src_dir, dst_dir_fd=self.fd, follow_symlinks=False)

    def _refused(self, name: str, e: OSError) -> NsbuildError:
        if e.errno == errno.EEXIST:
            return NsbuildError(f"{self.path / name} exists and is not this build's: not replaced")
        return NsbuildError(f"cannot write {self.path / name}: {e.strerror}")

    def _copy(self, src: Path, name: str, replace: bool = True) -> None:
        part = f".{name}.{secrets.token_hex(4)}.part"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(part, flags, 0o644, dir_fd=self.fd)
        except OSError as e:
            raise NsbuildError(f"cannot write in {self.path}: {e.strerror}") from None
        try:
            os.fchmod(fd, 0o644)  # whatever the umask
            with open(src, "rb") as f, open(fd, "wb", closefd=False) as out:
                shutil.copyfileobj(f, out, 1 << 20)
            self._place(part, self.fd, name, replace)
            if not replace:
                os.unlink(part, dir_fd=self.fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(part, dir_fd=self.fd)
            raise self._refused(name, e) from None
        finally:
            os.close(fd)
