"""`nsbuild gc` for what builds leave: dependency layers whose base is gone
or that went unused, layers half-stored by builds that are gone, the build
apt caches of environments no longer configured and their old .debs, the kept
logs of failed builds, and the work directories of dead builds.

It sits above the store it sweeps (cache.py) and reads the environments'
configuration to tell which bases are current.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from nsbuild.debbuild.cache import (
    ANSWERS,
    BadLayerRecord,
    DepCache,
    is_key,
    read_layer_record,
)
from nsbuild.debbuild.log import logs_root
from nsbuild.envs.config import Config, load_config
from nsbuild.envs.owner import TMP_PREFIX, tmp_name, tmp_owner
from nsbuild.envs.paths import apt_cache_root, builds_root
from nsbuild.envs.remove import remove_tree
from nsbuild.envs.store import layout_for, tarball_digest
from nsbuild.printable import printable

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

    Returns one line per removal ("dependency layer 3f2a... (...)"), or per
    removal it would make when `dry_run`; problems are appended to `errors`
    (or ignored when it is None)."""
    errs: list[str] = errors if errors is not None else []
    config = load_config()
    bases, untold = _current_bases(config, errs)
    removed = _LayerSweep(DepCache(), bases, untold, max_age_days, dry_run, errs).run()
    removed += _gc_apt_caches({env.name for env in config}, max_age_days, dry_run, errs)
    removed += _gc_logs(max_age_days, dry_run, errs)
    removed += _gc_work_dirs(dry_run, errs)
    return removed


def _gc_work_dirs(dry_run: bool, errs: list[str]) -> list[str]:
    """Work directories of builds whose process is gone (killed, crashed)."""
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
    what = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
    text = what if what.startswith(str(path)) else f"{path}: {what}"
    return printable(text, 1024)


def _gc_logs(max_age_days: float, dry_run: bool, errs: list[str]) -> list[str]:
    """The kept logs of builds that did not succeed, once older than the limit."""
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
    return [f"{len(old)} logs of failed builds older than {max_age_days:.0f} days"]


def _current_bases(config: Config, errs: list[str]) -> tuple[set[str], set[str]]:
    """Base ids of the configured tarball environments, and the names of
    those whose base cannot be told (one line each): their layers are not
    removed for their base, as it may be theirs."""
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


@dataclass
class _LayerSweep:
    """One pass over the dependency layers (see gc())."""

    cache: DepCache
    bases: set[str]
    untold: set[str]  # environments whose base is unknown: their layers stay for it
    max_age_days: float
    dry_run: bool
    errs: list[str]
    removed: list[str] = field(default_factory=list)

    def run(self) -> list[str]:
        if not self.cache.root.is_dir():
            return self.removed
        for entry in sorted(self.cache.root.iterdir()):
            # Each entry on its own: one that fails is said, the next is tried.
            try:
                self._entry(entry)
            except Exception as e:
                self.errs.append(_error_line(entry, e))
        if not self.dry_run:
            _gc_answers(self.cache)
        return self.removed

    def _entry(self, entry: Path) -> None:
        cache, name = self.cache, entry.name
        if name.startswith(TMP_PREFIX):
            owner = tmp_owner(name)
            if owner is not None and not owner.alive():
                self._discard(entry, f"unfinished dependency layer {entry}")
            return
        if name.endswith(".lock"):
            if not (cache.root / name[: -len(".lock")]).exists():
                _drop_lock(entry, self.dry_run)
            return
        meta_path = entry / "layer.json"
        if not is_key(name) or not os.path.lexists(meta_path):
            return
        try:
            meta = read_layer_record(meta_path)
        except BadLayerRecord as e:
            self.errs.append(f"dependency layer {name[:16]}: {printable(str(e), 1024)}; kept")
            return
        last_use = os.stat(meta_path, follow_symlinks=False).st_mtime
        environment = meta.get("environment")
        why = None
        if meta.get("base") not in self.bases and environment not in self.untold:
            why = "its environment's base changed or is gone"
        elif time.time() - last_use > self.max_age_days * 86400:
            why = f"unused for {(time.time() - last_use) / 86400:.0f} days"
        if why is None:
            return
        shown = printable(environment, 100) if isinstance(environment, str) else "?"
        what = f"dependency layer {name[:16]} ({shown}: {why})"
        if self.dry_run:
            self.removed.append(what)
            return
        try:
            with _try_exclusive(cache.lock_path(name)):
                doomed = cache.root / tmp_name()
                os.rename(entry, doomed)
                cache.lock_path(name).unlink()
        except BlockingIOError:
            return  # a build is using it
        except OSError as e:
            self.errs.append(f"{entry}: cannot remove: {e.strerror}")
            return
        self._discard(doomed, what)

    def _discard(self, path: Path, what: str) -> None:
        if self.dry_run:
            self.removed.append(what)
            return
        try:
            self.cache.discard(path)
            self.removed.append(what)
        except Exception as e:
            self.errs.append(_error_line(path, e))


def _gc_answers(cache: DepCache) -> None:
    """Remembered resolutions whose layer is gone (or half-written by a dead build)."""
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


def _gc_apt_caches(
    configured: set[str], max_age_days: float, dry_run: bool, errs: list[str]
) -> list[str]:
    removed: list[str] = []
    root = apt_cache_root()
    if not root.is_dir():
        return removed
    limit = time.time() - max_age_days * 86400
    for env_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        try:
            # The local backend holds this lock while apt runs with these caches.
            with _try_exclusive(env_dir / ".lock"):
                if env_dir.name not in configured:
                    what = f"build apt cache of {env_dir.name!r} (no such environment)"
                    if not dry_run:
                        remove_tree(env_dir)
                    removed.append(what)
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
                        f"unused for {max_age_days:.0f} days"
                    )
        except BlockingIOError:
            continue  # a build is installing with it right now
        except Exception as e:  # one environment's caches; the next is tried
            errs.append(_error_line(env_dir, e))
    return removed
