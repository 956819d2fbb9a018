"""Which environment a build runs in when the user names none.

`nsbuild build` without `--env` builds for the distribution of the newest
changelog entry, as sbuild does. The distribution is looked up as an
environment name or alias (a chroot.d entry with `Aliases: UNRELEASED` takes
work in progress, as with schroot); the common upload targets that are not
suites of their own map onto the suite they build against (envs/suites.py):
UNRELEASED, sid, experimental onto unstable, bookworm-backports and the like
onto bookworm. Where the target's own archive is not in that suite's
environment, the note says the --extra-repository that adds it.

When no configured environment matches and the suite is a Debian suite
(distro-info's list, or a built-in one), the local backend's environment is
created on first use with mmdebstrap, its progress shown on stderr, under a
lock so that two builds starting together create it once. Before it starts,
the user is told what it makes, where, how big it gets and how to say no
(`--no-create`, which is `resolve(create=False)`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from nsbuild.debbuild.errors import BuildInputError

# Archives an environment of the base suite lacks (mmdebstrap adds -security
# and -updates to stable suites itself); experimental's packages sit beside
# unstable's.
_OWN_ARCHIVE = ("-backports-sloppy", "-backports", "-proposed-updates")
_ARCHIVE = "http://deb.debian.org/debian"
# What a created environment costs on disk, measured on a bookworm buildd
# amd64 base made by `nsbuild env create` (445 MB tarball, 436 MB unpacked).
SIZE_TEXT = "about 450 MB of tarball and as much again unpacked"


@dataclass(frozen=True)
class Choice:
    """The environment to build in: `name` to look up, else one named after
    `suite` (created from that suite when missing)."""

    name: str
    suite: str
    # Other names the lookup tries, in order, before creating anything.
    fallbacks: tuple[str, ...] = ()
    # Said after "DIST: building in ENV" when a fallback is used.
    hint: str | None = None
    # Aliases to give an environment created for it.
    aliases: tuple[str, ...] = ()
    # Where the name came from, for messages: the changelog, or -d.
    origin: str = "the changelog's distribution"


def choose(distribution: str | None) -> Choice:
    """Map a changelog distribution onto an environment name and a suite."""
    from nsbuild.envs.suites import DEFAULT_DISTRIBUTION, base_suite

    dist = (distribution or "").strip() or DEFAULT_DISTRIBUTION
    suite = base_suite(dist)
    hint = None
    if dist in ("experimental", "rc-buggy") or dist.endswith(_OWN_ARCHIVE):
        archive = "experimental" if dist == "rc-buggy" else dist
        hint = (
            f"{archive}'s own packages are not in it; add them with "
            f"--extra-repository 'deb {_ARCHIVE} {archive} main'"
        )
    if suite == "unstable":
        others = tuple(n for n in ("unstable", "sid") if n != dist)
        return Choice(dist, "unstable", others, hint, ("sid", "UNRELEASED"))
    if suite != dist:
        return Choice(dist, suite, (suite,), hint)
    return Choice(dist, dist)


def debian_suites() -> set[str]:
    """Names mmdebstrap can bootstrap from Debian's archive."""
    from nsbuild.envs.suites import debian_suites as suites

    return suites()


def resolve(
    choice: Choice, progress: IO[str] | None = sys.stderr, *, create: bool = True
) -> tuple[str, str | None]:
    """The name of an existing environment for `choice`, created first if need
    be and `create` allows it.

    Returns (environment name, note). Raises BuildInputError (exit 2) when
    nothing matches and nsbuild may not, or cannot, bootstrap the suite."""
    from nsbuild.envs.config import load_config

    found = _find(choice)
    if found is not None:
        return found, _note(choice, found)
    if choice.suite not in debian_suites():
        known = load_config().known()
        instead = f"give --env with one of: {known}; or " if known != "none" else ""
        raise BuildInputError(
            f"no environment for {choice.origin} {choice.name!r} and it is "
            f"not a Debian suite nsbuild can create: {instead}create one with: "
            f"{create_command(choice)}"
        )
    if not create:
        raise BuildInputError(
            f"no environment for {choice.origin} {choice.name!r}: create it "
            f"with: {create_command(choice)}"
        )
    # The created environment is named after the suite: a backports upload
    # builds in "bookworm", which serves plain bookworm uploads too.
    name = choice.suite
    with _creation_lock(name):
        # Another build may have made it while we waited for the lock.
        found = _find(choice)
        if found is not None:
            return found, _note(choice, found)
        taken = {n for env in load_config() for n in (env.name, *env.aliases)}
        aliases = tuple(a for a in choice.aliases if a not in taken and a != name)
        _create(name, choice.suite, aliases, progress)
    return name, _note(choice, name)


def create_command(choice: Choice) -> str:
    """The command that makes an environment `resolve` finds for `choice`."""
    import shlex

    from nsbuild.envs.suites import DEFAULT_DISTRIBUTION

    if choice.suite not in debian_suites():
        # Named after the distribution: found by that name next time.
        return (f"nsbuild env create {shlex.quote(choice.name)} "
                f"--suite {DEFAULT_DISTRIBUTION}")  # fmt: skip
    return f"nsbuild env create {shlex.quote(choice.suite)} --suite {shlex.quote(choice.suite)}"


def _find(choice: Choice) -> str | None:
    from nsbuild.envs.config import load_config

    config = load_config()
    for name in (choice.name, *choice.fallbacks):
        env = config.find(name)
        if env is not None:
            return env.name
    return None


def _note(choice: Choice, used: str) -> str | None:
    if used == choice.name:
        return None
    return f"{choice.name}: building in {used}" + (f" ({choice.hint})" if choice.hint else "")


@contextlib.contextmanager
def _creation_lock(name: str) -> Iterator[None]:
    from nsbuild.envs.paths import private_cache_dir
    from nsbuild.envs.store import locked_file

    with locked_file(private_cache_dir() / "locks" / f"create-{name}.lock"):
        yield


def _create(name: str, suite: str, aliases: tuple[str, ...], progress: IO[str] | None) -> None:
    from nsbuild.envs.create import create_env

    def say(text: str) -> None:
        if progress is not None:
            print(f"nsbuild: {text}", file=progress, flush=True)

    from nsbuild.envs.create import DEFAULT_MIRROR
    from nsbuild.envs.paths import Layout

    say(
        f"no environment {name!r} yet: creating it once with mmdebstrap, Debian {suite} "
        f"from {DEFAULT_MIRROR}, in {Layout.default().tarballs}/{name}.tar ({SIZE_TEXT}; "
        "a few minutes; progress follows); --no-create refuses instead"
    )
    start = time.monotonic()
    # mmdebstrap reports on both of its streams; stdout is reserved for the
    # build's own output (--json), so its output joins stderr.
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        env = create_env(name, suite, aliases=aliases, quiet=progress is None)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    took = time.monotonic() - start
    say(f"created environment {env.name!r} in {took:.0f}s ({env.path}); next builds reuse it")
