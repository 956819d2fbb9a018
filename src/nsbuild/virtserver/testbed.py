"""One open testbed: a throwaway copy-on-write session and the sandbox that lives on it.

At `open` the server starts one long-lived sandbox over the session (its
command a waiter that only sleeps: live.py) and every command of the testbed
enters it (nsbuild.sandbox.enter): files, /tmp, background processes and the
network namespace are shared from one command to the next, as on a machine.
`revert` and `close` kill the whole sandbox.

The server and the execute helper (a separate process the client runs for
every command) meet here:

    sessions/ID/testbed.json   the record below: the network policy, for the
                               commands that ask for another network mode
    sessions/ID/downtmp/       bind-mounted at DOWNTMP: the scratch space. Not
                               offered to clients as downtmp-host (server.py):
                               they copy from and to it, never by host path

/tmp is not a tmpfs here, as it is for `nsbuild run`: it lives in the session.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nsbuild.envs.session import Session
    from nsbuild.net import NetOptions
    from nsbuild.sandbox import Mount, Sandbox

RECORD = "testbed.json"
DOWNTMP = "/tmp/autopkgtest"
# Made at open when the id map has a subordinate range (a second uid exists).
NORMAL_USER = "nsbuild"
# Commands ask for a network mode per command with this first argument; only
# nsbuild's own client knows it (advertised as NET_CAPABILITY).
NET_ARG = "--nsbuild-net"
NET_CAPABILITY = "nsbuild-network-per-command"


class TestbedGone(Exception):
    """The testbed was closed or reverted under a command, or its sandbox ended."""


GONE = "the testbed was closed or reverted, or its sandbox ended"


@dataclass(frozen=True)
class NetPolicy:
    """The server's network options, as a command's NetOptions are built from them."""

    mode: str = "none"
    allow: tuple[str, ...] = ()
    allow_from_env: bool = False
    engine: str = "proxy"
    log: str | None = None

    def options(self, requested: str | None = None, engine: str | None = None) -> NetOptions:
        """NetOptions for one command. A command may ask for `none`, or for
        `allow` (the environment's mirrors and the server's --allow list), but
        for `host` only when the server itself was started with --net host.
        `engine` overrides the server's egress engine."""
        from nsbuild.net import NetOptions
        from nsbuild.net.allowlist import Allowlist

        mode = requested or self.mode
        if mode == "host" and self.mode != "host":
            raise PermissionError("--nsbuild-net host: the server was not started with --net host")
        if mode not in ("none", "allow", "host"):
            raise ValueError(f"{NET_ARG} {mode!r}: expected none, allow or host")
        if mode != "allow":
            return NetOptions(mode, None, False, "proxy", self.log)
        allowlist = Allowlist.parse(list(self.allow)) if self.allow else None
        # A request for `allow` means the mirrors, even from a server whose own
        # default names only hosts.
        from_env = self.allow_from_env or requested == "allow" or not self.allow
        return NetOptions("allow", allowlist, from_env, engine or self.engine, self.log)


@dataclass(frozen=True)
class Testbed:
    session_dir: str
    net: NetPolicy = field(default_factory=NetPolicy)
    mirrors: tuple[str, ...] = ()
    # The size of the tmpfs that takes the testbed's writes (None: the
    # session's upper directory on disk).
    tmpfs_size: str | None = None
    # The environment's apt caches are seen through overlays (aptcache.py).
    apt_cache: bool = False
    # The environment's Mirror: (the user's own config): unlike `mirrors`,
    # read from its root, these may reach non-global addresses.
    trusted_mirrors: tuple[str, ...] = ()

    @property
    def record(self) -> Path:
        return Path(self.session_dir) / RECORD

    @property
    def downtmp_host(self) -> Path:
        return Path(self.session_dir) / "downtmp"

    def save(self) -> None:
        tmp = self.record.with_name(f".{RECORD}.part")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        os.replace(tmp, self.record)

    @classmethod
    def load(cls, record: str | os.PathLike[str]) -> Testbed:
        try:
            with open(record) as f:
                data: dict[str, Any] = json.load(f)
        except FileNotFoundError:
            raise TestbedGone(GONE) from None
        net = data.get("net") or {}
        return cls(
            session_dir=str(data["session_dir"]),
            net=NetPolicy(
                mode=str(net.get("mode", "none")),
                allow=tuple(net.get("allow", ())),
                allow_from_env=bool(net.get("allow_from_env")),
                engine=str(net.get("engine", "proxy")),
                log=net.get("log"),
            ),
            mirrors=tuple(data.get("mirrors", ())),
            tmpfs_size=data.get("tmpfs_size"),
            apt_cache=data.get("apt_cache") is True,
            trusted_mirrors=tuple(data.get("trusted_mirrors", ())),
        )

    def sandbox(
        self,
        session: Session,
        argv: Sequence[str],
        *,
        share_net: bool = False,
        extra_mounts: Sequence[Mount] = (),
        extra_env: Sequence[tuple[str, str]] = (),
        **kw: Any,
    ) -> Sandbox:
        """A sandbox running `argv` as root in the session, with the shared
        downtmp and a /tmp that lives in the session (no tmpfs over it)."""
        from nsbuild.sandbox import Bind, Overlay, Sandbox, Tmpfs, caller_idmap

        mounts = [m for m in session.mounts if not (isinstance(m, Tmpfs) and m.dst == "/tmp")]
        # Under the session folder, which only its owner reaches (server.py):
        # setuid programs the testbed makes there stay out of other users' way.
        mounts.append(Bind(str(self.downtmp_host), DOWNTMP, private=True))
        # A session that copied its environment could not mount an overlay
        # in the session folder (overlayfs refused, or a folder above closed
        # to the sandbox's root): apt then works in the session alone.
        if self.apt_cache and not session.copied:
            from nsbuild.virtserver.aptcache import AptCache

            layers = session.lowers if session.config.type != "host" else ()
            mounts.extend(AptCache(session.config.name, self.session_dir).mounts(layers))
        root = session.root
        if self.tmpfs_size and isinstance(root, Overlay):
            # The testbed is thrown away whole at revert and close: its writes
            # (installed packages, /tmp) need never reach the disk.
            root = Overlay(root.lowers, "", "", "/", volatile=True, tmpfs_size=self.tmpfs_size)
        return Sandbox(
            argv=tuple(argv),
            idmap=caller_idmap(),
            root=root,
            mounts=(*mounts, *extra_mounts),
            env=(*session.env, *extra_env),
            share_net=share_net,
            personality=session.personality,
            **kw,
        )
