"""Which environment a build runs in, and what it is: settled before the
build says anything else."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import IO

from nsbuild.backends import Backend
from nsbuild.debbuild.dsc import SourcePackage
from nsbuild.debbuild.result import BuildRequest
from nsbuild.envs.arches import ARCH_RE
from nsbuild.errors import NsbuildError
from nsbuild.printable import printable


def environment(
    req: BuildRequest, pkg: SourcePackage, stream: IO[str] | None, say: Callable[[str], None]
) -> tuple[str, str | None]:
    """(name, note): the environment --env names, refused at once when the
    local backend has none of that name (naming the known ones); else the one
    named after the distribution (-d, else the changelog's), for the local
    backend created on first use (`stream` shows mmdebstrap's progress).
    The note says which environment serves another distribution."""
    from nsbuild.debbuild.distribution import choose, resolve

    if req.env:
        if req.backend == "local":
            from nsbuild.envs.config import load_config

            # An alias names the environment: results and logs say its name.
            return load_config().get(req.env).name, None
        return req.env, None
    choice = choose(req.dist or pkg.distribution())
    if req.dist:
        choice = dataclasses.replace(choice, origin="-d's distribution")
    # Environments are the local backend's: another backend gets the name
    # and makes of it what it can.
    if req.backend != "local":
        return choice.name, None
    name, note = resolve(choice, stream, create=req.create_env)
    if note:
        say(note)
    return name, note


def architecture(backend: Backend) -> str:
    """The environment's architecture, as dpkg inside says it: a name dpkg
    could give, never longer (it names the build's files)."""
    status, text = backend.check_output(["dpkg", "--print-architecture"])
    arch = text.strip()
    if status != 0 or not ARCH_RE.match(arch):
        raise NsbuildError("cannot learn the environment's architecture: dpkg --print-architecture"
                           f" said '{printable(arch, 80)}' (exit status {status})")  # fmt: skip
    return arch
