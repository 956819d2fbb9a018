"""nsbuild's exit statuses, and the one table that maps errors to them.

Layers raise typed errors that say what went wrong; only the command line
turns an error into a number, here.

    0      success (`nsbuild build`: also when a check after the build
           failed, as sbuild by default; see the `check` lines on stderr
           and `checks` in --json)
    1      `nsbuild build`: the package's own build failed, or a result it
           made was refused (the log is kept); `nsbuild gc`: something was
           left that could not be removed
    2      usage or configuration error, bad input (any other nsbuild error)
    3      `nsbuild build`: the build dependencies cannot be satisfied
    125    nsbuild's own failure setting up a sandbox or a backend, not the
           command's (the convention of podman and docker), or the disk of
           its cache filled
    126    the command is not executable
    127    the command was not found
    128+N  the command was killed by signal N
    130    interrupted (SIGINT)
    other  the command's own status

126, 127 and 128+N come from the sandbox runtime, which reports how the
command ended as a shell does (and 125 when one of its own processes dies
before it could say why); the rest from the errors below.
"""

from __future__ import annotations

from nsbuild.backends import UnknownBackend
from nsbuild.backends.errors import BackendError, CopyRefused
from nsbuild.debbuild.errors import (
    BuildFailed,
    BuildInterrupted,
    DiskFull,
    UnsatisfiableDependencies,
)
from nsbuild.errors import NsbuildError
from nsbuild.sandbox.errors import SandboxError

BUILD_FAILED = 1
USAGE = 2
UNSATISFIABLE = 3
SETUP_FAILED = 125
INTERRUPTED = 130

# An error's status is that of the first class of its MRO found here, so a
# subclass listed overrides its base.
STATUSES: dict[type[BaseException], int] = {
    NsbuildError: USAGE,
    ValueError: USAGE,  # a bad option or sandbox description: bad input
    SandboxError: SETUP_FAILED,
    BackendError: SETUP_FAILED,
    UnknownBackend: USAGE,
    CopyRefused: BUILD_FAILED,  # what the build made, not nsbuild, is at fault
    BuildFailed: BUILD_FAILED,
    UnsatisfiableDependencies: UNSATISFIABLE,
    DiskFull: SETUP_FAILED,
    BuildInterrupted: INTERRUPTED,
    KeyboardInterrupt: INTERRUPTED,
}


def exit_status(err: BaseException) -> int:
    """The status nsbuild exits with after `err`; an error outside the table
    is nsbuild's own failure (125)."""
    for cls in type(err).__mro__:
        status = STATUSES.get(cls)
        if status is not None:
            return status
    return SETUP_FAILED
