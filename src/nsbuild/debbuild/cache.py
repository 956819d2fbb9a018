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
never used against a new base; `nsbuild gc` trims the unused ones (`gc()`
below), and with them the build apt caches of environments that are gone.

Every path into the cache goes through `private_cache_dir()`: the layers hold
setuid programs and the trees of builds. The records (layer.json, answers)
sit beside trees a sandbox shaped and are read with `nsbuild.envs.records`:
regular files of bounded size, no link followed, never a FIFO to hang on.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nsbuild.sandbox.syscalls import syncfs

if TYPE_CHECKING:
    from nsbuild.envs.config import Config

TMP_PREFIX = ".tmp-"
# Remembered resolutions: one file per question, holding a layer key.
ANSWERS = "answers"
# An answer holds one key; a layer's record, its package list.
MAX_ANSWER = 4096
MAX_LAYER_RECORD = 4 << 20


class BadLayerRecord(Exception):
    """A layer.json that is not a record nsbuild wrote."""


def _is_key(value: object) -> bool:
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


def cache_root() -> Path:
    from nsbuild.envs.paths import private_cache_dir

    return private_cache_dir() / "deps"


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
        self.root = root or cache_root()

    def _lock_path(self, key: str) -> Path:
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
        with _locked(self._lock_path(key), fcntl.LOCK_SH):
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
        return key if _is_key(key) else None

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
        _fsync_file(record)
        try:
            os.rename(staging, self.root / key)
        except OSError:
            return None
        _fsync_dir(self.root)
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
            if d.name.startswith(TMP_PREFIX) or not _is_key(d.name):
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


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
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


# -- garbage collection -----------------------------------------------------------

DEFAULT_MAX_AGE_DAYS = 30.0


def gc(
    *,
    dry_run: bool = False,
    max_age_days: float = DEFAULT_MAX_AGE_DAYS,
    errors: list[str] | None = None,
) -> list[str]:
    """Remove dependency layers whose base no configured environment has any more
    (the environment was updated or removed) or unused for `max_age_days`,
    layers half-stored by builds that are gone, the build apt caches of
    environments no longer configured, cached .debs unused for `max_age_days`
    and the kept logs of failed builds older than that. Layers in use by a
    running build are kept.

    Returns one line per removal ("dependency layer 3f2a... (...)"); problems
    are appended to `errors` (or ignored when it is None)."""
    from nsbuild.envs.config import load_config

    errs: list[str] = errors if errors is not None else []
    config = load_config()
    bases, untold = _current_bases(config, errs)
    removed = _gc_layers(DepCache(), bases, untold, max_age_days, dry_run, errs)
    removed += _gc_apt_caches({env.name for env in config}, max_age_days, dry_run, errs)
    removed += _gc_logs(max_age_days, dry_run, errs)
    removed += _gc_work_dirs(dry_run, errs)
    return removed


def builds_root() -> Path:
    """Where running builds keep their private work directories."""
    from nsbuild.envs.paths import private_cache_dir

    return private_cache_dir() / "builds"


def _gc_work_dirs(dry_run: bool, errs: list[str]) -> list[str]:
    """Work directories of builds whose process is gone (killed, crashed)."""
    from nsbuild.envs.owner import tmp_owner
    from nsbuild.envs.remove import remove_tree

    root = builds_root()
    removed = []
    for entry in sorted(os.listdir(root)) if root.is_dir() else []:
        owner = tmp_owner(entry)
        if owner is None or owner.alive():
            continue
        # One that cannot go (a mount point inside, an rm that failed) is
        # said, and the next one is tried: any error, as a build shaped it.
        try:
            if not dry_run:
                remove_tree(root / entry)
            removed.append(f"work directory of a dead build {root / entry}")
        except Exception as e:
            errs.append(_error_line(root / entry, e))
    return removed


def _error_line(path: Path, e: Exception) -> str:
    """One line for an error met at `path`; it may quote names a build made."""
    from nsbuild.printable import printable

    what = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
    text = what if what.startswith(str(path)) else f"{path}: {what}"
    return printable(text, 1024)


def _gc_logs(max_age_days: float, dry_run: bool, errs: list[str]) -> list[str]:
    """The kept logs of builds that did not succeed, once older than the limit."""
    from nsbuild.debbuild.log import logs_root

    root = logs_root()
    if not root.is_dir():
        return []
    limit = time.time() - max_age_days * 86400
    old = [d for d in sorted(root.iterdir())
           if d.is_dir() and not d.is_symlink() and d.stat().st_mtime < limit]  # fmt: skip
    if not dry_run:
        for d in old:
            try:
                shutil.rmtree(d)
            except Exception as e:
                errs.append(_error_line(d, e))
    if not old:
        return []
    return [
        f"{len(old)} logs of failed builds older than {max_age_days:.0f} days"
        + (" (dry run)" if dry_run else "")
    ]


def _current_bases(config: Config, errs: list[str]) -> tuple[set[str], set[str]]:
    """Base ids of the configured tarball environments, and the names of
    those whose base cannot be told (one line each): their layers are not
    removed for their base, as it may be theirs."""
    from nsbuild.envs.store import layout_for, tarball_digest
    from nsbuild.printable import printable

    bases: set[str] = set()
    untold: set[str] = set()
    for env in config:
        if env.type != "tarball" or env.path is None or not os.path.lexists(env.path):
            continue
        try:
            bases.add(tarball_digest(layout_for(env), env.path))
        except Exception as e:
            untold.add(env.name)
            errs.append(f"dependency layers: environment {env.name!r}: "
                        f"{printable(str(e), 1024)}; its layers kept")  # fmt: skip
    return bases, untold


def _gc_layers(
    cache: DepCache,
    bases: set[str],
    untold: set[str],
    max_age_days: float,
    dry_run: bool,
    errs: list[str],
) -> list[str]:
    """Remove stale layers (see gc()); `untold` names environments whose base
    is unknown: their layers are not removed for their base."""
    removed: list[str] = []
    if not cache.root.is_dir():
        return removed
    for entry in sorted(cache.root.iterdir()):
        # Each entry on its own: one that fails is said, the next is tried.
        try:
            _gc_entry(cache, entry, bases, untold, max_age_days, dry_run, removed, errs)
        except Exception as e:
            errs.append(_error_line(entry, e))
    if not dry_run:
        _gc_answers(cache)
    return removed


def _gc_entry(
    cache: DepCache,
    entry: Path,
    bases: set[str],
    untold: set[str],
    max_age_days: float,
    dry_run: bool,
    removed: list[str],
    errs: list[str],
) -> None:
    from nsbuild.envs.owner import tmp_name, tmp_owner
    from nsbuild.printable import printable

    name = entry.name
    if name.startswith(TMP_PREFIX):
        owner = tmp_owner(name)
        if owner is not None and not owner.alive():
            _discard(cache, entry, f"unfinished dependency layer {entry}", removed, errs, dry_run)
        return
    if name.endswith(".lock"):
        if not (cache.root / name[: -len(".lock")]).exists():
            _drop_lock(entry, dry_run)
        return
    meta_path = entry / "layer.json"
    if not _is_key(name) or not os.path.lexists(meta_path):
        return
    try:
        meta = read_layer_record(meta_path)
    except BadLayerRecord as e:
        errs.append(f"dependency layer {name[:16]}: {printable(str(e), 1024)}; kept")
        return
    last_use = os.stat(meta_path, follow_symlinks=False).st_mtime
    environment = meta.get("environment")
    why = None
    if meta.get("base") not in bases and environment not in untold:
        why = "its environment's base changed or is gone"
    elif time.time() - last_use > max_age_days * 86400:
        why = f"unused for {(time.time() - last_use) / 86400:.0f} days"
    if why is None:
        return
    shown = printable(environment, 100) if isinstance(environment, str) else "?"
    what = f"dependency layer {name[:16]} ({shown}: {why})"
    if dry_run:
        removed.append(what + " (dry run)")
        return
    try:
        with _try_exclusive(cache._lock_path(name)):
            doomed = cache.root / tmp_name()
            os.rename(entry, doomed)
            cache._lock_path(name).unlink()
    except BlockingIOError:
        return  # a build is using it
    except OSError as e:
        errs.append(f"{entry}: cannot remove: {e.strerror}")
        return
    _discard(cache, doomed, what, removed, errs, dry_run=False)


def _gc_answers(cache: DepCache) -> None:
    """Remembered resolutions whose layer is gone (or half-written by a dead build)."""
    from nsbuild.envs.owner import tmp_owner

    answers = cache.root / ANSWERS
    for entry in sorted(answers.iterdir()) if answers.is_dir() else []:
        owner = tmp_owner(entry.name)
        if owner is not None:
            stale = not owner.alive()
        else:
            key = cache.recall(entry.name)
            stale = key is None or not (cache.root / key / "layer.json").is_file()
        if stale:  # a FIFO or a link is no answer either
            with contextlib.suppress(OSError):
                entry.unlink()


@contextmanager
def _try_exclusive(path: Path) -> Iterator[None]:
    """Exclusive lock without waiting: BlockingIOError while a build holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def _drop_lock(path: Path, dry_run: bool) -> None:
    """A lock file whose layer is gone: removed quietly if nobody holds it."""
    if dry_run:
        return
    try:
        with _try_exclusive(path):
            if not path.with_suffix("").exists():
                path.unlink()
    except OSError:
        pass


def _discard(
    cache: DepCache, path: Path, what: str, removed: list[str], errs: list[str], dry_run: bool
) -> None:
    if dry_run:
        removed.append(f"{what} (dry run)")
        return
    try:
        cache.discard(path)
        removed.append(what)
    except Exception as e:
        errs.append(_error_line(path, e))


def apt_cache_root() -> Path:
    """Where the local backend keeps each environment's apt lists and archives."""
    from nsbuild.envs.paths import private_cache_dir

    return private_cache_dir() / "apt"


def apt_cache_dir(env_name: str) -> Path:
    """One environment's apt caches: `apt-lists/`, `apt-archives/` and `.lock`,
    held exclusively by whoever writes them or mounts them as an overlay's
    lower (shared by the virt server while it takes a snapshot of them). No
    sandbox writes them: nsbuild copies in what apt downloaded, once checked
    (the local backend's take_downloads, the virt server's harvest)."""
    return apt_cache_root() / env_name


def _gc_apt_caches(
    configured: set[str], max_age_days: float, dry_run: bool, errs: list[str]
) -> list[str]:
    from nsbuild.envs.remove import remove_tree

    removed: list[str] = []
    root = apt_cache_root()
    if not root.is_dir():
        return removed
    suffix = " (dry run)" if dry_run else ""
    limit = time.time() - max_age_days * 86400
    for env_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        try:
            # The local backend holds this lock while apt runs with these caches.
            with _try_exclusive(env_dir / ".lock"):
                if env_dir.name not in configured:
                    what = f"build apt cache of {env_dir.name!r} (no such environment)"
                    if not dry_run:
                        remove_tree(env_dir)
                    removed.append(what + suffix)
                    continue
                old = [
                    deb
                    for deb in (env_dir / "apt-archives").glob("*.deb")
                    if max(deb.lstat().st_atime, deb.lstat().st_mtime) < limit
                ]
                if not dry_run:
                    for deb in old:
                        deb.unlink()
                if old:
                    removed.append(
                        f"{len(old)} cached .deb files of {env_dir.name!r} "
                        f"unused for {max_age_days:.0f} days{suffix}"
                    )
        except BlockingIOError:
            continue  # a build is installing with it right now
        except Exception as e:  # one environment's caches; the next is tried
            errs.append(_error_line(env_dir, e))
    return removed
