"""External commands at sbuild's stages (`man sbuild`, EXTERNAL COMMANDS).

A stub until filled in: the driver calls `Hooks.run(stage)` at each stage;
nothing runs yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nsbuild.debbuild.result import BuildRequest
from nsbuild.debbuild.steps import Steps

# In the order a build meets them.
STAGES = (
    "pre-build",  # outside, as the user, %e available
    "chroot-setup",  # inside, root
    "build-deps-failed",  # inside, root
    "starting-build",  # inside, root
    "build-failed",  # inside, root
    "finished-build",  # inside, root
    "chroot-cleanup",  # inside, root, %c available
    "post-build",  # outside, as the user, %c and %e available
    "post-build-failed",  # outside, as the user, %c and %e available
)


@dataclass
class Facts:
    """What the percent escapes stand for; None where not known yet."""

    dsc: Path | None = None  # %d: the host's .dsc
    build_dir: str | None = None  # %b: the build directory inside
    pkgbuild_dir: str | None = None  # %p: the unpacked source tree inside
    host_arch: str | None = None  # %a
    build_arch: str | None = None  # %SBUILD_BUILD_ARCH
    changes: str | None = None  # %c: the .changes, once the build made one
    extra: dict[str, str] = field(default_factory=dict)


class Hooks:
    """The request's external commands, run stage by stage in `steps`' session."""

    def __init__(self, req: BuildRequest, steps: Steps, facts: Facts) -> None:
        self.req = req
        self.steps = steps
        self.facts = facts

    def run(self, stage: str) -> None:
        """Run the commands of `stage`, in order; raises BuildFailed when one fails
        at a stage where sbuild's would end the build."""
        assert stage in STAGES, stage

    def close(self) -> None:
        """Stop whatever serves the exec escape; idempotent."""
