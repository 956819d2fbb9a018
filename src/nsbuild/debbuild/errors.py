"""Errors of the build layer, each with the exit status `nsbuild build` ends with."""

from __future__ import annotations

from nsbuild.errors import NsbuildError


class BuildInputError(NsbuildError):
    """The input cannot be built: unreadable or malformed .dsc, missing or
    corrupted files, unknown environment. Found before any environment is used."""

    exit_status = 2


class BuildFailed(NsbuildError):
    """The package's own build failed; its log is kept."""

    exit_status = 1


class UnsatisfiableDependencies(NsbuildError):
    """apt could not satisfy the build dependencies; `unmet` names them."""

    exit_status = 3

    def __init__(self, message: str, unmet: tuple[str, ...] = ()) -> None:
        self.unmet = unmet
        super().__init__(message)


class BuildInterrupted(NsbuildError):
    """SIGINT (or SIGTERM) arrived; everything was torn down before this is raised."""

    exit_status = 130
