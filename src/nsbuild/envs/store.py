"""The unpack-once store: each tarball is unpacked once, keyed by its sha256.

Using an environment costs the same for 1 MB or 1 GB because sessions mount
overlayfs over the unpacked base instead of unpacking again. Hashing a big
tarball on every use would spoil that, so the digest is remembered per
(path, device, inode, size, mtime); a changed file is hashed again.

The tarball is opened once, as a regular file (never a FIFO or a device),
and what is unpacked is read from that same descriptor and hashed as it
streams: a tarball swapped or rewritten after its digest was taken is
refused, never stored under the old digest. What an unpack may write is
bounded (`unpack_limit`), so a small tarball cannot expand to fill the disk.

Locking (fcntl.flock on store/locks/SHA.lock): users hold it shared while
they look up a base and record a session that refers to it; unpacking and
deleting hold it exclusive. So two first uses do not both unpack, and gc
never deletes a base between its lookup and the session record naming it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import re
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from nsbuild.envs.config import EnvConfig
from nsbuild.envs.errors import EnvError, UnsafeTarball
from nsbuild.envs.owner import give_to_sandbox_root, tmp_name
from nsbuild.envs.paths import Layout
from nsbuild.envs.records import read_record, write_record
from nsbuild.envs.remove import read_messages, remove_tree
from nsbuild.envs.tarcheck import TarReport, sanitize
from nsbuild.printable import printable

# What an unpack may write by default: this many times the tarball's size on
# disk, plus SLACK. Compressed Debian bases expand about 4 to 6 times; a
# sparse member or a stream of compressed zeros expands without bound.
EXPANSION = 10
SLACK = 64 << 20
_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Base:
    """An environment's read-only lowest layer: `root` is the directory to mount."""

    root: Path
    digest: str | None  # None for Type: directory (not in the store)


def layout_for(env: EnvConfig) -> Layout:
    return Layout.private(env.unpack) if env.unpack else Layout.default()


_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISSOCK, "a socket"),
)


def _not_regular(st: os.stat_result) -> str | None:
    if stat.S_ISREG(st.st_mode):
        return None
    kind = next((name for test, name in _KINDS if test(st.st_mode)), "of an unknown type")
    return f"not a regular file ({kind})"


@contextlib.contextmanager
def opened_tarball(path: Path) -> Iterator[int]:
    """A read-only descriptor of the tarball at `path`: a regular file the user
    can read (a symlink only to one). Anything else is an EnvError naming the
    path: a FIFO would hang every reader, /dev/zero never ends.

    The type is checked before opening (so a device is never opened) and
    again on the descriptor; O_NONBLOCK keeps a FIFO swapped in between from
    blocking the open."""
    try:
        why = _not_regular(os.stat(path))
        if why is None:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            why = _not_regular(os.fstat(fd))
            if why is not None:
                os.close(fd)
    except OSError as e:
        raise EnvError(f"{path}: cannot use tarball: {e.strerror}") from None
    if why is not None:
        raise EnvError(f"{path}: cannot use tarball: {why}")
    try:
        yield fd
    finally:
        os.close(fd)


def _digest_record(layout: Layout, path: Path) -> Path:
    key = hashlib.sha256(os.fsencode(os.path.realpath(path))).hexdigest()[:32]
    return layout.digests / f"{key}.json"


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _remember(layout: Layout, path: Path, st: os.stat_result, digest: str) -> None:
    layout.digests.mkdir(parents=True, exist_ok=True)
    record = _digest_record(layout, path)
    with contextlib.suppress(OSError):  # not remembered: hashed again next time
        write_record(record, {"path": str(path), "stat": _stat_key(st), "sha256": digest})


def remember_digest(layout: Layout, path: Path, digest: str) -> None:
    """Record `digest` as the sha256 of `path` as it is now (for a file we just wrote)."""
    _remember(layout, path, os.stat(path), digest)


def _hash_fd(fd: int, path: Path) -> str:
    h = hashlib.sha256()
    offset = 0
    try:
        while chunk := os.pread(fd, _CHUNK, offset):
            h.update(chunk)
            offset += len(chunk)
    except OSError as e:
        raise EnvError(f"{path}: cannot read tarball: {e.strerror}") from None
    return h.hexdigest()


def _digest_of(layout: Layout, path: Path, fd: int) -> str:
    """sha256 of the open tarball `fd`, hashed only when the file changed."""
    st = os.fstat(fd)
    record = _digest_record(layout, path)
    # Anything but a record of ours for this file is hashed again and replaced.
    with contextlib.suppress(EnvError, KeyError, TypeError, AttributeError):
        cached = read_record(record)
        if cached.get("stat") == _stat_key(st) and _SHA256.fullmatch(str(cached["sha256"])):
            return str(cached["sha256"])
    digest = _hash_fd(fd, path)
    _remember(layout, path, st, digest)
    return digest


def tarball_digest(layout: Layout, path: Path) -> str:
    """sha256 of the tarball at `path`, hashed only when the file changed."""
    with opened_tarball(path) as fd:
        return _digest_of(layout, path, fd)


def unpack_limit(env: EnvConfig, fd: int) -> int:
    """Bytes an unpack of `env`'s open tarball may write: its `Unpack-Limit:`,
    else EXPANSION times the space the tarball takes on disk, plus SLACK
    (space on disk, not its length: a sparse tarball is small on disk)."""
    if env.unpack_limit is not None:
        return env.unpack_limit
    return EXPANSION * os.fstat(fd).st_blocks * 512 + SLACK


@contextlib.contextmanager
def locked_file(path: Path, mode: int = fcntl.LOCK_EX,
                on_wait: Callable[[], object] | None = None) -> Iterator[int]:
    """flock `path` (made if missing, with its parent) for the block; yields the
    fd. `on_wait` is called once if the lock is held elsewhere, before waiting."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if on_wait is None:
            fcntl.flock(fd, mode)
        else:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                on_wait()
                fcntl.flock(fd, mode)
        yield fd
    finally:
        os.close(fd)


def base_complete(layout: Layout, digest: str) -> bool:
    return (layout.base_dir(digest) / "meta.json").exists()


class _HashingReader(io.RawIOBase):
    """Reads a descriptor from its start, hashing every byte read: the digest
    is of exactly what was read (pread: the file offset is not shared)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.offset = 0
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = os.pread(self.fd, len(buffer), self.offset)
        n = len(data)
        buffer[:n] = data
        self.offset += n
        self.sha256.update(data)
        return n



def _pump(src: IO[bytes], dst: IO[bytes]) -> None:
    """Thread body: copy `src` to `dst` until either ends, then close `dst`."""
    try:
        while chunk := src.read(_CHUNK):
            dst.write(chunk)
    except (BrokenPipeError, ValueError):
        pass  # the reader stopped (done, or failed: the caller says why)
    finally:
        with contextlib.suppress(OSError):
            dst.close()


def _drain(src: IO[bytes]) -> None:
    """Read (and so hash) what the extraction left unread, to the end."""
    while src.read(_CHUNK):
        pass


def _sanitize_stream(raw: _HashingReader, sink: IO[bytes], label: str, limit: int,
                     hint: str) -> TarReport:
    """Check the tarball read through `raw` into `sink`, then read `raw` to its
    end. tarfile reads gz/bz2/xz itself; zstd (mmdebstrap's .tar.zst) needs a
    helper, fed from the same reader so that what it reads is hashed too."""
    src = io.BufferedReader(raw, _CHUNK)
    if src.peek(4)[:4] != b"\x28\xb5\x2f\xfd":
        report = sanitize(src, sink, label, limit, hint)
        _drain(src)
        return report
    unzstd = subprocess.Popen(["zstd", "-dcq"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert unzstd.stdin is not None and unzstd.stdout is not None
    pump = threading.Thread(target=_pump, args=(src, unzstd.stdin))
    pump.start()
    try:
        report = sanitize(unzstd.stdout, sink, label, limit, hint)
    finally:
        # zstd may hold data past the end of the archive: stop it (the pump
        # then stops too), and read the rest of the file here.
        unzstd.kill()
        pump.join()
        unzstd.stdout.close()
        unzstd.wait()
    _drain(src)
    return report


def _feed(raw: _HashingReader, sink: IO[bytes], label: str, limit: int, hint: str,
          result: list[TarReport | BaseException]) -> None:
    """Thread body: read the tarball, write the checked stream to `sink`."""
    try:
        result.append(_sanitize_stream(raw, sink, label, limit, hint))
    except BaseException as e:  # handed to the main thread
        result.append(e)
    finally:
        with contextlib.suppress(OSError):
            sink.close()


def extract(fd: int, label: str, target: Path, limit: int, hint: str = ""
            ) -> tuple[TarReport, str]:
    """Unpack the open tarball `fd` into the empty directory `target`, inside a
    user namespace; return what was unpacked and the sha256 of the bytes read.

    `tar` runs as root of the subuid map (so ownership and modes are kept) in a
    sandbox that can write only to `target`, and reads the checked stream made
    by tarcheck.sanitize, which refuses to pass on more than `limit` bytes.
    Raises UnsafeTarball or EnvError; the caller removes `target` then."""
    from nsbuild.sandbox import PIPE, Bind, Sandbox, Tmpfs, caller_idmap, host_view, spawn

    spec = Sandbox(
        argv=(
            "tar", "--extract", "--file=-", "--directory=/target",
            "--numeric-owner", "--same-owner", "--same-permissions",
            # Only file capabilities: user.overlay.* in a lower would steer overlayfs.
            "--xattrs", "--xattrs-include=security.capability",
        ),
        idmap=caller_idmap(),
        root=Tmpfs("/"),
        # Under the private store: setuid files of the base are kept.
        mounts=(*host_view(), Bind(str(target), "/target", private=True)),
    )  # fmt: skip
    proc = spawn(spec, stdin=PIPE, stderr=PIPE)
    assert proc.stdin is not None and proc.stderr is not None
    result: list[TarReport | BaseException] = []
    raw = _HashingReader(fd)
    feeder = threading.Thread(target=_feed, args=(raw, proc.stdin, label, limit, hint, result))
    feeder.start()
    # tar's messages name members: bounded and escaped before they are shown.
    err = read_messages(proc.stderr)
    status = proc.wait()
    feeder.join()
    outcome = result[0] if result else EnvError(f"{label}: extraction thread failed")
    if isinstance(outcome, UnsafeTarball | EnvError):
        raise outcome
    if isinstance(outcome, BaseException) and not isinstance(outcome, BrokenPipeError):
        raise EnvError(f"{label}: cannot read: {outcome}") from outcome
    if status != 0 or not isinstance(outcome, TarReport):
        raise EnvError(f"{label}: unpacking into {target} failed: {_tar_error(err, status)}")
    return outcome, raw.sha256.hexdigest()


def _tar_error(err: str, status: int) -> str:
    """The line of tar's stderr that says what went wrong (its last one only says
    that something did)."""
    lines = [ln for ln in err.splitlines() if ln and "Exiting with failure status" not in ln]
    if any("No space left on device" in ln for ln in lines):
        return "the cache filesystem is full (No space left on device)"
    return printable(lines[0], 300) if lines else f"tar exit status {status}"


def _unpack(layout: Layout, env: EnvConfig, fd: int, digest: str) -> None:
    assert env.path is not None
    layout.bases.mkdir(parents=True, exist_ok=True)
    tmp = layout.bases / tmp_name()
    (tmp / "root").mkdir(parents=True)
    give_to_sandbox_root(tmp / "root")
    limit = unpack_limit(env, fd)
    hint = f" (if the tarball is genuine, raise Unpack-Limit: in {env.source or 'its config'})"
    try:
        start = time.monotonic()
        report, read = extract(fd, str(env.path), tmp / "root", limit, hint)
        if read != digest:
            # The file changed since it was hashed: what was unpacked is not
            # what the store entry would be named after.
            raise EnvError(f"{env.path}: changed while it was being unpacked; try again")
        meta = {
            "tarball": str(env.path),
            "sha256": digest,
            "members": report.members,
            "bytes": report.bytes,
            "skipped_devices": report.skipped_devices,
            "unpacked": int(time.time()),
            "seconds": round(time.monotonic() - start, 3),
        }
        write_record(tmp / "meta.json", meta)
        os.rename(tmp, layout.base_dir(digest))
    except BaseException:
        remove_tree(tmp)
        raise


@contextlib.contextmanager
def use_base(env: EnvConfig, quiet: bool = False) -> Iterator[Base]:
    """The base of `env`, unpacked if needed; it cannot be deleted while the block runs.

    Record anything that refers to the base (a session) inside the block."""
    if env.type == "directory":
        assert env.path is not None
        if not env.path.is_dir():
            raise EnvError(
                f"{env.source}: Path {env.path} of environment {env.name!r} is not a directory"
            )
        yield Base(env.path, None)
        return
    if env.type != "tarball" or env.path is None:
        raise EnvError(f"environment {env.name!r} of Type {env.type} has no base layer")
    layout = layout_for(env)
    with contextlib.ExitStack() as held:
        # One descriptor is hashed and, if needed, unpacked.
        with opened_tarball(env.path) as tarball:
            digest = _digest_of(layout, env.path, tarball)
            fd = held.enter_context(locked_file(layout.base_lock(digest), fcntl.LOCK_SH))
            if not base_complete(layout, digest):
                # Converting to exclusive waits for other users and unpackers; then
                # look again: someone else may have unpacked it meanwhile.
                fcntl.flock(fd, fcntl.LOCK_EX)
                if not base_complete(layout, digest):
                    if not quiet:
                        print(f"nsbuild: unpacking {env.path} for {env.name!r} (once)...",
                              file=sys.stderr, flush=True)  # fmt: skip
                    _unpack(layout, env, tarball, digest)
                fcntl.flock(fd, fcntl.LOCK_SH)
        yield Base(layout.base_dir(digest) / "root", digest)


def try_lock_for_delete(layout: Layout, digest: str) -> contextlib.AbstractContextManager[int]:
    """Exclusive, non-blocking: raises BlockingIOError while the base is in use."""
    return locked_file(layout.base_lock(digest), fcntl.LOCK_EX | fcntl.LOCK_NB)


def copy_tarball_atomically(
    src: IO[bytes], target: Path, check: Callable[[], int] | None = None
) -> str:
    """Write the stream `src` to `target` (atomically replacing it); return its sha256.

    `check`, called after the stream ends, returns the writer's exit status:
    anything but 0 leaves `target` untouched."""
    tmp = target.with_name(f"{tmp_name()}.tar")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        status = check() if check else 0
        if status != 0:
            raise EnvError(f"{target}: writing the new tarball failed (status {status})")
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return h.hexdigest()
