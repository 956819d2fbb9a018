"""Errors of the build layer, one class per way a build ends badly; the
command line gives each its exit status (nsbuild.cli.exits)."""

from __future__ import annotations

from nsbuild.errors import NsbuildError


class BuildInputError(NsbuildError):
    """The input cannot be built: unreadable or malformed .dsc, missing or
    corrupted files, unknown environment. Found before any environment is used."""


class BuildFailed(NsbuildError):
    """The package's own build failed; its log is kept."""


class UnsatisfiableDependencies(NsbuildError):
    """apt could not satisfy the build dependencies; `unmet` names them."""

    def __init__(self, message: str, unmet: tuple[str, ...] = ()) -> None:
        self.unmet = unmet
        super().__init__(message)


class DiskFull(NsbuildError):
    """The disk of nsbuild's cache filled, and not through the package's own
    build: nsbuild's, or apt's, writes failed."""


class BuildInterrupted(NsbuildError):
    """SIGINT (or SIGTERM) arrived; everything was torn down before this is raised."""
