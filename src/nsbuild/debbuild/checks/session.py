"""A check's own session: a fresh one of the build's environment, opened as
the driver opens the build's, with the build's results copied in."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from nsbuild.backends import Backend, BackendOptions, open_backend
from nsbuild.debbuild.phases import BUILD_USER, add_build_user
from nsbuild.debbuild.result import BuildRequest
from nsbuild.debbuild.steps import Steps
from nsbuild.errors import NsbuildError


class CheckError(NsbuildError):
    """A check could not run (not: it found a problem)."""


def open_session(req: BuildRequest, environment: str) -> Backend:
    """A fresh session of the build's environment, through the build's backend."""
    return open_backend(
        req.backend,
        BackendOptions(
            env=environment,
            args=req.backend_args,
            caches=("apt-lists", "apt-archives") if req.use_cache else (),
            debug=req.debug,
            extra={"egress-engine": req.egress_engine},
        ),
    )


def copy_results_in(backend: Backend, files: Iterable[Path], folder: str) -> list[str]:
    """Private copies of the build's results in `folder` inside, each bounded
    by the size it has now; their paths inside."""
    inside = []
    for path in files:
        dest = f"{folder}/{path.name}"
        backend.copy_in(path, dest, limit=path.stat().st_size)
        inside.append(dest)
    return inside


def check_user(steps: Steps) -> str:
    """The unprivileged user a check runs the package's files through, as
    sbuild runs lintian as its build user; root where the backend has no other."""
    if not steps.backend.capabilities.unprivileged_user:
        return "root"
    if not add_build_user(steps, "nsbuild check user"):
        raise CheckError("cannot create the check user inside; see the log")
    return BUILD_USER


def read_output(steps: Steps, limit: int = 16 << 20) -> str:
    """What the last command run through `steps` wrote into the log (its
    first `limit` bytes), for the check to read; the log holds all of it."""
    with open(steps.log.path, "rb") as f:
        f.seek(steps.output_start)
        return f.read(limit).decode(errors="replace")
