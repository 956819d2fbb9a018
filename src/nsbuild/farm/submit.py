"""`nsbuild farm submit` and `nsbuild farm status`: builds handed to the
master's force scheduler over its REST interface, watched by polling, and
their results fetched.

A .dsc travels with its files into the master's sources/ folder, so the
master must be on this machine; `--from-archive` needs nothing but the
master's URL. Results are read from the master's results/ folder (on this
machine too).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nsbuild.farm import settings
from nsbuild.farm.dscfiles import dsc_files
from nsbuild.farm.errors import FarmError
from nsbuild.farm.outcome import plain_name, split_source
from nsbuild.farm.rest import Rest, Unreachable
from nsbuild.printable import printable

SCHEDULER = "build"
POLL = 0.5  # seconds between two looks at the master (two requests each)
RESTART_WAIT = 300.0  # how long --wait waits for a master that stopped answering


@dataclass
class Submitted:
    label: str  # what was asked: a .dsc's name, or name[=version]
    builder: str
    request: int
    build: dict[str, Any] | None = None
    properties: dict[str, Any] | None = None
    staged: Path | None = None  # the copy of a .dsc in the master's sources/


# Every field of a REST answer is the master's to choose (and a worker's,
# for its name): these readers take a field of the expected type or nothing,
# and make text printable before it reaches a terminal.
_BUILDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}")


def _id(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _name(value: object, limit: int = 60) -> str:
    return printable(value, limit) if isinstance(value, str) and value else "?"


def _first(items: list[dict[str, Any]]) -> dict[str, Any]:
    return items[0] if items else {}


def _workers(rest: Rest) -> dict[int | None, str]:
    return {_id(w.get("workerid")): _name(w.get("name"), 50)
            for w in rest.items("workers", "workers")}  # fmt: skip


def choose_builder(rest: Rest, env: str | None, arch: str | None) -> str:
    """The builder of --env/--arch; without them, the master's only one."""
    found: dict[str, list[Any]] = {
        str(b["name"]): b["tags"] if isinstance(b.get("tags"), list) else []
        for b in rest.items("builders", "builders")
        if isinstance(b.get("name"), str) and _BUILDER.fullmatch(b["name"])}  # fmt: skip
    names = sorted(found)
    # By the tags nsbuild's builders carry (settings.builder_tags).
    wanted = [n for n in names
              if (env is None or f"env={env}" in found[n])
              and (arch is None or f"arch={arch}" in found[n])]  # fmt: skip
    if len(wanted) == 1:
        return wanted[0]
    have = ", ".join(names) or "none: no worker registered yet"
    if not wanted:
        raise FarmError(f"no builder for {env or 'any environment'}/{arch or 'any architecture'}"
                        f" on the master (its builders: {have})")  # fmt: skip
    raise FarmError(f"several builders fit; choose with --env and --arch (builders: {have})")


def check_dsc(dsc: Path) -> list[str]:
    """The files of a .dsc to send, all present; FarmError if not."""
    names = dsc_files(dsc)
    if not plain_name(dsc.name) or not dsc.name.endswith(".dsc"):
        raise FarmError(f"not a .dsc: {dsc}")
    for n in names:
        if not (dsc.parent / n).is_file():
            raise FarmError(f"{dsc.parent / n} is missing (the .dsc lists it)")
    return names


def stage_dsc(master_dir: Path, dsc: Path) -> str:
    """Copy a .dsc and its files into the master's sources/; the path to give it."""
    names = check_dsc(dsc)
    folder = master_dir / settings.SOURCES_DIR / secrets.token_hex(8)
    try:
        folder.mkdir(parents=True)
        for n in [dsc.name, *names]:
            shutil.copyfile(dsc.parent / n, folder / n)
    except OSError as e:
        raise FarmError(f"cannot copy {dsc.name} into {folder}: {e.strerror}") from None
    return f"{settings.SOURCES_DIR}/{folder.name}/{dsc.name}"


LIST_LIMIT = 1 << 20


def read_list(path: Path) -> list[str]:
    """The PKG[=VER] lines of a rebuild list, checked; # starts a comment."""
    from nsbuild.userfile import read_small

    found = []
    try:
        text = read_small(path, LIST_LIMIT).decode(errors="replace")
    except OSError as e:
        raise FarmError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise FarmError(f"{path}: {e}") from None
    for number, line in enumerate(text.splitlines(), 1):
        spec = line.split("#", 1)[0].strip()
        if spec:
            try:
                split_source(spec)
            except ValueError as e:
                raise FarmError(f"{path}:{number}: {e}") from None
            found.append(spec)
    return found


def submit(rest: Rest, builder: str, master_dir: Path | None, dscs: list[Path],
           sources: list[str]) -> list[Submitted]:  # fmt: skip
    # All checked before the first is submitted: a bad one in the middle
    # would leave the ones before it queued.
    if dscs and master_dir is None:
        raise FarmError("a .dsc is sent through the master's folder: the master must be "
                        "on this machine (`nsbuild farm master`); else use --from-archive")
    for dsc in dscs:
        check_dsc(dsc)
    for spec in sources:
        try:
            split_source(spec)
        except ValueError as e:
            raise FarmError(str(e)) from None
    out = []
    if master_dir is not None:
        for dsc in dscs:
            staged = stage_dsc(master_dir, dsc)
            out.append(Submitted(dsc.name, builder, rest.force(SCHEDULER, builder, dsc=staged),
                                 staged=(master_dir / staged).parent))  # fmt: skip
    for spec in sources:
        out.append(Submitted(spec, builder, rest.force(SCHEDULER, builder, source=spec)))
    return out


def wait(rest: Rest, jobs: list[Submitted], say: Any) -> None:
    """Poll until every request is complete; say what changes. A master
    that stops answering is waited for (RESTART_WAIT): its queued builds run
    once it is back."""
    gone: float | None = None
    while True:
        try:
            _wait(rest, jobs, say)
            return
        except Unreachable as e:
            now = time.monotonic()
            if gone is None:
                gone = now
                say(f"{e}; waiting up to {RESTART_WAIT:.0f}s for it to come back")
            elif now - gone > RESTART_WAIT:
                raise
            time.sleep(POLL)


# What --wait reads of a finished build, asked for with its builds.
PROPERTIES = ["nsbuild_status", "nsbuild_unmet", "nsbuild_package", "nsbuild_version",
              "nsbuild_results", "nsbuild_files"]  # fmt: skip
CHUNK = 100  # build requests asked about in one request


def _last(builds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The build with the highest id: after a retry, the last is the one."""
    known = [b for b in builds if _id(b.get("buildid")) is not None]
    return max(known, key=lambda b: int(b["buildid"])) if known else None


def _wait(rest: Rest, jobs: list[Submitted], say: Any) -> None:
    """One look at the master is a request for the running builds and one
    per CHUNK of waiting requests (the master filters both), then one per
    build that ended, for its properties."""
    seen: dict[int, str] = {}
    pending = {j.request: j for j in jobs if j.properties is None}
    workers = _workers(rest)
    while pending:
        running = {rid: b for b in rest.items("builds", "builds", complete="false")
                   if (rid := _id(b.get("buildrequestid"))) in pending}  # fmt: skip
        ids = sorted(pending)
        done = {rid for i in range(0, len(ids), CHUNK)
                for r in rest.items("buildrequests", "buildrequests",
                                    buildrequestid=ids[i:i + CHUNK])
                if (rid := _id(r.get("buildrequestid"))) in pending
                and r.get("complete") is True}  # fmt: skip
        for rid in ids:
            job, now = pending[rid], "queued"
            if rid in running:
                job.build = running[rid]
                if _id(job.build.get("workerid")) not in workers:
                    workers = _workers(rest)
                now = f"building on {workers.get(_id(job.build.get('workerid')), '?')}"
            if rid in done:
                now = "done"
                del pending[rid]
                job.build = _last(rest.items(f"buildrequests/{rid}/builds", "builds",
                                             property=PROPERTIES))  # fmt: skip
                props = job.build.get("properties") if job.build is not None else None
                job.properties = props if isinstance(props, dict) else {}
                if job.build is not None:
                    job.build["worker"] = workers.get(_id(job.build.get("workerid")), "?")
            if seen.get(rid) != now:
                seen[rid] = now
                say(f"{job.label}: {now}")
        if pending:
            time.sleep(POLL)


def _prop(job: Submitted, name: str) -> Any:
    value = (job.properties or {}).get(name)
    return value[0] if isinstance(value, list) and value else None


def status_of(job: Submitted) -> str:
    """buildd's word for how the build ended."""
    from nsbuild.farm.outcome import DEP_WAIT

    said = _prop(job, "nsbuild_status")
    if said == DEP_WAIT:
        unmet = _prop(job, "nsbuild_unmet") or []
        return f"dep-wait: {', '.join(str(u) for u in unmet)}"
    results = (job.build or {}).get("results")
    if said == "built" and results != 0:
        # Built, but a later step (an upload, its check) failed: no results.
        return "error"
    if isinstance(said, str) and said:
        return said
    # Ended before nsbuild said anything (the source could not be fetched):
    # Buildbot's result, in buildd's words where it has them.
    names = ["built", "warnings", "failed", "skipped", "error", "retry", "cancelled"]
    return names[results] if isinstance(results, int) and 0 <= results < len(names) else "?"


# What a build's results are called: binary packages (any name: a source
# names its binaries), and the package's own .changes, .buildinfo and logs.
# Nothing else a worker names is copied into the user's --out (by default
# the current folder, where a Makefile or a conftest.py would be run).
DEB_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]*_([^_/]+)_[a-z0-9-]+\.(deb|udeb|ddeb)")
OWN_SUFFIX = re.compile(r"_[^/]+\.(changes|buildinfo|build|network\.jsonl)")
PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]{0,99}")


def may_write(name: str, package: str, version: str, exists: bool) -> bool:
    """Whether a result of `package` at `version` (no epoch) may be written
    as `name` into --out: one of its kinds, and over an existing file only
    at the build's own version, as a local build (a .deb of another version
    may be another source's, the user's own)."""
    deb = DEB_NAME.fullmatch(name)
    if deb is not None:
        return not exists or deb.group(1) == version
    if not (name.startswith(f"{package}_") and OWN_SUFFIX.fullmatch(name[len(package):])):
        return False
    return not exists or name.startswith(f"{package}_{version}_")


def fetch(master_dir: Path, job: Submitted, out: Path) -> list[Path]:
    """Copy a finished build's files from the master's results/ into `out`:
    each through a new file renamed into place, so a symbolic link at the
    name is replaced, never written through."""
    where = _prop(job, "nsbuild_results")
    names = _prop(job, "nsbuild_files") or []
    package, version = _prop(job, "nsbuild_package"), _prop(job, "nsbuild_version")
    if not (isinstance(where, str) and isinstance(names, list) and isinstance(package, str)
            and PACKAGE.fullmatch(package) and isinstance(version, str)):  # fmt: skip
        return []
    version = version.split(":", 1)[-1]
    folder = (master_dir / where).resolve()
    if not folder.is_relative_to(master_dir.resolve()):
        return []
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in names:
        name = plain_name(name)
        if not (name and may_write(name, package, version, os.path.lexists(out / name))):
            continue
        src = folder / name
        if src.is_file() and not src.is_symlink():
            _copy_in(src, out / name)
            copied.append(out / name)
    return copied


def unstage(job: Submitted) -> None:
    """Remove the copy of a .dsc sent through the master's sources/ once its
    request is complete (a retry happens before): the master's folder does
    not grow by a source per submit."""
    if job.staged is not None and job.properties is not None:
        shutil.rmtree(job.staged, ignore_errors=True)


def _copy_in(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}")
    try:
        with open(src, "rb") as f, open(tmp, "xb") as g:
            shutil.copyfileobj(f, g)
        os.replace(tmp, dest)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise FarmError(f"cannot write {dest}: {e.strerror}") from None


def table(jobs: list[Submitted]) -> str:
    """package, version, worker, status, duration: one row per build."""
    rows = [("package", "version", "worker", "status", "duration")]
    for job in jobs:
        b = job.build or {}
        start, end = b.get("started_at"), b.get("complete_at")
        took = f"{end - start}s" if isinstance(start, int) and isinstance(end, int) else "-"
        rows.append((printable(str(_prop(job, "nsbuild_package") or job.label), 60),
                     printable(str(_prop(job, "nsbuild_version") or "-"), 40),
                     printable(str(b.get("worker", "-")), 50),
                     printable(status_of(job), 300), took))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)), r[4]])
                     for r in rows)  # fmt: skip


def queue(rest: Rest) -> str:
    """The requests not complete yet: queued, or building on which worker."""
    builders = {_id(b.get("builderid")): _name(b.get("name"))
                for b in rest.items("builders", "builders")}  # fmt: skip
    workers = _workers(rest)
    lines = []
    for req in rest.items("buildrequests", "buildrequests", complete="false"):
        brid = _id(req.get("buildrequestid"))
        if brid is None:
            continue
        builds = rest.items(f"buildrequests/{brid}/builds", "builds")
        where = f"building on {workers.get(_id(builds[-1].get('workerid')), '?')}" if builds \
            else "queued"  # fmt: skip
        got = _first(rest.items(f"buildrequests/{brid}", "buildrequests",
                                property=["dsc", "source"])).get("properties")  # fmt: skip
        got = got if isinstance(got, dict) else {}
        value = got.get("source") or got.get("dsc")
        what = value[0] if isinstance(value, list) and value else "?"
        lines.append(f"{brid}  {builders.get(_id(req.get('builderid')), '?')}  "
                     f"{_name(what, 200)}  {where}")  # fmt: skip
    return "\n".join(lines) if lines else "no builds queued or running"


def say(line: str) -> None:
    sys.stderr.write(f"nsbuild farm: {line}\n")


PASSWORD_VARIABLE = "NSBUILD_FARM_PASSWORD"


def master_for(url: str | None, cert: Path | None = None) -> tuple[Rest, Path | None]:
    """The master to talk to: --master URL, else the one `nsbuild farm
    master` made on this machine; and its folder when it is that one. The
    web password is that master's, else $NSBUILD_FARM_PASSWORD's. A master
    on TLS is trusted by its own certificate: that master's, or `cert`."""
    from nsbuild.farm.tls import master_cert, read_cert

    local = settings.local_master()
    mine = settings.master_settings(local) if local is not None else None
    if url is None:
        if mine is None:
            raise FarmError("no master on this machine (nsbuild farm master DIR); "
                            "or name one with --master URL")
        url = mine.url
    pinned = read_cert(cert) if cert is not None else None
    if local is not None and mine is not None and url.rstrip("/") == mine.url.rstrip("/"):
        pinned = pinned or master_cert(local, mine.tls)
        return Rest(url, settings.WEB_USER, mine.password, cert=pinned), local
    return Rest(url, settings.WEB_USER, os.environ.get(PASSWORD_VARIABLE, ""), cert=pinned), None
