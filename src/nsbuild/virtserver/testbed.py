"""One open testbed: a throwaway copy-on-write session plus what its commands share.

The virt server and the execute helper (a separate process the client runs
for every command) meet here. The server writes a small record into the
session directory; the helper reads it to run its command in the same
session with the same policy:

    sessions/ID/testbed.json   the record below (gone = closed or reverted)
    sessions/ID/downtmp/       bind-mounted at DOWNTMP in every command: the
                               scratch space, also seen by the host (downtmp-host)
    sessions/ID/running/       one file per running command (PID-START), so
                               close and revert can stop what still runs

Every command is its own sandbox over the session (see nsbuild.envs), so
nothing but the files stays between commands. /tmp is not a tmpfs here, as it
is for `nsbuild run`: testbeds keep /tmp from one command to the next.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nsbuild.envs.session import Session
    from nsbuild.net import NetOptions
    from nsbuild.sandbox import Mount, Sandbox

RECORD = "testbed.json"
RUNNING = "running"
DOWNTMP = "/tmp/autopkgtest"
# Made at open when the id map has a subordinate range (a second uid exists).
NORMAL_USER = "nsbuild"
# Commands ask for a network mode per command with this first argument; only
# nsbuild's own client knows it (advertised as NET_CAPABILITY).
NET_ARG = "--nsbuild-net"
NET_CAPABILITY = "nsbuild-network-per-command"


class TestbedGone(Exception):
    """The testbed was closed or reverted under a command."""


@dataclass(frozen=True)
class NetPolicy:
    """The server's network options, as a command's NetOptions are built from them."""

    mode: str = "none"
    allow: tuple[str, ...] = ()
    allow_from_env: bool = False
    engine: str = "proxy"
    log: str | None = None

    def options(self, requested: str | None = None) -> NetOptions:
        """NetOptions for one command. A command may ask for `none`, or for
        `allow` (the environment's mirrors and the server's --allow list), but
        for `host` only when the server itself was started with --net host."""
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
        return NetOptions("allow", allowlist, from_env, self.engine, self.log)


@dataclass(frozen=True)
class Testbed:
    session_dir: str
    net: NetPolicy = field(default_factory=NetPolicy)
    mirrors: tuple[str, ...] = ()

    @property
    def record(self) -> Path:
        return Path(self.session_dir) / RECORD

    @property
    def downtmp_host(self) -> Path:
        return Path(self.session_dir) / "downtmp"

    @property
    def running(self) -> Path:
        return Path(self.session_dir) / RUNNING

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
            raise TestbedGone("the testbed was closed or reverted") from None
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
        )

    def session(self) -> Session:
        from nsbuild.envs.session import Session

        try:
            return Session.load(Path(self.session_dir))
        except Exception:
            if not self.record.exists():
                raise TestbedGone("the testbed was closed or reverted") from None
            raise

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
        from nsbuild.sandbox import Bind, Sandbox, Tmpfs, caller_idmap

        mounts = [m for m in session.mounts if not (isinstance(m, Tmpfs) and m.dst == "/tmp")]
        mounts.append(Bind(str(self.downtmp_host), DOWNTMP))
        return Sandbox(
            argv=tuple(argv),
            idmap=caller_idmap(),
            root=session.root,
            mounts=(*mounts, *extra_mounts),
            env=(*session.env, *extra_env),
            share_net=share_net,
            **kw,
        )

    # -- commands still running when the testbed goes --

    def register(self) -> Path:
        """Mark the calling process as running a command in this testbed."""
        from nsbuild.envs.owner import Owner

        me = Owner.me()
        mark = self.running / f"{me.pid}-{me.start}"
        try:
            mark.touch()
        except FileNotFoundError:
            raise TestbedGone("the testbed was closed or reverted") from None
        # The server removes the record before it looks for running commands:
        # a command that registered too late for it sees the record gone here.
        if not self.record.exists():
            mark.unlink(missing_ok=True)
            raise TestbedGone("the testbed was closed or reverted")
        return mark

    def stop_commands(self, grace: float = 3.0) -> None:
        """Kill the commands still running (their sandboxes die with them)."""
        from nsbuild.envs.owner import Owner

        try:
            names = os.listdir(self.running)
        except FileNotFoundError:
            return
        owners = []
        for name in names:
            pid, _, start = name.partition("-")
            if pid.isdigit() and start.isdigit():
                owners.append(Owner(int(pid), int(start)))
        live = [o for o in owners if o.alive()]
        for owner in live:
            try:
                os.kill(owner.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while any(o.alive() for o in live) and time.monotonic() < deadline:
            time.sleep(0.05)


def session_mirrors(session: Session) -> tuple[str, ...]:
    """The environment's mirrors and the archives of its read-only layers' apt
    sources (never the session's own changes: code inside does not get to
    widen its own allowlist)."""
    from nsbuild.envs.create import apt_mirrors

    found = list(session.config.mirrors)
    layers = [Path("/")] if session.config.type == "host" else [Path(p) for p in session.lowers]
    for layer in layers:
        found += [m for m in apt_mirrors(layer) if m not in found]
    return tuple(found)


__all__ = [
    "DOWNTMP",
    "NET_ARG",
    "NET_CAPABILITY",
    "NORMAL_USER",
    "NetPolicy",
    "Testbed",
    "TestbedGone",
    "session_mirrors",
]
