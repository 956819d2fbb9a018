"""nsbuild: rootless, hermetic builds in Linux namespaces."""

__version__ = "0.1.0"
