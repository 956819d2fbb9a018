"""The network layer's error: one clear line, raised before anything runs."""

from nsbuild.errors import NsbuildError


class NetError(NsbuildError):
    """A network policy error, explained in one line."""
