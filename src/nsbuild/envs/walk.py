"""Walk a directory tree of any depth, through one descriptor at a time.

Trees under the cache were shaped by code in a sandbox: they may be deeper
than Python's recursion limit (os.walk and shutil.rmtree recurse) and than
PATH_MAX, and hold symlinks anywhere. A `Cursor` holds the folder it stands
in open; going down opens a child by name relative to it, never following a
symlink and never leaving the top's filesystem; going up opens ".." and
checks that it is the folder we came from. Callers keep their own stack of
what is left to visit: a deeper tree costs no stack frame and no descriptor.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from nsbuild.envs.errors import EnvError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class Cursor:
    """An open folder inside the tree at `top` (see the module's doc)."""

    def __init__(self, top: Path) -> None:
        self.top = top
        self.fd = os.open(top, _DIR_FLAGS)
        st = os.fstat(self.fd)
        self.dev, self._ino = st.st_dev, st.st_ino
        # (device, inode) of each folder above the current one, the top first.
        self._above: list[tuple[int, int]] = []

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Cursor:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def entries(self) -> list[os.DirEntry[str]]:
        """The current folder's entries (their stat() is relative to it)."""
        with os.scandir(self.fd) as it:
            return list(it)

    def down(self, name: str) -> bool:
        """Step into the subfolder `name`; False (staying here) if it is not a
        folder on the top's filesystem, or cannot be opened."""
        try:
            child = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
        except OSError:
            return False
        st = os.fstat(child)
        if st.st_dev != self.dev or not stat.S_ISDIR(st.st_mode):
            os.close(child)
            return False
        self._above.append((self.dev, self._ino))
        os.close(self.fd)
        self.fd, self._ino = child, st.st_ino
        return True

    def up(self) -> None:
        """Step back to the folder above. Raises EnvError if ".." is no longer
        the folder we came down from (the tree was moved meanwhile)."""
        parent = os.open("..", _DIR_FLAGS, dir_fd=self.fd)
        st = os.fstat(parent)
        if (st.st_dev, st.st_ino) != self._above[-1]:
            os.close(parent)
            raise EnvError(f"{self.top}: the tree changed while it was walked; try again")
        self._above.pop()
        os.close(self.fd)
        self.fd, self._ino = parent, st.st_ino


def _count(cur: Cursor, seen: set[tuple[int, int]]) -> tuple[int, list[str]]:
    """Bytes of the current folder's entries not counted yet, and its subfolders."""
    total, subdirs = 0, []
    for entry in cur.entries():
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue  # a live session may remove what was just listed
        if st.st_dev != cur.dev or (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        total += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            subdirs.append(entry.name)
    return total, subdirs


def disk_usage(path: Path) -> int:
    """Bytes allocated under `path`, each inode counted once, mounts not
    crossed. What cannot be read is left out (a live session may change its
    tree while it is counted)."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    total = st.st_blocks * 512
    if not stat.S_ISDIR(st.st_mode):
        return total
    seen: set[tuple[int, int]] = set()
    try:
        with Cursor(path) as cur:
            counted, subdirs = _count(cur, seen)
            total += counted
            pending = [subdirs]  # per level: subfolders still to count
            while pending:
                if pending[-1]:
                    if cur.down(pending[-1].pop()):
                        counted, subdirs = _count(cur, seen)
                        total += counted
                        pending.append(subdirs)
                    continue
                pending.pop()
                if pending:
                    cur.up()
    except (OSError, EnvError):
        pass  # the total so far
    return total
