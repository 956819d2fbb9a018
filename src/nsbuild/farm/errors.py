"""Errors of the farm: one line each, exit status 2 (as every NsbuildError)."""

from __future__ import annotations

from nsbuild.errors import NsbuildError


class FarmError(NsbuildError):
    """A farm command cannot do what it was asked; the message says why."""
