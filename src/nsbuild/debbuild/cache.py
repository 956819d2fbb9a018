"""The dependency-layer cache: installed build dependencies, kept for reuse.

After build dependencies are installed, what changed in the session (its
overlay upper directory) is kept as a layer. A later build that resolves to the
very same packages on the very same environment mounts that layer below its
session and skips installation.

    $XDG_CACHE_HOME/nsbuild/deps/
        KEY/layer/          the kept upper directory (owned by the sandbox's ids)
        KEY/layer.json      what it holds: environment, base id, arch, packages
        KEY.lock            flock: shared while a build uses it, exclusive to delete
        .tmp-PID-START-RAND/   a layer being stored (renamed to KEY when complete)

KEY is the sha256 of the environment's base id, the architecture, the exact
resolved package set (name, version, architecture of every package apt chose
to install or remove) and the checksums of any extra packages given. A changed
base (the environment was updated) gives a different key, so old layers are
never used against a new base; `nsbuild gc` trims the unused ones (gc.py).

Every path into the cache goes through `private_cache_dir()`: the layers hold
setuid programs and the trees of builds. The records (layer.json, answers)
sit beside trees a sandbox shaped and are read with `nsbuild.envs.records`:
regular files of bounded size, no link followed, never a FIFO to hang on.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from nsbuild.envs.owner import TMP_PREFIX
from nsbuild.sandbox.syscalls import syncfs

# Remembered resolutions: one file per question, holding a layer key.
ANSWERS = "answers"
# An answer holds one key; a layer's record, its package list.
MAX_ANSWER = 4096
MAX_LAYER_RECORD = 4 << 20


class BadLayerRecord(Exception):
    """A layer.json that is not a record nsbuild wrote."""


def is_key(value: object) -> bool:
    hexdigits = "0123456789abcdef"
    return isinstance(value, str) and len(value) == 64 and all(c in hexdigits for c in value)


def read_layer_record(path: Path) -> dict[str, object]:
    """A layer's metadata: a JSON object in a regular file (raises BadLayerRecord, one line)."""
    from nsbuild.envs.errors import EnvError
    from nsbuild.envs.records import read_record

    try:
        meta = read_record(path, MAX_LAYER_RECORD)
    except EnvError as e:
        raise BadLayerRecord(str(e)) from None
    if not isinstance(meta, dict):
        raise BadLayerRecord(f"{path}: not a JSON object")
    return meta


def layer_key(
    base_id: str, arch: str, resolution: Sequence[str], extras: Sequence[str] = ()
) -> str:
    h = hashlib.sha256()
    for part in ("nsbuild-deps-v1", base_id, arch, *sorted(resolution), "--", *sorted(extras)):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


def answer_key(
    base_id: str, arch: str, question: Sequence[str], extras: Sequence[str], lists: str
) -> str:
    """What a dependency question asked of apt hinges on: the environment, the
    exact command (dependencies, conflicts), extra packages, and the state
    of apt's package lists. The same key means the same resolution."""
    h = hashlib.sha256()
    for part in ("nsbuild-answer-v1", base_id, arch, *question, "--", *sorted(extras), lists):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


@dataclass(frozen=True)
class Layer:
    key: str
    path: Path  # the directory to mount as a lower


class DepCache:
    def __init__(self, root: Path | None = None) -> None:
        from nsbuild.envs.paths import deps_root

        self.root = root or deps_root()

    def lock_path(self, key: str) -> Path:
        return self.root / f"{key}.lock"

    @contextmanager
    def use(self, key: str) -> Iterator[Layer | None]:
        """The layer for `key` if one is complete, held (shared lock) until exit
        so that gc cannot remove it from under a running build."""
        entry = self.root / key
        if not _complete(entry):
            yield None
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with _locked(self.lock_path(key), fcntl.LOCK_SH):
            # gc may have removed it between the check and the lock.
            if not _complete(entry):
                yield None
                return
            # Last use, for gc; a link swapped in since keeps its target's time.
            os.utime(entry / "layer.json", follow_symlinks=False)
            yield Layer(key, entry / "layer")

    def recall(self, question: str) -> str | None:
        """The layer key an earlier build resolved `question` to, if any."""
        from nsbuild.envs.errors import EnvError
        from nsbuild.envs.records import read_record

        try:
            key = read_record(self.root / ANSWERS / question, MAX_ANSWER)
        except EnvError:
            return None
        return key if is_key(key) else None

    def remember(self, question: str, key: str) -> None:
        """Note that `question` resolved to layer `key` (whole file or nothing)."""
        from nsbuild.envs.records import write_record

        answers = self.root / ANSWERS
        answers.mkdir(parents=True, exist_ok=True)
        write_record(answers / question, key)

    def staging(self) -> Path:
        """A fresh directory to store a new layer in; commit() it or let gc take it
        (its name says which process made it, so gc knows when that one is gone)."""
        from nsbuild.envs.owner import give_to_sandbox_root, tmp_name

        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / tmp_name()
        tmp.mkdir(mode=0o700)
        # The layer below is mounted from inside the sandbox, whose ids must
        # reach it (run by root, they are its subordinate range, not root).
        give_to_sandbox_root(tmp)
        return tmp

    def commit(self, staging: Path, key: str, meta: dict[str, object]) -> Layer | None:
        """Publish `staging` (holding `layer/`) as KEY. Returns None when another
        build published the same key first (the staging dir is then left for
        the caller to remove).

        The layer's files must already be on disk (`Syncer`): a published
        layer is trusted as complete by every later build, and the session
        that wrote it had fsync turned off. Its record and the rename are
        made durable here."""
        from nsbuild.envs.records import write_record

        meta = {**meta, "key": key, "created": int(time.time())}
        record = staging / "layer.json"
        write_record(record, meta)
        _fsync(record, os.O_NOFOLLOW)
        try:
            os.rename(staging, self.root / key)
        except OSError:
            return None
        _fsync(self.root, os.O_DIRECTORY)
        return Layer(key, self.root / key / "layer")

    def discard(self, path: Path) -> None:
        """Remove a staging dir or a layer: its files belong to the sandbox's ids."""
        from nsbuild.envs.remove import remove_tree

        remove_tree(path)

    def entries(self) -> list[tuple[str, dict[str, object], float]]:
        """(key, metadata, last use time) of every complete layer."""
        out: list[tuple[str, dict[str, object], float]] = []
        if not self.root.is_dir():
            return out
        for d in self.root.iterdir():
            meta_path = d / "layer.json"
            if d.name.startswith(TMP_PREFIX) or not is_key(d.name):
                continue
            try:
                meta = read_layer_record(meta_path)
                used = os.stat(meta_path, follow_symlinks=False).st_mtime
            except (BadLayerRecord, OSError):
                continue
            out.append((d.name, meta, used))
        return out


def _complete(entry: Path) -> bool:
    """Whether the layer directory `entry` holds a readable record (a published layer)."""
    try:
        read_layer_record(entry / "layer.json")
    except BadLayerRecord:
        return False
    return True


class Syncer:
    """Writes a filesystem's dirty data to disk in a background thread
    (syncfs(2)), so that a layer written by a volatile session is safe to
    publish by the time the build that made it ends; `wait()` returns the
    seconds it took, or raises the error it met."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._error: OSError | None = None
        self._took = 0.0
        self._thread = threading.Thread(target=self._sync, name="nsbuild-syncfs", daemon=True)
        self._thread.start()

    def _sync(self) -> None:
        start = time.monotonic()
        try:
            syncfs(self._fd)
        except OSError as e:
            self._error = e
        finally:
            self._took = time.monotonic() - start
            os.close(self._fd)

    def wait(self) -> float:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._took


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, os.O_RDONLY | flags | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _locked(path: Path, mode: int) -> Iterator[int]:
    """flock `path`, making sure the lock taken is on the file that is there now:
    gc unlinks the lock file of a layer it removes, and a lock on an unlinked
    file would exclude nobody."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, mode)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    try:
        yield fd
    finally:
        os.close(fd)
