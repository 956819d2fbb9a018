"""Collect: the .changes a build left and the package's own results it lists,
copied out of the session and checked. Anything else is refused."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from nsbuild.backends.base import MAX_COPY_OUT, STDOUT
from nsbuild.debbuild.dsc import SourcePackage
from nsbuild.debbuild.errors import BuildFailed
from nsbuild.debbuild.result import Artifact
from nsbuild.debbuild.steps import Steps
from nsbuild.printable import printable

# A .changes is a few KiB; one larger than this was not made by dpkg-genchanges.
MAX_CHANGES = 16 << 20
# What one build may write to --out, all its results together.
MAX_RESULTS = MAX_COPY_OUT
# How every .deb, .udeb and .ddeb begins: an ar archive whose first member
# is debian-binary.
_DEB_MAGIC = b"!<arch>\ndebian-binary"
# An upstream tarball of a source package (main or component), or its signature.
_ORIG = re.compile(r"\.orig(-[A-Za-z0-9][A-Za-z0-9-]*)?\.tar\.[a-z0-9]+(\.asc)?$")
# What a file name in a .changes may be: Debian's package, version and
# architecture characters, nothing a shell or a terminal reads specially.
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+~_-]{0,254}")
_DEB_NAME = re.compile(
    r"([a-z0-9][a-z0-9.+-]*)_([0-9][A-Za-z0-9.+~-]*)_([a-z0-9-]+)\.(deb|udeb|ddeb)"
)


# Every component of the build directory a directory, none a symbolic link
# (a --build-path in a world-writable place can be renamed by its owner).
_PLAIN_DIR = (
    'set -f; p=""; IFS=/; for part in ${1#/}; do p="$p/$part"; '
    'if [ -L "$p" ] || [ ! -d "$p" ]; then echo "$p is not a plain directory" >&2; exit 3; fi; '
    "done"
)


class Listed(NamedTuple):
    """A file a .changes lists."""

    name: str
    size: int
    sha256: str | None


@dataclass
class Collected:
    """The results copied out, in the build's private folder."""

    artifacts: list[Artifact] = field(default_factory=list)
    # Source files identical to the input's (nothing to write over the input).
    same_as_input: set[str] = field(default_factory=set)
    # Results at another version than the source's: never written over a
    # file of --out (it may be another package's, the user's own).
    no_replace: set[str] = field(default_factory=set)


class ResultNames:
    """The names a build of `pkg` may leave as results: its .changes and
    .buildinfo, the .debs of the binary packages its .dsc declares (and their
    -dbgsym) for the architectures built, and with --source its own source files. Not nsbuild's logs
    (`.build`, `.network.jsonl`), not another package's files."""

    def __init__(
        self,
        pkg: SourcePackage,
        arch: str,
        source: bool,
        version: str | None = None,
        source_only_changes: str | None = None,
        build: str = "any,all",
    ) -> None:
        # A binary-only upload's results carry its version (+bN, an
        # appended text): that version exactly, never the source's.
        self.version = version or pkg.upstream_less_epoch
        self.prefix = f"{pkg.source}_{self.version}_"
        arches = (arch, "all", "source")
        self.changes = {f"{self.prefix}{a}.changes" for a in arches}
        self.buildinfo = {f"{self.prefix}{a}.buildinfo" for a in arches}
        self.binaries = {*pkg.binaries, *(f"{b}-dbgsym" for b in pkg.binaries)}
        # Only the kinds dpkg-buildpackage was asked for (`build`, its
        # --build): a cross build leaves out arch-all packages, and an
        # _all.deb its .changes lists anyway is no result of it.
        kinds = build.split(",")
        self.deb_arches = {a for a, kind in ((arch, "any"), ("all", "all")) if kind in kinds}
        self.sources = {p.name for p in pkg.paths()} if source else set()
        # --source-only-changes: a second .changes, of the source alone.
        self.source_only = source_only_changes
        self.source_names = {p.name for p in pkg.paths()}

    def result(self, name: str) -> bool:
        if not _FILE_NAME.fullmatch(name):
            return False
        if name in self.changes or name in self.buildinfo or name in self.sources:
            return True
        m = _DEB_NAME.fullmatch(name)
        # Any version: a source may give its binaries versions of their own.
        return bool(m and m.group(1) in self.binaries and m.group(3) in self.deb_arches)

    def own_version(self, name: str) -> bool:
        """Whether a result is at the build's own version (the source's, or a
        binary-only upload's): only such a file may replace one of its name
        in --out. A .deb at another version may be another source's, the
        user's own."""
        m = _DEB_NAME.fullmatch(name)
        return m is None or m.group(2) == self.version


def collect(
    steps: Steps, pkg: SourcePackage, own: ResultNames, results: Path, where: str | None = None
) -> Collected:
    """Copy out the .changes and what it lists into `results`. The .changes
    is the build's own word: only names that are this package's results are
    taken (never another file of --out, nor nsbuild's logs), each bounded by
    the size the .changes gives and checked against its checksum. `where` is
    the build directory (default: the backend's work directory; else a
    --build-path, which place() made with no symbolic link in it): nothing
    is taken from elsewhere, and no link under it is followed."""
    backend, log = steps.backend, steps.log
    log.section("Collect")
    work = where or backend.work_dir
    # Nothing of the build runs any more (each command's processes end with
    # it): a build directory found plain now stays so while it is read.
    status, why = backend.check_output(["sh", "-c", _PLAIN_DIR, "collect", work], stderr=STDOUT)
    if status != 0:
        raise BuildFailed(f"refusing to collect from {work}: {printable(why.strip(), 300)}")
    status, text = backend.check_output(["ls", "-1", "--", work])
    found = [n for n in text.splitlines() if n in own.changes]
    extra = own.source_only if own.source_only in found and len(found) > 1 else None
    if extra is not None:
        found.remove(extra)
    if status != 0 or len(found) != 1:
        raise BuildFailed(
            f"no single {own.prefix}*.changes after the build (found: {', '.join(found)})"
        )
    if own.source_only is not None and extra is None:
        raise BuildFailed(f"no {own.source_only} after the build (--source-only-changes)")
    changes = found[0]
    backend.copy_out(f"{work}/{changes}", results / changes, within=work, limit=MAX_CHANGES)
    listed = changes_files(results / changes)
    _check_listed(changes, listed, own, pkg)
    names = [changes]
    done = Collected()
    for fname, size, sha in listed:
        if fname in names:
            continue
        got = results / fname
        backend.copy_out(f"{work}/{fname}", got, within=work, limit=size)
        if got.stat().st_size != size or (sha and sha256_file(got) != sha):
            raise BuildFailed(f"{fname}: does not match its checksum in {changes}")
        if _DEB_NAME.fullmatch(fname) and not _is_deb(got):
            raise BuildFailed(f"{fname}: not a Debian package (no ar archive of debian-binary)")
        names.append(fname)
        if not own.own_version(fname):
            done.no_replace.add(fname)
    done.same_as_input = _same_as_input(pkg, results, names)
    if extra is not None:
        # The source-only .changes alone, as sbuild: what it lists is the
        # source, which is the input (or, with --source, collected above).
        backend.copy_out(f"{work}/{extra}", results / extra, within=work, limit=MAX_CHANGES)
        _check_source_only(extra, changes_files(results / extra), own, pkg, results, names)
        names.append(extra)
    for n in names:
        p = results / n
        art = Artifact(n, str(p), p.stat().st_size, sha256_file(p))
        done.artifacts.append(art)
        log.line(f"{n} {art.size} {art.sha256}")
    return done


def _check_source_only(changes: str, listed: list[Listed], own: ResultNames, pkg: SourcePackage,
                       results: Path, collected: list[str]) -> None:  # fmt: skip
    """A source-only .changes lists the source package's files (and a
    .buildinfo of the build's): nothing else is delivered beside it. Each
    as it is: the one collected, else the input's. The build owns the
    directory dpkg-genchanges reads them from, and may have put its own there."""
    allowed = own.source_names | own.buildinfo
    refused = [fname for fname, _size, _sha in listed if fname not in allowed]
    if refused:
        raise BuildFailed(
            f"{changes} lists files that are not {own.prefix.rstrip('_')}'s source, refused: "
            + ", ".join(f"'{printable(n, 80)}'" for n in refused[:10])
        )
    inputs = {p.name: p for p in pkg.paths()}
    for fname, size, sha in listed:
        have = results / fname if fname in collected else inputs.get(fname)
        if (have is None or sha is None or have.stat().st_size != size
                or sha256_file(have) != sha):  # fmt: skip
            raise BuildFailed(
                f"{changes} lists {fname}, which is not the source's (size or checksum differ)"
            )


def _check_listed(changes: str, listed: list[Listed], own: ResultNames, pkg: SourcePackage) -> None:
    """Refuse, before anything is copied, a name that is no result of this
    package, and a result or a set of results larger than any build makes."""
    for fname, _size, _sha in listed:
        if "/" in fname or fname in (".", ".."):
            raise BuildFailed(f"{changes} lists a file with a path: '{fname}'")
    refused = [fname for fname, _size, _sha in listed if not own.result(fname)]
    if refused:
        more = f" and {len(refused) - 10} more" if len(refused) > 10 else ""
        raise BuildFailed(
            f"{changes} lists files that are not results of {pkg.source} "
            f"{pkg.version}, refused: " + ", ".join(f"'{n}'" for n in refused[:10]) + more
        )
    for fname, size, _sha in listed:
        if not 0 <= size <= MAX_COPY_OUT:
            raise BuildFailed(f"{changes} lists {fname} of {size} bytes, over {MAX_COPY_OUT}")
    total = sum(size for _f, size, _s in listed)
    if total > MAX_RESULTS:
        raise BuildFailed(
            f"{changes} lists {total} bytes of results, over the bound of {MAX_RESULTS} bytes"
        )


def _same_as_input(pkg: SourcePackage, results: Path, names: list[str]) -> set[str]:
    """The results named like a file of the input .dsc (with --source, by
    default next to the user's own files). The .dsc and the Debian part
    are the source build asked for and replace the input's, as with
    sbuild; an upstream tarball never changes in a source build, and other
    revisions reuse it: one the build made differently fails the build,
    named. Returns the names identical to the input (nothing to write)."""
    if pkg.kept is None:  # built from a tree: the input is no such file
        return set()
    inputs = {p.name: p for p in pkg.paths()}
    named = [n for n in names if n in inputs]
    same = {n for n in named if sha256_file(results / n) == sha256_file(inputs[n])}
    forged = [n for n in named if n not in same and _ORIG.search(n)]
    if forged:
        raise BuildFailed(
            f"{pkg.source} {pkg.version}: upstream tarballs the build made differ from the "
            "input's of the same name, refused: " + ", ".join(f"'{n}'" for n in forged)
        )
    return same


def changes_files(path: Path) -> list[Listed]:
    """The files a .changes lists. The .changes comes out of the build: a
    malformed one is the build's failure, said in one line."""
    from debian.deb822 import Changes

    try:
        with open(path, encoding="utf-8") as f:
            changes = Changes(f)
        sha = {e["name"]: e["sha256"] for e in changes.get("Checksums-Sha256", [])}
        return [Listed(e["name"], int(e["size"]), sha.get(e["name"]))
                for e in changes.get("Files", [])]  # fmt: skip
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise BuildFailed(f"{path.name}: malformed .changes left by the build ({e!r})") from None


def _is_deb(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(len(_DEB_MAGIC)) == _DEB_MAGIC


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
