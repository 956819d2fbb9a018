"""Errors shared by every layer. Libraries raise; only the command line maps
them to exit statuses (nsbuild.cli.exits)."""


class NsbuildError(Exception):
    """A failure nsbuild explains in one line."""
