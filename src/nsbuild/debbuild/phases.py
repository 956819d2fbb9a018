"""The Prepare and Build phases: the source copied in, then built by an
unprivileged user with no network, at a fixed path /build/PKG-VERSION."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from nsbuild.debbuild.dsc import SourcePackage
from nsbuild.debbuild.result import BuildRequest
from nsbuild.debbuild.steps import Steps
from nsbuild.errors import NsbuildError

BUILD_USER = "nsbuild"
BUILD_UID = 2000


def prepare(steps: Steps, pkg: SourcePackage, extras: tuple[Path, ...]) -> str:
    """Make the build user and copy the source in; returns the user to build as."""
    backend, log = steps.backend, steps.log
    log.section("Prepare")
    work = backend.work_dir
    user = "root"
    if backend.capabilities.unprivileged_user:
        user = BUILD_USER
        # A build user with no home (as sbuild does: nothing leaks in from
        # one), added by hand: the environment need not have useradd.
        script = (
            f"grep -q '^{user}:' /etc/passwd || {{ "
            f"echo '{user}:x:{BUILD_UID}:{BUILD_UID}:nsbuild build user:"
            f"/nonexistent:/bin/sh' >> /etc/passwd && "
            f"echo '{user}:x:{BUILD_UID}:' >> /etc/group; }}"
        )
        if steps.run(["sh", "-c", script]) != 0:
            raise NsbuildError("cannot create the build user inside; see the log")
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
class Built:
    tree: str  # the build tree inside
    failed: str | None = None  # which step failed and why; None when it succeeded
    seconds: float = 0.0  # the Build-Time of the log: 0 when dpkg-buildpackage did not run
    space: int = 0  # bytes of the build tree after the build


def build(steps: Steps, pkg: SourcePackage, user: str, req: BuildRequest) -> Built:
    """Unpack the source and run dpkg-buildpackage."""
    backend, log = steps.backend, steps.log
    log.section("Build")
    work = backend.work_dir
    tree = f"{work}/{pkg.source}-{pkg.upstream_less_epoch}"
    start = time.monotonic()
    if user != "root":
        if steps.run(["chown", "-R", f"{user}:{user}", work]) != 0:
            raise NsbuildError("cannot hand the build directory to the build user")
    unpack = ["dpkg-source", "--no-check", "-x", pkg.dsc.name, tree]
    status = steps.run(unpack, user=user, cwd=work)
    if status != 0:
        return Built(tree, steps.failure("dpkg-source -x", status))
    status, text = backend.check_output(
        ["dpkg-parsechangelog", "-STimestamp"], user=user, cwd=tree
    )
    epoch = text.strip()
    if status != 0 or not epoch.isdigit():
        log.line(f"cannot read the changelog's date: {text.strip()}")
        return Built(tree, f"cannot read the changelog's date (exit status {status}); see the log")
    env = {
        "SOURCE_DATE_EPOCH": epoch,
        "DEB_BUILD_OPTIONS": build_options(req.jobs),
        "HOME": "/nonexistent",
        "USER": user,
        "LOGNAME": user,
        "LC_ALL": "C.UTF-8",
        "TZ": "UTC",
    }
    if os.environ.get("DEB_BUILD_PROFILES"):
        env["DEB_BUILD_PROFILES"] = os.environ["DEB_BUILD_PROFILES"]
    log.line(f"SOURCE_DATE_EPOCH={epoch}")
    log.line(f"DEB_BUILD_OPTIONS={env['DEB_BUILD_OPTIONS']}")
    argv = ["dpkg-buildpackage", "-us", "-uc", f"--build={req.build_type()}"]
    # The package's own code runs here: unprivileged, no network.
    status = steps.run(argv, user=user, cwd=tree, network="none", env=env)
    took = time.monotonic() - start
    _, text = backend.check_output(["du", "-sk", tree])
    space = 0
    with contextlib.suppress(ValueError, IndexError):
        space = int(text.split()[0]) * 1024
    failed = steps.failure("dpkg-buildpackage", status) if status != 0 else None
    log.line()
    log.line(f"dpkg-buildpackage exit status: {status}")
    return Built(tree, failed, took, space)


def build_options(jobs: int | None) -> str:
    """DEB_BUILD_OPTIONS: the caller's, with parallel= set to `jobs` (default: the CPUs)."""
    opts = [o for o in os.environ.get("DEB_BUILD_OPTIONS", "").split()
            if not o.startswith("parallel=")]  # fmt: skip
    return " ".join([*opts, f"parallel={jobs or os.cpu_count() or 1}"])


def shell(steps: Steps, user: str, tree: str) -> None:
    """The shell --shell-on-failure asked for, in the failed build tree."""
    steps.backend.run(
        ["/bin/bash", "-i"],
        user=user,
        cwd=tree,
        network="none",
        env={"PS1": "(nsbuild: failed build) \\w\\$ "},
        # The one run that reads the user's terminal: the shell asked for.
        stdin=0,
    )
