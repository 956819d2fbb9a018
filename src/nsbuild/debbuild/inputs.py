"""What a build starts from, checked on the host before any environment is
used: the source package (a .dsc, or a tree made into one), --out, the
--extra-package files, and the build's private work folder."""

from __future__ import annotations

import os
import posixpath
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from nsbuild.backends.errors import CopyRefused
from nsbuild.backends.tarfeed import open_regular
from nsbuild.debbuild import binnmu
from nsbuild.debbuild.dsc import SourcePackage, load_dsc
from nsbuild.debbuild.errors import BuildInputError
from nsbuild.debbuild.result import BuildRequest
from nsbuild.debbuild.srctree import source_from_tree
from nsbuild.envs.arches import ARCH_RE
from nsbuild.printable import printable

# dpkg's build profile names and Debian's suite names.
_PROFILE = re.compile(r"[a-z0-9][a-z0-9.+-]{0,63}")
_DIST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+~_-]{0,63}")
_PATH_PART = re.compile(r"[A-Za-z0-9._+~-]{1,255}")
# Fresh in each command of a session (or the kernel's): a tree there is lost.
_NOT_KEPT = {"tmp", "proc", "sys", "dev"}
# The largest extra package taken (the largest .debs are a few GiB).
MAX_EXTRA = 8 << 30


@dataclass(frozen=True)
class Inputs:
    pkg: SourcePackage
    out: Path  # absolute; made only when the build succeeded
    extras: tuple[Path, ...]  # private copies of the --extra-package files


def check_inputs(req: BuildRequest, tmp: Path) -> Inputs:
    """The request's inputs, checked, with private copies in `tmp`."""
    check_options(req)
    src = req.input
    if src.is_dir():
        made = tmp / "source"
        made.mkdir()
        pkg = source_from_tree(src, made)
        default_out = src.absolute().parent
    else:
        # The build copies in what load_dsc checked, not whatever stands
        # next to the .dsc by then: that folder may be the package author's.
        checked = tmp / "checked"
        checked.mkdir()
        pkg = load_dsc(src, keep=checked)
        default_out = pkg.directory
    out = (req.out or default_out).absolute()
    check_out(out)
    extras = tmp / "extra"
    extras.mkdir()
    return Inputs(pkg, out, tuple(take_extra(extra, extras) for extra in req.extra_packages))


def check_out(out: Path) -> None:
    """--out must be a directory nsbuild can write, or one it can make: found
    out now, not after the build (exit 2, one line). Root passes any mode:
    only a read-only file system refuses it."""
    # os.path's tests: a folder that cannot be searched is "not there" for
    # them, and is then refused below by its own mode, not by a traceback.
    probe = out
    while not os.path.exists(probe) and probe.parent != probe:
        if os.path.islink(probe):
            raise BuildInputError(f"--out {out}: {probe} is a dangling symbolic link")
        probe = probe.parent
    if not os.path.isdir(probe):
        raise BuildInputError(f"--out {out}: {'' if probe == out else f'{probe} is '}"
                              "not a directory")  # fmt: skip
    if not os.access(probe, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only(probe) else "permission denied"
        where = "" if probe == out else f" (cannot make it in {probe})"
        raise BuildInputError(f"--out {out}: cannot write there: {why}{where}")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_options(req: BuildRequest) -> None:
    """The options of sbuild's that nsbuild checks before any work, each
    refused in one line naming it."""
    binnmu.check(req)
    if binnmu.wanted(req) and not req.arch_any:
        raise BuildInputError(
            "--make-binNMU/--append-to-version build only architecture-specific packages "
            "(as sbuild: they imply --no-arch-all): do not give --no-arch-any"
        )
    if not (req.arch_any or req.arch_all or req.source):
        raise BuildInputError("nothing to build: give --arch-any, --arch-all or --source")
    if req.build_path is not None:
        check_build_path(req.build_path)
    for given, what in ((req.host_arch, "--host-arch"), (req.build_arch, "--build")):
        if given is not None and not ARCH_RE.match(given):
            raise BuildInputError(f"{what}: bad architecture name {printable(given, 40)} "
                                  "(e.g. amd64, arm64, armhf, i386)")  # fmt: skip
    for profile in (p for item in req.profiles for p in item.replace(",", " ").split()):
        if not _PROFILE.fullmatch(profile):
            raise BuildInputError(f"--profiles: {printable(profile, 80)!s}: not a build profile "
                                  "name (lower-case letters, digits, '-', '.', '+')")  # fmt: skip
    if req.dist is not None and not _DIST.fullmatch(req.dist):
        raise BuildInputError(f"--dist {printable(req.dist, 80)}: not a distribution name")
    if req.purge_build not in ("always", "successful", "never"):
        raise BuildInputError(
            f"--purge-build {printable(req.purge_build, 40)}: give always, successful or never"
        )


def check_build_path(path: str) -> None:
    """--build-path: an absolute, normalised path of plain names, below a
    top directory (its parent holds the results)."""
    shown = printable(path, 200)
    if not path.startswith("/"):
        raise BuildInputError(f"--build-path {shown}: not an absolute path")
    if posixpath.normpath(path) != path or path.startswith("//"):
        raise BuildInputError(
            f"--build-path {shown}: not normalised (no '.', '..', '//' or trailing '/')"
        )
    parts = path.split("/")[1:]
    if len(parts) < 2:
        raise BuildInputError(f"--build-path {shown}: give a directory below a top one, "
                              "e.g. /build/NAME")  # fmt: skip
    if len(path) > 1024 or not all(_PATH_PART.fullmatch(p) for p in parts):
        raise BuildInputError(
            f"--build-path {shown}: only letters, digits and '._+~-' in its names"
        )
    if parts[0] in _NOT_KEPT:
        raise BuildInputError(f"--build-path {shown}: /{parts[0]} is not kept between the "
                              "build's commands; choose a path under /build")  # fmt: skip


def take_extra(path: Path, folder: Path) -> Path:
    """A private copy, in `folder`, of the package the user named with
    --extra-package: the user's own path followed once, the file it leads to
    opened once (no link followed then), checked to be a regular file of
    bounded size and copied as it is read. The build gets this copy: the
    named file may be swapped (for a link to the user's home, say) once checked."""
    if not path.name.endswith((".deb", ".udeb")):
        raise BuildInputError(f"--extra-package {path}: not a .deb file")
    try:
        source = open_regular(path.resolve(), MAX_EXTRA)
    except CopyRefused as e:
        raise BuildInputError(f"--extra-package {path}: {e}") from None
    copy = folder / path.name
    try:
        with source, copy.open("xb") as out:
            left = os.fstat(source.fileno()).st_size
            while left >= 0 and (block := source.read(min(1 << 20, left + 1))):
                out.write(block)
                left -= len(block)
    except OSError as e:
        raise BuildInputError(f"--extra-package {path}: {e.strerror}") from None
    if left != 0:
        raise BuildInputError(f"--extra-package {path}: changed while it was read")
    return copy


def work_dir(stack: ExitStack) -> Path:
    """The build's private host directory (log in progress, results before they
    move to --out), removed when `stack` ends. It lives in nsbuild's cache under
    a name that says which process made it, so `nsbuild gc` removes it after a
    crash."""
    from nsbuild.envs.owner import tmp_name
    from nsbuild.envs.paths import builds_root
    from nsbuild.envs.remove import remove_tree

    # Under the cache's top, which no other user may walk into (builds_root
    # makes sure): the build directory, the session's and the results may
    # hold setuid files.
    root = builds_root()
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / tmp_name()
    tmp.mkdir(mode=0o700)
    stack.callback(remove_tree, tmp)
    return tmp
