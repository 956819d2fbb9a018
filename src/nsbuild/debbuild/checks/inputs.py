"""What every check after the build is given."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nsbuild.debbuild.log import BuildLog
from nsbuild.debbuild.result import BuildRequest


@dataclass(frozen=True)
class CheckInputs:
    req: BuildRequest
    environment: str  # the build's environment name
    architecture: str
    changes: Path  # the delivered .changes, in --out
    artifacts: tuple[Path, ...]  # every delivered file, in --out
    log: BuildLog  # the build's .build log, still open
    say: Callable[[str], None]  # a progress line on the terminal
    # The source package as the build checked it (the .dsc and its files):
    # lintian and autopkgtest need it when the .changes lists no source.
    source_files: tuple[Path, ...] = ()
    # What the packages are for, when not `architecture` (a cross build).
    host_architecture: str | None = None

    def cross(self) -> bool:
        return self.host_architecture not in (None, self.architecture)

    def source_in_changes(self) -> bool:
        return any(p.name.endswith(".dsc") for p in self.artifacts)

    def check_files(self) -> tuple[Path, ...]:
        """The results (the .changes and what it lists), and the source
        package when the .changes does not list it."""
        results = tuple(p for p in self.artifacts if not p.name.endswith(".build"))
        if self.source_in_changes():
            return results
        names = {p.name for p in results}
        return results + tuple(p for p in self.source_files if p.name not in names)

    def dsc(self) -> Path | None:
        return next((p for p in self.check_files() if p.name.endswith(".dsc")), None)
