"""Make, upgrade and remove environments, without root.

Creation runs mmdebstrap in unshare mode (the tool the Debian world already
uses; nsbuild writes no bootstrapper) into the cache's tarballs folder, then
writes the chroot.d entry and unpacks the base once so the first use is fast.

Update is update.py's. Removal refuses while sessions use the environment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from nsbuild.envs.aptsources import apt_mirrors
from nsbuild.envs.arches import check_name, require_runnable
from nsbuild.envs.config import NAME_RE, EnvConfig, load_config, remove_entry, write_entry
from nsbuild.envs.errors import EnvError
from nsbuild.envs.owner import tmp_name
from nsbuild.envs.paths import Layout, user_config_dir
from nsbuild.envs.session import Session, end_session, list_sessions
from nsbuild.envs.store import layout_for, tarball_digest, use_base

DEFAULT_MIRROR = "http://deb.debian.org/debian"


def host_architecture() -> str:
    try:
        out = subprocess.run(
            ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError) as e:
        raise EnvError(f"cannot tell the host architecture (dpkg --print-architecture): {e}") from e
    return out.stdout.strip()


def mmdebstrap_argv(
    suite: str,
    output: Path,
    *,
    architecture: str,
    variant: str = "buildd",
    mirror: str | None = None,
    include: Sequence[str] = (),
) -> list[str]:
    argv = [
        "mmdebstrap",
        "--mode=unshare",
        f"--variant={variant}",
        f"--architectures={architecture}",
        "--format=tar",
        # Device nodes cannot be made in a user namespace; the sandbox brings its own /dev.
        "--skip=output/mknod",
    ]
    if include:
        argv.append("--include=" + ",".join(include))
    argv += [suite, str(output)]
    if mirror:
        argv.append(mirror)
    return argv


def _check_subordinate_ids() -> None:
    """mmdebstrap's unshare mode maps 65536 ids and, without them, fails late
    with a bare status 25: say what is missing and how to add it, first."""
    from nsbuild.sandbox import caller_idmap
    from nsbuild.sandbox.idmap import INSIDE_IDS, caller_user, range_hint

    idmap = caller_idmap()
    if sum(r.count for r in idmap.uids) < INSIDE_IDS:
        user = caller_user()
        raise EnvError(
            f"nsbuild env create needs {INSIDE_IDS} subordinate ids for {user} in /etc/subuid "
            f"and /etc/subgid (mmdebstrap's unshare mode maps them); add them with "
            f"'{range_hint(user)}'"
        )


def create_env(
    name: str,
    suite: str,
    *,
    architecture: str | None = None,
    variant: str = "buildd",
    mirror: str | None = None,
    include: Sequence[str] = (),
    aliases: Sequence[str] = (),
    quiet: bool = False,
) -> EnvConfig:
    """Bootstrap `suite` with mmdebstrap, declare it as `name`, unpack it once."""
    if not NAME_RE.match(name):
        raise EnvError(f"bad environment name {name!r} (letters, digits, . _ + ~ -)")
    config = load_config()
    existing = config.find(name)
    if existing is not None:
        raise EnvError(f"environment {name!r} already exists ({existing.source})")
    # Checked before mmdebstrap's minutes: afterwards the entry would not parse.
    for alias in aliases:
        if not NAME_RE.match(alias):
            raise EnvError(f"bad alias {alias!r} (letters, digits, . _ + ~ -)")
        existing = config.find(alias)
        if existing is not None:
            raise EnvError(f"{alias!r} already names environment {existing.name!r} "
                           f"({existing.source}): choose another alias")  # fmt: skip
    if shutil.which("mmdebstrap") is None:
        sudo = "" if os.getuid() == 0 else "sudo "
        raise EnvError(f"mmdebstrap not found: install it with '{sudo}apt install mmdebstrap'")
    if architecture is not None:
        check_name(architecture, "--arch")
    arch = architecture or host_architecture()
    # Before mmdebstrap's minutes: without an emulator, it would fail late
    # with "Exec format error" in its first maintainer script.
    require_runnable(arch, name)
    _check_subordinate_ids()
    layout = Layout.default()
    layout.ensure()
    tarball = layout.tarballs / f"{name}.tar"
    tmp = layout.tarballs / f"{tmp_name()}.tar"
    argv = mmdebstrap_argv(
        suite, tmp, architecture=arch, variant=variant, mirror=mirror, include=include
    )
    try:
        status = subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL if quiet else None
        ).returncode
        if status != 0:
            raise EnvError(f"mmdebstrap failed with status {status}: {' '.join(argv)}")
        os.replace(tmp, tarball)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    env = EnvConfig(
        name=name,
        type="tarball",
        path=tarball,
        aliases=tuple(aliases),
        description=f"Debian {suite} {variant} {arch}, made by nsbuild env create",
        suite=suite,
        architecture=arch,
        mirrors=(mirror or DEFAULT_MIRROR,),
    )
    # Declared before the first unpack: should that fail (a full disk), the
    # tarball is not orphaned and the next use retries the unpack only.
    write_entry(env)
    with use_base(env, quiet=quiet) as base:
        # Record every archive apt will talk to (mmdebstrap adds -security and
        # -updates for stable suites): `--net allow` lets exactly these through.
        mirrors = apt_mirrors(base.root) or env.mirrors
    write_entry(dataclasses.replace(env, mirrors=mirrors))
    return load_config().get(name)


def remove_env(name: str, keep_tarball: bool = False, force: bool = False) -> list[str]:
    """Forget `name`: its chroot.d file, its tarball if nsbuild made it, its unused base.

    Refused while sessions use it, unless `force`: then the sessions no
    command runs in are ended first; the others, and the base under them,
    stay until they end (`nsbuild gc` frees the base then)."""
    env = load_config().get(name)
    if env.name != name:
        raise EnvError(
            f"{name!r} is an alias of {env.name!r}: remove the environment by its name: "
            f"nsbuild env remove {shlex.quote(env.name)}"
        )
    file = env.source.rsplit(":", 1)[0]
    if not file.startswith(str(user_config_dir())):
        raise EnvError(f"environment {name!r} is declared in {file}: remove it there")
    users = sorted((s for s in list_sessions() if s.config.name == env.name and s.alive()),
                   key=lambda s: s.id)  # fmt: skip
    if users and not force:
        raise EnvError(f"environment {name!r} is used by {_plural(len(users), 'session')} "
                       f"{', '.join(s.id for s in users)}; nothing removed: "
                       f"{_how_to_free(users)} (or give --force)")  # fmt: skip
    done = [_end_for_removal(s) for s in users]
    done.append(f"removed {remove_entry(env)}")
    layout = layout_for(env)
    digest: str | None = None
    if env.type == "tarball" and env.path and env.path.exists():
        with contextlib.suppress(EnvError):
            digest = tarball_digest(layout, env.path)
        if not keep_tarball and env.path.parent == layout.tarballs:
            env.path.unlink()
            done.append(f"removed {env.path}")
    if digest:
        from nsbuild.envs.cleanup import remove_unused_base

        if remove_unused_base(layout, digest):
            done.append(f"removed its unpacked base {digest[:12]}")
        elif any(line.startswith("kept session") for line in done):
            done.append(
                "kept its unpacked base: sessions still use it; nsbuild gc frees it once they end"
            )
    return done


def _plural(n: int, word: str) -> str:
    return word if n == 1 else f"{word}s"


def _how_to_free(users: list[Session]) -> str:
    """What ends the sessions that hold an environment: `session end` for
    persistent ones; a throw-away one ends with the process that made it (a
    build, a run), which `session end` must not pull the tree from under."""
    ended = [s.id for s in users if s.kind == "persistent"]
    pids = sorted({str(s.owner.pid) for s in users if s.kind != "persistent" and s.owner})
    parts = []
    if ended:
        them = "them" if len(ended) > 1 else "it"
        parts.append(f"end {them} with: nsbuild session end {' '.join(ended)}")
    if pids:
        parts.append(f"wait for {_plural(len(pids), 'process')} {', '.join(pids)} to finish")
    return "; ".join(parts)


def _end_for_removal(session: Session) -> str:
    """End one session of an environment being removed by force, or say why it stays."""
    if session.kind != "persistent":
        pid = session.owner.pid if session.owner else "?"
        return (
            f"kept session {session.id}: its process {pid} is running; "
            "it goes when that process ends"
        )
    try:
        end_session(session.id)
    except EnvError:
        return (
            f"kept session {session.id}: a command is running in it; "
            f"end it later with: nsbuild session end {session.id}"
        )
    return f"ended session {session.id}"
