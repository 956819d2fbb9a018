"""`nsbuild gc`: remove what crashed or finished runs left behind.

Removed:
- throw-away sessions whose owner process is gone (SIGKILL, crash);
- anything under a `.tmp-PID-START-...` name whose maker is gone (a half-made
  session or base, a half-deleted one, a half-written tarball);
- bases that no configured environment and no remaining session refers to.

Never removed: persistent sessions, sessions of live owners, bases in use
(their lock is taken exclusively, without waiting, before deleting). Deleting
goes through `remove_tree`, which refuses to cross a mount point.

Each entry is handled on its own: whatever goes wrong with one (a tree or a
record shaped by code in a sandbox) is one line of the report, and gc goes
on with the next.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nsbuild.envs.config import Config, load_config
from nsbuild.envs.errors import EnvError
from nsbuild.envs.owner import tmp_name, tmp_owner
from nsbuild.envs.paths import Layout, cache_dir
from nsbuild.envs.remove import remove_tree
from nsbuild.envs.session import RECORD, Session
from nsbuild.envs.store import base_complete, tarball_digest, try_lock_for_delete
from nsbuild.printable import printable


@dataclass
class GcReport:
    # Human descriptions of what went (or, in a dry run, would go).
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _entries(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except FileNotFoundError:
        return []


@contextlib.contextmanager
def _each(report: GcReport, path: Path) -> Iterator[None]:
    """Handle one entry: an error is one line of the report, not the end of gc."""
    try:
        yield
    except EnvError as e:
        report.errors.append(str(e))
    except Exception as e:  # any error of this entry, said in one line
        report.errors.append(f"{path}: {printable(str(e) or type(e).__name__, 300)}")


def _dead_tmp(name: str) -> bool:
    owner = tmp_owner(name)
    return owner is not None and not owner.alive()


def _remove(path: Path, what: str, report: GcReport, dry_run: bool) -> None:
    if dry_run:
        report.removed.append(what)
        return
    with _each(report, path):
        remove_tree(path)
        report.removed.append(what)


def _sessions(layout: Layout, report: GcReport, dry_run: bool) -> set[str]:
    """Remove dead sessions; return the bases the remaining ones use."""
    in_use: set[str] = set()
    for name in _entries(layout.sessions):
        with _each(report, layout.sessions / name):
            _session(layout.sessions / name, report, dry_run, in_use)
    return in_use


def _session(path: Path, report: GcReport, dry_run: bool, in_use: set[str]) -> None:
    if path.name.startswith("."):
        if _dead_tmp(path.name):
            _remove(path, f"unfinished session {path}", report, dry_run)
        return
    if not os.path.lexists(path / RECORD):
        report.errors.append(f"{path}: not a session (no {RECORD}); left alone")
        return
    session = Session.load(path)
    if session.alive():
        report.kept.append(f"session {session.id} ({session.kind})")
        if session.base:
            in_use.add(session.base)
        return
    pid = session.owner.pid if session.owner else "?"
    _remove(path, f"session {session.id} (owner pid {pid} gone)", report, dry_run)


def _configured_bases(config: Config, layout: Layout, report: GcReport) -> set[str]:
    digests: set[str] = set()
    for env in config:
        # Compared by path: an Unpack folder refused as not private is
        # reported once by gc(), not again here.
        if env.type == "tarball" and env.path and (env.unpack or cache_dir()) == layout.root:
            try:
                digests.add(tarball_digest(layout, env.path))
            except Exception as e:  # one line per environment
                report.errors.append(f"environment {env.name!r}: {printable(str(e), 300)}")
    return digests


def _still_used(layout: Layout, digest: str) -> bool:
    """Look again, under the base's exclusive lock, for sessions made meanwhile."""
    for name in _entries(layout.sessions):
        if not name.startswith("."):
            with contextlib.suppress(EnvError):
                if Session.load(layout.sessions / name).base == digest:
                    return True
    return False


def _bases(layout: Layout, keep: set[str], report: GcReport, dry_run: bool) -> None:
    for name in _entries(layout.bases):
        if name not in keep:
            with _each(report, layout.bases / name):
                _base(layout, name, report, dry_run)


def _base(layout: Layout, name: str, report: GcReport, dry_run: bool) -> None:
    path = layout.bases / name
    if name.startswith("."):
        if _dead_tmp(name):
            _remove(path, f"unfinished base {path}", report, dry_run)
        return
    try:
        with try_lock_for_delete(layout, name):
            if _still_used(layout, name) or not base_complete(layout, name):
                return
            if dry_run:
                report.removed.append(f"unused base {name[:12]}")
                return
            doomed = layout.bases / tmp_name()
            os.rename(path, doomed)
        _remove(doomed, f"unused base {name[:12]}", report, dry_run)
        with contextlib.suppress(FileNotFoundError):
            layout.base_lock(name).unlink()
    except BlockingIOError:
        report.kept.append(f"base {name[:12]} (in use)")


def _leftover_files(layout: Layout, report: GcReport, dry_run: bool) -> None:
    for directory in (layout.tarballs, layout.digests):
        for name in _entries(directory):
            if name.startswith(".") and _dead_tmp(name.rsplit(".", 1)[0]):
                path = directory / name
                _remove(path, f"unfinished file {path}", report, dry_run)


def gc(dry_run: bool = False) -> GcReport:
    report = GcReport()
    config = load_config()
    layouts = [Layout.default()]
    for env in config:
        if env.unpack and Layout(env.unpack) not in layouts:
            try:
                layouts.append(Layout.private(env.unpack))
            except EnvError as e:  # the others are still cleaned
                report.errors.append(f"environment {env.name!r}: {e}")
    for layout in layouts:
        keep = _sessions(layout, report, dry_run)
        keep |= _configured_bases(config, layout, report)
        _bases(layout, keep, report, dry_run)
        _leftover_files(layout, report, dry_run)
    return report


def remove_unused_base(layout: Layout, digest: str) -> bool:
    """Remove one base now if nothing uses it (after `env remove` or `env update`)."""
    report = GcReport()
    try:
        sessions = [Session.load(d) for d in _session_dirs(layout)]
    except EnvError:
        return False  # a session we cannot read may use it: gc says which
    if any(s.alive() and s.base == digest for s in sessions):
        return False
    # Another environment may name the same tarball: its base is shared.
    if digest in _configured_bases(load_config(), layout, report):
        return False
    _bases_only(layout, digest, report)
    return any(digest[:12] in r for r in report.removed)


def _session_dirs(layout: Layout) -> list[Path]:
    return [
        layout.sessions / n
        for n in _entries(layout.sessions)
        if not n.startswith(".") and os.path.lexists(layout.sessions / n / RECORD)
    ]


def _bases_only(layout: Layout, digest: str, report: GcReport) -> None:
    others = {n for n in _entries(layout.bases) if n != digest and not n.startswith(".")}
    _bases(layout, others, report, dry_run=False)
