"""What a backend raises when it, not the command it ran, fails."""

from __future__ import annotations

from nsbuild.errors import NsbuildError


class BackendError(NsbuildError):
    """The backend itself failed (not the command it ran)."""


class CopyRefused(BackendError):
    """A copy out was refused: a symlink, a special file, or a path escaping the
    directory the caller allowed."""
