"""Errors shared by every layer. Libraries raise; only cli.main() maps them to
exit statuses."""


class NsbuildError(Exception):
    """A failure nsbuild explains in one line. `exit_status` is what main() exits with."""

    exit_status = 2
