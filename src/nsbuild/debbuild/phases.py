"""The Prepare and Build phases: the source copied in and unpacked, then
built by an unprivileged user with no network.

    prepare()  the build user; the source files copied in        (Prepare)
    unpack()   dpkg-source -x (or the tree as it is, with          (Prepare)
               --no-clean-source) in the work directory, then
               sbuild's binary-only changelog entry: a source that
               does not unpack fails here, before any dependency
               is installed
    place()    --build-path: the tree moved to where it is built   (Build)
               (after the dependency phase, whose layer must not
               hold it)
    build()    dpkg-buildpackage, and --source-only-changes        (Build)
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from nsbuild.debbuild import binnmu
from nsbuild.debbuild.cross import Arches
from nsbuild.debbuild.cross import build_env as cross_env
from nsbuild.debbuild.dsc import SourcePackage
from nsbuild.debbuild.errors import BuildInputError
from nsbuild.debbuild.result import BuildRequest
from nsbuild.debbuild.steps import Steps, open_terminal
from nsbuild.envs.arches import ARCH_RE
from nsbuild.errors import NsbuildError
from nsbuild.printable import printable

BUILD_USER = "nsbuild"
BUILD_UID = 2000
# The build user's home: none (as sbuild's), so no rc file of anyone's is read.
BUILD_HOME = "/nonexistent"


def add_build_user(steps: Steps, description: str) -> bool:
    """Add the build user, with no home (as sbuild does: nothing leaks in
    from one), by hand: the environment need not have useradd."""
    user = BUILD_USER
    script = (
        f"grep -q '^{user}:' /etc/passwd || {{ "
        f"echo '{user}:x:{BUILD_UID}:{BUILD_UID}:{description}:"
        f"{BUILD_HOME}:/bin/sh' >> /etc/passwd && "
        f"echo '{user}:x:{BUILD_UID}:' >> /etc/group; }}"
    )
    return steps.run(["sh", "-c", script]) == 0


def prepare(steps: Steps, pkg: SourcePackage, extras: tuple[Path, ...]) -> str:
    """Make the build user and copy the source in; returns the user to build as."""
    backend, log = steps.backend, steps.log
    log.section("Prepare")
    work = backend.work_dir
    user = "root"
    if backend.capabilities.unprivileged_user:
        if not add_build_user(steps, "nsbuild build user"):
            raise NsbuildError("cannot create the build user inside; see the log")
        user = BUILD_USER
    else:
        log.line("Warning: the backend cannot give an unprivileged user; building as root")
    # Private copies of what was checked (never links), each bounded by
    # the size it was checked at.
    for path in pkg.paths():
        backend.copy_in(path, f"{work}/{path.name}", limit=path.lstat().st_size)
    for path in extras:
        backend.copy_in(path, f"{work}/extra/{path.name}", limit=path.lstat().st_size)
    log.line(f"Copied {len(pkg.paths())} source files to {work}")
    return user


@dataclass(frozen=True)
class Tree:
    """The unpacked source inside, and the directory around it: sbuild's
    "Build Dir", which holds the source files, the tree, and the results."""

    path: str  # the tree: DIR/PKG-UPSTREAMVERSION
    dir: str  # its parent, where dpkg-buildpackage writes the results
    version: str  # the version the results carry (a binNMU's), no epoch
    placed: bool = False  # at its final place (--build-path): place() done


def unpack(steps: Steps, pkg: SourcePackage, user: str, req: BuildRequest,
           host_arch: str | None = None) -> Tree:  # fmt: skip
    """Unpack the source in the work directory (a tree given with
    --no-clean-source: copied in as it is), then make the binary-only
    changelog entry the request asks for (for `host_arch`, else the
    environment's architecture). A source dpkg-source cannot
    unpack is the input's fault: BuildInputError, naming dpkg-source and
    the file."""
    backend, log = steps.backend, steps.log
    log.section("Unpack")
    work = backend.work_dir
    tree = f"{work}/{pkg.source}-{pkg.upstream_less_epoch}"
    if user != "root":
        if steps.run(["chown", "-R", f"{user}:{user}", work]) != 0:
            raise NsbuildError("cannot hand the build directory to the build user")
    if not req.clean_source and req.input.is_dir():
        # The tree as it is, built files and all (dpkg-source -b made the
        # .dsc beside it only to learn its name and dependencies).
        # The tree a link names, not the link: links inside it stay links.
        given = req.input.resolve()
        backend.copy_in(given, tree)
        log.line(f"Copied the source tree {printable(str(given))} to {tree} (--no-clean-source)")
        if user != "root" and steps.run(["chown", "-R", f"{user}:{user}", tree]) != 0:
            raise NsbuildError("cannot hand the source tree to the build user")
    else:
        status = steps.run(["dpkg-source", "--no-check", "-x", pkg.dsc.name, tree],
                           user=user, cwd=work)  # fmt: skip
        if status != 0:
            said = steps.failure(f"dpkg-source -x failed on {_unpacking(steps, pkg)}:", status)
            said = said.replace(": failed: ", ": ", 1).replace(": failed (", " (", 1)
            raise BuildInputError(f"{pkg.source} {pkg.version}: {said}")
    new_version = binnmu.version(pkg.version, req)
    if binnmu.wanted(req):
        dist = req.dist or pkg.distribution() or "unstable"
        status, arch = 0, host_arch or ""
        if not arch:
            status, arch = backend.check_output(["dpkg", "--print-architecture"])
            arch = arch.strip()
        if status != 0 or not ARCH_RE.match(arch):
            raise NsbuildError("cannot learn the environment's architecture for the binNMU entry")
        text = binnmu.entry(pkg.source, new_version, dist, arch, req)
        script = ('{ printf "%s" "$1" && cat debian/changelog; } > debian/changelog.nsbuild '
                  "&& mv debian/changelog.nsbuild debian/changelog")  # fmt: skip
        if steps.run(["sh", "-c", script, "binnmu", text], user=user, cwd=tree) != 0:
            raise NsbuildError("cannot add the binary-only entry to debian/changelog; see the log")
        log.line(f"Created changelog entry for binNMU version {new_version}")
    # The work directory itself is root's again until the build: a backend
    # may move it between sessions (the dependency phase's layers), which
    # needs its owner's rights on it; the tree in it stays the build user's.
    if user != "root" and steps.run(["chown", "0:0", work]) != 0:
        raise NsbuildError("cannot take the build directory back from the build user")
    return Tree(tree, work, new_version.split(":", 1)[-1])


def _unpacking(steps: Steps, pkg: SourcePackage) -> str:
    """The file dpkg-source was unpacking when it failed (the last it named
    in the log), else the .dsc; escaped, as the source chose the name."""
    with open(steps.log.path, "rb") as f:
        f.seek(max(steps.output_start, f.seek(0, os.SEEK_END) - (64 << 10)))
        text = f.read().decode(errors="replace")
    named = re.findall(r"^dpkg-source: info: unpacking (\S+)$", text, re.MULTILINE)
    return printable(named[-1], 200) if named else pkg.dsc.name


def place(steps: Steps, pkg: SourcePackage, tree: Tree, user: str, req: BuildRequest) -> Tree:
    """--build-path P: P becomes the build directory (sbuild's meaning: the
    source files and the results in P, the tree in P/PKG-VERSION). Made now,
    after the dependency phase, so that no dependency layer holds it; it must
    be empty or new (sbuild's rule), and no part of it a symbolic link, so
    that what is collected from it later is what the build left there (only
    root and the environment made its parents; the build user owns P alone)."""
    if tree.placed or not req.build_path or req.build_path == tree.dir:
        return replace(tree, placed=True)
    log = steps.log
    where = req.build_path
    log.section(f"Build path {where}")
    # Paths and the user travel as arguments, never inside the script.
    script = (
        'set -f; d=$1; u=$2; t=$3; shift 3; p=""; IFS=/; '
        'for part in ${d#/}; do p="$p/$part"; '
        'if [ -L "$p" ]; then echo "$p is a symbolic link" >&2; exit 3; fi; done; unset IFS; '
        'if [ -e "$d" ] && [ ! -d "$d" ]; then echo "$d is not a directory" >&2; exit 3; fi; '
        'if [ -d "$d" ] && [ -n "$(ls -A -- "$d")" ]; then echo "$d is not empty" >&2; exit 3; fi; '
        'mkdir -p -- "$d" && chmod 0770 -- "$d" && mv -- "$t" "$d/" && cp -p -- "$@" "$d/" && '
        'chown -R -- "$u:$u" "$d"'
    )
    sources = [f"{tree.dir}/{p.name}" for p in pkg.paths()]
    status = steps.run(["sh", "-c", script, "place", where, user, tree.path, *sources])
    if status != 0:
        said = steps.failure("making the build path", status)
        raise BuildInputError(f"--build-path {where}: {said}")
    moved = f"{where}/{posixpath.basename(tree.path)}"
    # A build path the session does not keep (a file system of each
    # command's own) is found out now, not as a missing tree later.
    if steps.run(["test", "-d", moved]) != 0:
        raise BuildInputError(
            f"--build-path {where}: not kept between commands in this environment "
            "(a temporary file system?); choose a path under /build"
        )
    log.line(f"Moved {tree.path} to {moved}")
    return Tree(moved, where, tree.version, placed=True)


@dataclass(frozen=True)
class Built:
    tree: str  # the build tree inside
    failed: str | None = None  # which step failed and why; None when it succeeded
    seconds: float = 0.0  # the Build-Time of the log: 0 when dpkg-buildpackage did not run
    space: int = 0  # bytes of the build tree after the build
    # The build's environment: --shell-on-failure's shell gets it, so the
    # failed step can be run again as it ran.
    env: Mapping[str, str] = field(default_factory=dict)
    dir: str = ""  # the build directory: where the results are


def build(
    steps: Steps,
    pkg: SourcePackage,
    user: str,
    req: BuildRequest,
    tree: Tree | None = None,
    arch: Arches | None = None,
) -> Built:
    """Run dpkg-buildpackage in the tree unpack() made (unpacked here for a
    caller that did not), at its --build-path; then --source-only-changes.
    `arch`: a cross build's architectures (None: a native build)."""
    backend, log = steps.backend, steps.log
    if tree is None:
        tree = unpack(steps, pkg, user, req)
    tree = place(steps, pkg, tree, user, req)
    log.section("Build")
    start = time.monotonic()
    # dpkg-buildpackage writes its results beside the tree.
    if user != "root" and steps.run(["chown", f"{user}:{user}", tree.dir]) != 0:
        raise NsbuildError("cannot hand the build directory to the build user")
    status, text = backend.check_output(
        ["dpkg-parsechangelog", "-STimestamp"], user=user, cwd=tree.path
    )
    epoch = text.strip()
    if status != 0 or not epoch.isdigit():
        log.line(f"cannot read the changelog's date: {text.strip()}")
        return Built(tree.path, f"cannot read the changelog's date (exit status {status}); "
                     "see the log", dir=tree.dir)  # fmt: skip
    env = build_env(epoch, user, req, arch)
    for name in ("SOURCE_DATE_EPOCH", "DEB_BUILD_OPTIONS", "DEB_BUILD_PROFILES", "CONFIG_SITE"):
        if name in env:
            log.line(f"{name}={env[name]}")
    argv = dpkg_buildpackage_argv(req, arch)
    # The package's own code runs here: unprivileged, no network.
    status = steps.run(argv, user=user, cwd=tree.path, network="none", env=env)
    took = time.monotonic() - start
    _, text = backend.check_output(["du", "-sk", tree.path])
    space = 0
    with contextlib.suppress(ValueError, IndexError):
        space = int(text.split()[0]) * 1024
    failed = steps.failure("dpkg-buildpackage", status) if status != 0 else None
    log.line()
    log.line(f"dpkg-buildpackage exit status: {status}")
    if failed is None and source_only_changes(pkg, tree, req) is not None:
        failed = _source_only_changes(steps, pkg, tree, user, req, env)
    return Built(tree.path, failed, took, space, env, tree.dir)


def source_only_changes(pkg: SourcePackage, tree: Tree, req: BuildRequest) -> str | None:
    """The name of the extra source-only .changes --source-only-changes asks
    for; None when not asked for, or when the build's own .changes is one."""
    if not req.source_only_changes or binnmu.build_type(req) == "source":
        return None
    return f"{pkg.source}_{tree.version}_source.changes"


def _source_only_changes(steps: Steps, pkg: SourcePackage, tree: Tree, user: str,
                         req: BuildRequest, env: Mapping[str, str]) -> str | None:  # fmt: skip
    """sbuild's --source-only-changes: dpkg-genchanges --build=source with the
    options of the build's own .changes. Returns what failed, or None."""
    name = source_only_changes(pkg, tree, req)
    assert name is not None
    argv = ["dpkg-genchanges", "--build=source", *_changes_options(req), f"-O../{name}"]
    status = steps.run(argv, user=user, cwd=tree.path, network="none", env=env)
    return steps.failure("dpkg-genchanges --build=source", status) if status != 0 else None


def _changes_options(req: BuildRequest) -> list[str]:
    """What the build's .changes was made with, for another one (sbuild's
    get_changes_opts: -m, -e, -v, -C, -s[iad] and --changes-option)."""
    opts = _signing_options(req)
    for opt in req.debbuildopts:
        if opt.startswith("--changes-option="):
            opts.append(opt.removeprefix("--changes-option="))
        elif opt in ("-si", "-sa", "-sd") or opt.startswith(("-m", "-e", "-v", "-C")):
            opts.append(opt)
    return opts


def _signing_options(req: BuildRequest) -> list[str]:
    opts = [f"-m{req.maintainer}"] if req.maintainer else []
    opts += [f"-e{req.uploader}"] if req.uploader else []
    # -d: the .changes' Distribution, whatever the changelog says (as sbuild).
    opts += [f"-DDistribution={req.dist}"] if req.dist else []
    return opts


def dpkg_buildpackage_argv(req: BuildRequest, arch: Arches | None = None) -> list[str]:
    """dpkg-buildpackage's command line: nsbuild's, sbuild's options
    (-a, -P, -m, -e, -d), then --debbuildopts in the order given."""
    argv = ["dpkg-buildpackage", "-us", "-uc", f"--build={binnmu.build_type(req)}"]
    if arch is not None and arch.cross:
        argv.append(f"-a{arch.host}")
    if not req.clean_source and req.input.is_dir():
        argv.append("--no-pre-clean")  # the tree as it is: what clean would remove too
    profiles = build_profiles(req)
    if profiles:
        argv.append("-P" + ",".join(profiles))
    signing = _signing_options(req)
    argv += [o for o in signing if o.startswith(("-m", "-e"))]
    argv += [f"--changes-option={o}" for o in signing if o.startswith("-D")]
    return [*argv, *req.debbuildopts]


def build_profiles(req: BuildRequest) -> list[str]:
    """-P's profiles, else the caller's DEB_BUILD_PROFILES (sbuild's default)."""
    given = req.profiles or (os.environ.get("DEB_BUILD_PROFILES", ""),)
    return [p for item in given for p in item.replace(",", " ").split()]


def build_env(epoch: str, user: str, req: BuildRequest,
              arch: Arches | None = None) -> dict[str, str]:  # fmt: skip
    """The build's environment: nothing of the caller's but DEB_BUILD_OPTIONS
    and the profiles; a cross build's additions (cross.build_env)."""
    env = {
        "SOURCE_DATE_EPOCH": epoch,
        "DEB_BUILD_OPTIONS": build_options(req.jobs),
        "HOME": BUILD_HOME,
        "USER": user,
        "LOGNAME": user,
        "LC_ALL": "C.UTF-8",
        "TZ": "UTC",
    }
    profiles = build_profiles(req)
    if profiles:
        env["DEB_BUILD_PROFILES"] = " ".join(profiles)
    if arch is not None:
        env = cross_env(arch, env, "DEB_BUILD_OPTIONS" in os.environ)
    return env


def build_options(jobs: int | None) -> str:
    """DEB_BUILD_OPTIONS: the caller's; parallel= set to `jobs` when given,
    else the caller's own parallel= kept (as sbuild), else the CPUs."""
    given = os.environ.get("DEB_BUILD_OPTIONS", "").split()
    if jobs is None and any(o.startswith("parallel=") for o in given):
        return " ".join(given)
    opts = [o for o in given if not o.startswith("parallel=")]
    return " ".join([*opts, f"parallel={jobs or os.cpu_count() or 1}"])


def shell(steps: Steps, user: str, tree: str, env: Mapping[str, str] | None = None) -> None:
    """The shell --shell-on-failure asked for, in the failed build tree, with
    the build's environment. It talks to the terminal (else nsbuild's stdin
    and stderr): never to stdout, which may carry --json."""
    shell_env = dict(env or {"HOME": BUILD_HOME, "USER": user, "LOGNAME": user})
    shell_env["PS1"] = "(nsbuild: failed build) \\w\\$ "
    if term := os.environ.get("TERM"):
        shell_env.setdefault("TERM", term)
    with _terminal() as (fin, fout):
        steps.backend.run(
            ["/bin/bash", "-i"],
            user=user,
            cwd=tree,
            network="none",
            env=shell_env,
            # The one run that reads the user's terminal: the shell asked for.
            stdin=fin,
            stdout=fout,
            stderr=fout,
        )


@contextlib.contextmanager
def _terminal() -> Iterator[tuple[int, int]]:
    """(input, output) of an interactive shell: the controlling terminal,
    else nsbuild's stdin and stderr."""
    fd = open_terminal()
    if fd is None:
        sys.stderr.flush()
        yield 0, 2
        return
    try:
        yield fd, fd
    finally:
        os.close(fd)
