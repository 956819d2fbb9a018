"""`nsbuild env update`: upgrade an environment's packages, without root.

apt runs in a throw-away session, with only the environment's mirrors
reachable (as a build's dependency phase). When it changed no package, the
tarball and its unpacked base stay as they are: every dependency layer built
on them stays valid. Otherwise the session is cleaned as mmdebstrap cleans a
new tarball (package lists, apt's caches, logs that make it unreproducible),
packed into a new tarball and renamed over the old one. Sessions and runs
already using the old base keep it (their overlay names its directory); it
is removed once unused.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from nsbuild.envs.config import EnvConfig, load_config
from nsbuild.envs.errors import EnvError
from nsbuild.envs.paths import private_cache_dir
from nsbuild.envs.session import Session, throwaway
from nsbuild.envs.store import (
    copy_tarball_atomically,
    layout_for,
    remember_digest,
    tarball_digest,
    use_base,
)

UPGRADE_SCRIPT = (
    "set -e; export DEBIAN_FRONTEND=noninteractive; apt-get update; "
    "apt-get -y -o Dpkg::Options::=--force-confold dist-upgrade; "
    "apt-get -y autoremove"
)
# What mmdebstrap's cleanup removes from a tarball it makes (run_cleanup):
# the package lists (an update with no sources empties them), apt's caches,
# logs and ids that would make the tarball differ from run to run, /run.
CLEANUP_SCRIPT = (
    "set -e; apt-get -o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts=/dev/null "
    "update; apt-get clean; rm -rf /var/lib/apt/lists/auxfiles; "
    "rm -f /var/log/dpkg.log /var/log/apt/history.log /var/log/apt/term.log "
    "/var/log/alternatives.log /var/cache/ldconfig/aux-cache /var/log/apt/eipp.log.xz "
    "/var/lib/dbus/machine-id; if [ -e /etc/machine-id ]; then : > /etc/machine-id; fi; "
    "find /run -mindepth 1 -maxdepth 1 ! -name lock -exec rm -rf {} +"
)
# dpkg's record of what is installed: an upgrade that leaves it as it was
# changed no package.
PACKAGES_DIGEST = ["sha256sum", "/var/lib/dpkg/status"]


@dataclass(frozen=True)
class Updated:
    env: EnvConfig
    base: str  # sha256 of the tarball now in place
    changed: bool  # False: nothing upgraded, tarball and base untouched


def update_env(name: str) -> Updated:
    """Upgrade with apt in a session; replace the tarball atomically if that changed anything."""
    env = load_config().get(name)
    if env.type != "tarball" or env.path is None:
        raise EnvError(f"environment {env.name!r} is of Type {env.type}: only tarballs can update")
    layout = layout_for(env)
    old = tarball_digest(layout, env.path)
    with throwaway(env) as session:
        before = _packages(session)
        status = _upgrade(session)
        if status != 0:
            raise EnvError(f"upgrading {env.name!r} failed (apt exit status {status})")
        if _packages(session) == before:
            return Updated(env, old, changed=False)
        _clean(session)
        digest = _pack(session, env.path)
    remember_digest(layout, env.path, digest)
    with use_base(env):
        pass
    if digest != old:
        from nsbuild.envs.cleanup import remove_unused_base

        remove_unused_base(layout, old)
    return Updated(env, digest, changed=True)


def update_net_log(env: EnvConfig) -> Path:
    """Where `update_env` writes the network log of its last run."""
    return private_cache_dir() / "logs" / f"{env.name}.update.network.jsonl"


def _packages(session: Session) -> bytes:
    """A digest of dpkg's status file in `session`, as its own tool reports it.

    After the upgrade this is the word of code inside; a lie can only make
    the update keep the old tarball."""
    from nsbuild.sandbox import PIPE, spawn

    proc = spawn(session.sandbox(PACKAGES_DIGEST), stdout=PIPE)
    assert proc.stdout is not None
    try:
        out = proc.stdout.read(4096)
    finally:
        proc.stdout.close()
        status = proc.wait()
    if status != 0:
        raise EnvError(f"reading the package list of {session.config.name!r} failed "
                       f"(status {status})")  # fmt: skip
    return out


def _clean(session: Session) -> None:
    from nsbuild.sandbox import spawn

    status = spawn(session.sandbox(["sh", "-c", CLEANUP_SCRIPT]), stdout=2).wait()
    if status != 0:
        raise EnvError(f"cleaning {session.config.name!r} after the upgrade failed "
                       f"(status {status})")  # fmt: skip


def _pack(session: Session, target: Path) -> str:
    """Pack the session's root into a new tarball over `target`; its sha256."""
    from nsbuild.sandbox import PIPE, Sys, spawn
    from nsbuild.sandbox.record import replace

    pack = session.sandbox(
        ["tar", "--create", "--file=-", "--directory=/", "--one-file-system",
         "--numeric-owner", "--xattrs", "--sort=name", "."],
    )  # fmt: skip
    # No sysfs while packing: tar sees its root's times move and fails
    # ("file changed as we read it"); nothing of it belongs in the tarball.
    pack = replace(pack, mounts=tuple(m for m in pack.mounts if not isinstance(m, Sys)))
    proc = spawn(pack, stdout=PIPE)
    assert proc.stdout is not None
    try:
        return copy_tarball_atomically(proc.stdout, target, check=proc.wait)
    finally:
        proc.stdout.close()
        proc.kill()
        proc.wait()


def _upgrade(session: Session) -> int:
    """Run apt's upgrade in `session`, with the network policy of a build's
    dependency phase: the environment's mirrors through the egress proxy,
    nothing else (no host loopback, no abstract sockets, no host interfaces),
    every attempt in the network log. Maintainer scripts of the upgraded
    packages run here, and they are not trusted with more."""
    from nsbuild import net
    from nsbuild.net.launch import run_under

    log = update_net_log(session.config)
    log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    log.unlink(missing_ok=True)  # the log of this run only
    opts = net.NetOptions(mode="allow", allow_from_env=True, log_path=str(log))
    with net.network(opts, mirrors=session.mirrors(),
                     trusted_mirrors=session.config.mirrors) as plan:
        # apt's progress joins stderr: stdout is for the outcome.
        status = run_under(plan, session.sandbox(["sh", "-c", UPGRADE_SCRIPT]), stdout=2)
    for line in (plan.denied_summary(), plan.log_error(), f"network log: {log}"):
        if line:
            print(f"nsbuild env update: {line}", file=sys.stderr)
    return status
