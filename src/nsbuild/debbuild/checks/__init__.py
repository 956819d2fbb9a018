"""Checks after a successful build: lintian, autopkgtest, an install check.

Each runs in a fresh session of the build's environment, after the results
were delivered, with its own section in the .build log. A stub until filled in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nsbuild.debbuild.log import BuildLog
from nsbuild.debbuild.result import BuildRequest, CheckResult


@dataclass(frozen=True)
class CheckInputs:
    req: BuildRequest
    environment: str  # the build's environment name
    architecture: str
    changes: Path  # the delivered .changes, in --out
    artifacts: tuple[Path, ...]  # every delivered file, in --out
    log: BuildLog  # the build's .build log, still open
    say: Callable[[str], None]  # a progress line on the terminal


def run_checks(inputs: CheckInputs) -> list[CheckResult]:
    """Run the checks the request asks for, in sbuild's order (lintian,
    piuparts, autopkgtest); never raises for a check's own failure."""
    return []
