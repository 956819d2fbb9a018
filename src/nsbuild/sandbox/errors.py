"""Sandbox runtime errors. Kept free of imports from layers above."""

from __future__ import annotations

import errno as _errno

from nsbuild.errors import NsbuildError

_HINTS: dict[int, str] = {
    _errno.ENOSPC: "mount or namespace limit reached (see /proc/sys/user/max_*_namespaces "
    "and /proc/sys/fs/mount-max)",
}


class SandboxError(NsbuildError):
    """The sandbox could not be set up or run: nsbuild's failure, not the command's."""


class NotRunning(SandboxError):
    """The process to enter is gone (or its PID now names another process)."""


class SetupError(SandboxError):
    """A named setup step failed; carries the step, path and errno."""

    def __init__(self, step: str, err: int, path: str | None = None, hint: str | None = None):
        self.step = step
        self.errno = err
        self.path = path
        self.hint = hint or _HINTS.get(err)
        where = f" {path}" if path else ""
        msg = f"{step}{where}: {_errno.errorcode.get(err, str(err))} ({_strerror(err)})"
        if self.hint:
            msg += f"; hint: {self.hint}"
        super().__init__(msg)


def _strerror(err: int) -> str:
    import posix

    return posix.strerror(err)
