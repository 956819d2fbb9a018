"""Extract a tar stream made in a testbed into a host directory, taking only what is safe.

`copyup` of a tree runs `tar -c` inside the testbed: root there may have
replaced that `tar` (or anything it loads), so the stream is as hostile as
the testbed. No tar program runs on the host for it: GNU tar follows
symlinks already in the destination and makes links, devices and setuid
files; Python 3.11's tarfile reads extended headers and sparse maps of any
size into memory and has no extraction filters. This reader knows the few
entry kinds a `tar -c` of a tree writes (GNU and POSIX formats), bounds
every header, and:

- makes only directories and regular files: hard links, symlinks, devices
  and FIFOs are skipped, each with a line that names it;
- creates each path component with openat semantics from the destination's
  descriptor, never following a symlink: one already there (of an earlier
  copy, or of anyone) is refused, not written through; `..` and absolute
  names are refused;
- replaces a file by unlinking it and creating a new one (never writing into
  another name of the same inode), with its permission bits only: no
  setuid, setgid or sticky bit, and the caller's umask applied;
- charges every folder and file it makes against the caller's limit, not
  only the files' bytes, and takes a bounded number of entries, each at a
  bounded depth.
"""

from __future__ import annotations

import os
import select
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

from nsbuild.virtserver.hostfs import Refused, open_dir, shown, split

BLOCK = 512
# A name longer than PATH_MAX cannot be made on the host anyway.
MAX_NAME = 4096
MAX_PAX = 64 * 1024
# Lines about skipped entries, before they are only counted.
MAX_SKIP_LINES = 20
# What a folder or file costs the host beyond its bytes and its name: an
# empty file still takes an inode, an empty folder an inode and a block of
# 4 KiB. Counted so, many empty entries fill the limit as bytes would
# (inodes run out before the disk's bytes otherwise).
ENTRY_COST = 4096
# Entries of any kind, those that make nothing included (skipped links, a
# folder already there): each takes time to read and open.
MAX_ENTRIES = 1_000_000
# Folders below the destination; each entry opens its path component by
# component, and no tree of tests' results is that deep.
MAX_DEPTH = 256
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

_FILE, _DIR = (b"0", b"\0", b"7"), b"5"
_SKIPPED = {b"1": "a hard link", b"2": "a symlink", b"3": "a character device",
            b"4": "a block device", b"6": "a FIFO"}  # fmt: skip


class TarError(Refused):
    """The stream is no tar archive this reader takes."""


class Timeout(Exception):
    """The stream did not end before the deadline."""


class TooLarge(Refused):
    """The stream would make more than the limit on the host."""


class _Budget:
    """What the stream's entries cost the host so far, against `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.spent = 0
        self.entries = 0
        self.name = b""  # the entry being made, for the message

    def entry(self, name: bytes) -> None:
        """Counts one entry of the stream, of any kind."""
        self.entries += 1
        self.name = name
        if self.entries > MAX_ENTRIES:
            raise Refused(f"more than {MAX_ENTRIES} entries in the tar stream")

    def charge(self, name: bytes, size: int = 0) -> None:
        """Charges one folder or file named `name` (a component) holding
        `size` bytes, before it is made."""
        self.spent += ENTRY_COST + len(name) + size
        if self.spent > self.limit:
            raise TooLarge(f"{shown(self.name)}: more than {self.limit} bytes in all")


class _Stream:
    """Reads from a pipe, never past `deadline`."""

    def __init__(self, fd: int, deadline: float) -> None:
        self.fd = fd
        self.deadline = deadline
        self.buffer = b""
        self.pos = 0  # what of `buffer` was handed out

    def read(self, n: int) -> bytes:
        """Up to `n` bytes (fewer only at the end of the stream)."""
        while len(self.buffer) - self.pos < n:
            chunk = self._chunk(max(n, 1 << 16))
            if not chunk:
                break
            self.buffer = self.buffer[self.pos :] + chunk
            self.pos = 0
        data = self.buffer[self.pos : self.pos + n]
        self.pos += len(data)
        return data

    def exactly(self, n: int) -> bytes:
        data = self.read(n)
        if len(data) != n:
            raise TarError("the tar stream ends in the middle of an entry")
        return data

    def copy(self, n: int, out: int) -> None:
        """Copy `n` bytes to the descriptor `out`."""
        while n > 0:
            data = self.read(min(n, 1 << 20))
            if not data:
                raise TarError("the tar stream ends in the middle of a file")
            n -= len(data)
            while data:
                data = data[os.write(out, data) :]

    def skip(self, n: int) -> None:
        while n > 0:
            data = self.read(min(n, 1 << 20))
            if not data:
                raise TarError("the tar stream ends in the middle of an entry")
            n -= len(data)

    def _chunk(self, size: int) -> bytes:
        left = self.deadline - time.monotonic()
        ready, _, _ = select.select([self.fd], [], [], max(0.0, left))
        if not ready:
            raise Timeout("the tar stream did not end in time")
        return os.read(self.fd, min(size, 1 << 20))


@dataclass
class Entry:
    name: bytes
    kind: bytes
    mode: int
    size: int


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:
        # GNU base-256, for sizes beyond the octal field.
        if field[0] & 0x40:
            raise TarError("a negative number in a tar header")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarError(f"a bad number in a tar header: {shown(text)}") from None


def _header(block: bytes) -> Entry:
    stored = _number(block[148:156])
    blanked = block[:148] + b" " * 8 + block[156:]
    if stored not in (sum(blanked), sum(b - 256 if b > 127 else b for b in blanked)):
        raise TarError("a tar header with a bad checksum")
    name = block[:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\0":  # POSIX: a prefix may hold the name's start
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return Entry(name, block[156:157], _number(block[100:108]), _number(block[124:136]))


def _padding(size: int) -> int:
    return -size % BLOCK


def _decimal(text: bytes) -> int:
    # Bounded: int() of a long enough string of digits raises, or takes long.
    if not (0 < len(text) <= 20 and text.isdigit()):
        raise TarError("a bad number in a pax header")
    return int(text)


def _pax(data: bytes) -> dict[bytes, bytes]:
    """The records of a pax extended header: `LEN key=value\\n` each."""
    records: dict[bytes, bytes] = {}
    while data:
        length_text, sep, _ = data.partition(b" ")
        length = _decimal(length_text)
        if not sep or not len(length_text) + 1 < length <= len(data):
            raise TarError("a bad pax header")
        record, data = data[:length], data[length:]
        key, sep, value = record[len(length_text) + 1 :].partition(b"=")
        if not sep or not value.endswith(b"\n"):
            raise TarError("a bad pax header")
        records[key] = value[:-1]
    return records


def _next(stream: _Stream) -> Entry | None:
    """The next file entry, its long name or pax records applied; None at the end."""
    long_name: bytes | None = None
    pax: dict[bytes, bytes] = {}
    while True:
        block = stream.read(BLOCK)
        if not block.strip(b"\0"):
            return None  # a zero block (or the end of the stream) ends the archive
        if len(block) != BLOCK:
            raise TarError("the tar stream ends in the middle of a header")
        entry = _header(block)
        if entry.kind in (b"L", b"K", b"x", b"g"):
            limit = MAX_NAME if entry.kind in (b"L", b"K") else MAX_PAX
            if entry.size > limit:
                raise TarError(f"an extended tar header of {entry.size} bytes")
            data = stream.exactly(entry.size + _padding(entry.size))[: entry.size]
            if entry.kind == b"L":
                long_name = data.split(b"\0", 1)[0]
            elif entry.kind == b"x":
                pax = _pax(data)
            continue  # K (a long link name) and g (global records) are not used
        if any(key.startswith(b"GNU.sparse.") for key in pax):
            raise TarError(f"{shown(entry.name)}: a sparse entry")
        if b"path" in pax:
            entry.name = pax[b"path"]
        elif long_name is not None:
            entry.name = long_name
        if b"size" in pax:
            entry.size = _decimal(pax[b"size"])
        return entry


Say = Callable[[str], None]


def extract(fd: int, dest_fd: int, deadline: float, say: Say, limit: int) -> None:
    """Extract the tar stream read from `fd` under the directory `dest_fd`.
    Raises Refused (a TarError for a malformed stream, TooLarge once what it
    makes would cost more than `limit` bytes in all, ENTRY_COST for each
    folder and file besides its bytes) or Timeout; `say` gets a line for
    each entry skipped."""
    stream = _Stream(fd, deadline)
    budget = _Budget(limit)
    skipped = 0
    while (entry := _next(stream)) is not None:
        kind = entry.kind
        if kind not in (*_FILE, _DIR, *_SKIPPED):
            # GNU sparse, multi-volume, incremental entries: not of a `tar -c`.
            raise TarError(f"{shown(entry.name)}: an entry of type {shown(kind)}")
        budget.entry(entry.name)
        if kind in _SKIPPED:
            skipped += 1
            if skipped <= MAX_SKIP_LINES:
                say(f"copyup: not copied ({_SKIPPED[kind]}): {shown(entry.name)}")
            stream.skip(entry.size + _padding(entry.size))
            continue
        parts = split(entry.name)
        if len(parts) > MAX_DEPTH:
            raise Refused(f"{shown(entry.name)}: deeper than {MAX_DEPTH} folders")
        if kind == _DIR:
            if parts:
                # Its owner may always write into it: later entries go there.
                mode = (entry.mode & 0o777) | 0o700
                os.close(open_dir(dest_fd, parts, create=True, mode=mode, on_mkdir=budget.charge))
            stream.skip(entry.size + _padding(entry.size))
        elif not parts:
            raise TarError("a file entry without a name")
        else:
            _write_file(stream, dest_fd, parts, entry, budget)
    if skipped > MAX_SKIP_LINES:
        say(f"copyup: {skipped - MAX_SKIP_LINES} more entries not copied")
    # GNU tar pads the archive to a whole record: read it to the end, so the
    # writer is not killed by a closed pipe, but no more than a record's worth.
    stream.read(BLOCK * 20)
    if stream.read(1):
        raise TarError("data after the end of the tar archive")


def _write_file(
    stream: _Stream, dest_fd: int, parts: list[bytes], entry: Entry, budget: _Budget
) -> None:
    # Folders a file's path names without entries of their own count too.
    parent = open_dir(dest_fd, parts[:-1], create=True, on_mkdir=budget.charge)
    try:
        name = parts[-1]
        # Charged before the file is made (or an old one removed): a sparse
        # file of the testbed comes as all its bytes, which the host would
        # have to store.
        budget.charge(name, entry.size)
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISDIR(st.st_mode):
                raise Refused(f"{shown(b'/'.join(parts))}: a directory on the host")
            # Replaced, not written into: unlinkat removes a symlink itself.
            os.unlink(name, dir_fd=parent)
        # O_EXCL|O_NOFOLLOW: whatever appeared since is not opened; the mode
        # keeps only permission bits, the umask applies.
        out = os.open(name, _NEW_FILE, entry.mode & 0o777, dir_fd=parent)
        try:
            stream.copy(entry.size, out)
        finally:
            os.close(out)
        stream.skip(_padding(entry.size))
    finally:
        os.close(parent)
