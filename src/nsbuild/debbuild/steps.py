"""The commands of a build, each run in its session with its output in the log."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nsbuild.backends import STDOUT, Backend
from nsbuild.debbuild.log import BuildLog
from nsbuild.printable import printable


def open_terminal() -> int | None:
    """The user's terminal, open for an interactive shell inside; None without one."""
    try:
        return os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None


@dataclass
class Steps:
    """The session as the phases use it: its backend and the build's log."""

    backend: Backend
    log: BuildLog
    # Where the output of the last command run begins in the log.
    output_start: int = 0

    def run(self, argv: Sequence[str], *, limit: int | None = None, **kw: Any) -> int:
        """Run a command with its output in the log (its first `limit` bytes,
        when given), after a line naming it."""
        start = self._said(argv)
        self.output_start = self.log.path.stat().st_size
        with self.log.command_output(limit) as output:
            status = self.backend.run(argv, stdout=output, stderr=STDOUT, **kw)
        self._exited(argv, status, start)
        return status

    def ask(self, argv: Sequence[str], **kw: Any) -> tuple[int, str]:
        """Run a command for its output (stdout and stderr), named in the log."""
        start = self._said(argv)
        status, text = self.backend.check_output(argv, stderr=STDOUT, **kw)
        self._exited(argv, status, start)
        return status, text

    def _said(self, argv: Sequence[str]) -> float:
        self.log.line(f"$ {' '.join(argv)}")
        return time.monotonic()

    def _exited(self, argv: Sequence[str], status: int, start: float) -> None:
        # Each step's duration: where a phase's time goes, read from the log.
        self.log.line(f"[nsbuild: {argv[0]} exited {status} after {time.monotonic() - start:.1f}s]")

    def failure(self, step: str, status: int, first: str | None = None) -> str:
        """What a failed step says: its name, and the last line of output of
        the last command (where dpkg's tools say why they stop), or the first
        line starting with `first` (apt's first "E: " names the cause, its
        last sums up), escaped: the package or the mirror chose it."""
        tool = step.split()[0]
        with open(self.log.path, "rb") as f:
            start = max(self.output_start, f.seek(0, os.SEEK_END) - 4096)
            f.seek(start)
            lines = f.read().decode(errors="surrogateescape").splitlines()
        # The log's own line after each command ("[nsbuild: ... exited ...]").
        said = [ln for ln in lines if ln.strip() and not ln.startswith("[nsbuild: ")]
        if not said:
            return f"{step} failed (exit status {status}); see the log"
        chosen = [ln for ln in said if first and ln.startswith(first)] or said[-1:]
        last = chosen[0].strip().removeprefix(f"{tool}: error: ")
        return f"{step} failed: {printable(last, 300)}"
