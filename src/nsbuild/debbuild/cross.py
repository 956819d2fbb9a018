"""Cross-building: the build architecture is the environment's, the host
architecture (what the packages are for) is --host-arch's. sbuild's rules,
applied once the environment's architecture is known:

    --build=ARCH        only the environment's own (else: pick one of ARCH)
    arch-all            off unless chosen (-A, --no-arch-all, the file)
    profiles            `cross nocheck` unless -P (or DEB_BUILD_PROFILES)
    DEB_BUILD_OPTIONS   nocheck, unless the caller set DEB_BUILD_OPTIONS
    CONFIG_SITE         /etc/dpkg-cross/cross-config.ARCH
    core dependencies   crossbuild-essential-ARCH:native, libc-dev:ARCH,
                        libstdc++-dev:ARCH (sbuild's, for bug #815172)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from nsbuild.debbuild.errors import BuildInputError
from nsbuild.debbuild.result import BuildRequest
from nsbuild.debbuild.steps import Steps
from nsbuild.printable import printable

DEFAULT_PROFILES = ("cross", "nocheck")


@dataclass(frozen=True)
class Arches:
    """The build's two architectures, as dpkg names them."""

    build: str  # where it builds: the environment's dpkg
    host: str  # what the packages are for

    @property
    def cross(self) -> bool:
        return self.build != self.host

    def describe(self) -> str:
        return f"cross-building for {self.host} on {self.build}" if self.cross else ""


def arches(req: BuildRequest, env_arch: str, env_name: str) -> Arches:
    """The build's architectures on an environment of `env_arch`; a --build
    of another architecture is refused in one line saying how to get one."""
    if req.build_arch is not None and req.build_arch != env_arch:
        name = printable(req.build_arch, 40)
        raise BuildInputError(
            f"--build={name}: the environment {env_name} is {env_arch}, and nsbuild builds "
            f"on the environment's architecture; for {name}, make an environment of it "
            f"(nsbuild env create NAME --arch {name}) and pick it with -c NAME"
        )
    return Arches(env_arch, req.host_arch or env_arch)


def check_known(steps: Steps, host: str) -> None:
    """Refuse, in one line, a host architecture dpkg inside does not know:
    before any dependency is looked for."""
    status, text = steps.backend.check_output(["dpkg-architecture", "-L"])
    if status != 0:
        raise BuildInputError(
            "--host-arch: cannot list the architectures dpkg knows in this environment "
            f"(dpkg-architecture -L: exit status {status}; is dpkg-dev installed?)"
        )
    if host not in text.split():
        raise BuildInputError(
            f"--host-arch {printable(host, 40)}: not an architecture dpkg knows "
            "(dpkg-architecture -L lists them; e.g. arm64, armhf, i386)"
        )


def adjust(req: BuildRequest, arch: Arches) -> BuildRequest:
    """The request as a cross build runs it (sbuild's defaults); a native
    build's is unchanged."""
    if not arch.cross:
        return req
    new = dataclasses.replace(req, arch_all=req.arch_all and req.arch_all_given,
                              profiles=req.profiles or DEFAULT_PROFILES)  # fmt: skip
    if not (new.arch_any or new.arch_all or new.source):
        raise BuildInputError(
            "nothing to build: a cross build leaves out arch-all packages unless -A is "
            "given, and --no-arch-any was"
        )
    return new


def core_depends(arch: Arches) -> list[str]:
    """What a build needs besides the package's own dependencies."""
    core = ["build-essential", "fakeroot"]
    if not arch.cross:
        return core
    return [
        "build-essential:native",
        "fakeroot:native",
        f"crossbuild-essential-{arch.host}:native",
        f"libc-dev:{arch.host}",
        f"libstdc++-dev:{arch.host}",
    ]


def build_env(arch: Arches, env: dict[str, str], caller_set_options: bool) -> dict[str, str]:
    """The build environment with a cross build's additions: CONFIG_SITE for
    autoconf's cache values, and nocheck when the caller did not choose the
    options (sbuild's rule: the build's tests cannot run on this machine)."""
    if not arch.cross:
        return env
    out = dict(env, CONFIG_SITE=f"/etc/dpkg-cross/cross-config.{arch.host}")
    if not caller_set_options:
        opts = out.get("DEB_BUILD_OPTIONS", "").split()
        out["DEB_BUILD_OPTIONS"] = " ".join(["nocheck", *opts])
    return out
