"""Errors of the environments layer.

`EnvError` is a usage or configuration error. The message is one line that
names the file, line or object at fault.
"""

from __future__ import annotations

from nsbuild.errors import NsbuildError


class EnvError(NsbuildError):
    """An environment, session or store operation failed; the message says why."""


class ConfigError(EnvError):
    """A chroot.d file is malformed: the message names the file and the line."""


class UnsafeTarball(EnvError):
    """A tarball has a member that could write outside its target directory."""


class CacheNotPrivate(EnvError):
    """The cache folder is a symlink, not a folder, or belongs to someone else."""
