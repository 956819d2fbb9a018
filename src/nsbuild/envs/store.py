"""The unpack-once store: each tarball is unpacked once, keyed by its sha256.

Using an environment costs the same for 1 MB or 1 GB because sessions mount
overlayfs over the unpacked base instead of unpacking again. Hashing a big
tarball on every use would spoil that, so the digest is remembered per
(path, device, inode, size, mtime); a changed file is hashed again.

Locking (fcntl.flock on store/locks/SHA.lock): users hold it shared while
they look up a base and record a session that refers to it; unpacking and
deleting hold it exclusive. So two first uses do not both unpack, and gc
never deletes a base between its lookup and the session record naming it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
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
from nsbuild.envs.remove import remove_tree
from nsbuild.envs.tarcheck import TarReport, sanitize


@dataclass(frozen=True)
class Base:
    """An environment's read-only lowest layer: `root` is the directory to mount."""

    root: Path
    digest: str | None  # None for Type: directory (not in the store)


def layout_for(env: EnvConfig) -> Layout:
    return Layout(env.unpack) if env.unpack else Layout.default()


def _digest_record(layout: Layout, path: Path) -> Path:
    key = hashlib.sha256(os.fsencode(os.path.realpath(path))).hexdigest()[:32]
    return layout.digests / f"{key}.json"


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def remember_digest(layout: Layout, path: Path, digest: str) -> None:
    """Record `digest` as the sha256 of `path` as it is now (for a file we just wrote)."""
    layout.digests.mkdir(parents=True, exist_ok=True)
    record = _digest_record(layout, path)
    tmp = record.with_name(f"{tmp_name()}.json")
    tmp.write_text(
        json.dumps({"path": str(path), "stat": _stat_key(os.stat(path)), "sha256": digest})
    )
    os.replace(tmp, record)


def tarball_digest(layout: Layout, path: Path) -> str:
    """sha256 of the tarball at `path`, hashed only when the file changed."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise EnvError(f"{path}: cannot use tarball: {e.strerror}") from e
    record = _digest_record(layout, path)
    try:
        cached = json.loads(record.read_text())
        if cached.get("stat") == _stat_key(st):
            return str(cached["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    remember_digest(layout, path, digest)
    return digest


@contextlib.contextmanager
def locked_file(path: Path, mode: int = fcntl.LOCK_EX,
                on_wait: Callable[[], object] | None = None) -> Iterator[int]:
    """flock `path` (made if missing, with its parent) for the block; yields the
    fd. `on_wait` is called once if the lock is held elsewhere, before waiting."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
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


def _decompressor(path: Path) -> list[str] | None:
    """tarfile reads gz/bz2/xz itself; zstd (mmdebstrap's .tar.zst) needs a helper."""
    with open(path, "rb") as f:
        magic = f.read(4)
    return ["zstd", "-dcq", "--", str(path)] if magic == b"\x28\xb5\x2f\xfd" else None


def _feed(path: Path, sink: IO[bytes], label: str, result: list[TarReport | BaseException]) -> None:
    """Thread body: read the tarball, write the checked stream to `sink`."""
    try:
        cmd = _decompressor(path)
        if cmd:
            unzstd = subprocess.Popen(cmd, stdout=subprocess.PIPE)
            assert unzstd.stdout is not None
            try:
                result.append(sanitize(unzstd.stdout, sink, label))
            finally:
                unzstd.kill()
                unzstd.wait()
        else:
            with open(path, "rb") as f:
                result.append(sanitize(f, sink, label))
    except BaseException as e:  # handed to the main thread
        result.append(e)
    finally:
        with contextlib.suppress(OSError):
            sink.close()


def extract(tarball: Path, target: Path) -> TarReport:
    """Unpack `tarball` into the empty directory `target`, inside a user namespace.

    `tar` runs as root of the subuid map (so ownership and modes are kept) in a
    sandbox that can write only to `target`, and reads the checked stream made
    by tarcheck.sanitize. Raises UnsafeTarball or EnvError; the caller removes
    `target` then."""
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
        mounts=(*host_view(), Bind(str(target), "/target")),
    )  # fmt: skip
    proc = spawn(spec, stdin=PIPE, stderr=PIPE)
    assert proc.stdin is not None and proc.stderr is not None
    result: list[TarReport | BaseException] = []
    feeder = threading.Thread(target=_feed, args=(tarball, proc.stdin, str(tarball), result))
    feeder.start()
    err = proc.stderr.read().decode(errors="replace").strip()
    proc.stderr.close()
    status = proc.wait()
    feeder.join()
    outcome = result[0] if result else EnvError(f"{tarball}: extraction thread failed")
    if isinstance(outcome, UnsafeTarball | EnvError):
        raise outcome
    if isinstance(outcome, BaseException) and not isinstance(outcome, BrokenPipeError):
        raise EnvError(f"{tarball}: cannot read: {outcome}") from outcome
    if status != 0 or not isinstance(outcome, TarReport):
        raise EnvError(f"{tarball}: unpacking into {target} failed: {_tar_error(err, status)}")
    return outcome


def _tar_error(err: str, status: int) -> str:
    """The line of tar's stderr that says what went wrong (its last one only says
    that something did)."""
    lines = [ln for ln in err.splitlines() if ln and "Exiting with failure status" not in ln]
    if any("No space left on device" in ln for ln in lines):
        return "the cache filesystem is full (No space left on device)"
    return lines[0] if lines else f"tar exit status {status}"


def _unpack(layout: Layout, tarball: Path, digest: str) -> None:
    layout.bases.mkdir(parents=True, exist_ok=True)
    tmp = layout.bases / tmp_name()
    (tmp / "root").mkdir(parents=True)
    give_to_sandbox_root(tmp / "root")
    try:
        start = time.monotonic()
        report = extract(tarball, tmp / "root")
        meta = {
            "tarball": str(tarball),
            "sha256": digest,
            "members": report.members,
            "bytes": report.bytes,
            "skipped_devices": report.skipped_devices,
            "unpacked": int(time.time()),
            "seconds": round(time.monotonic() - start, 3),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
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
    digest = tarball_digest(layout, env.path)
    with locked_file(layout.base_lock(digest), fcntl.LOCK_SH) as fd:
        if not base_complete(layout, digest):
            # Converting to exclusive waits for other users and unpackers; then
            # look again: someone else may have unpacked it meanwhile.
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not base_complete(layout, digest):
                if not quiet:
                    print(f"nsbuild: unpacking {env.path} for {env.name!r} (once)...",
                          file=sys.stderr, flush=True)  # fmt: skip
                _unpack(layout, env.path, digest)
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


def disk_usage(path: Path) -> int:
    """Bytes allocated under `path`, each inode counted once, mounts not crossed."""
    total = 0
    seen: set[tuple[int, int]] = set()
    try:
        dev = os.lstat(path).st_dev
    except OSError:
        return 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if st.st_dev != dev:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
        # Do not descend into other filesystems or unreadable dirs.
        dirnames[:] = [d for d in dirnames if os.lstat(os.path.join(dirpath, d)).st_dev == dev]
    return total + os.lstat(path).st_blocks * 512
