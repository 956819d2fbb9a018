"""Disk used per environment and per session, for `env list` and `session list`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from nsbuild.envs.config import EnvConfig, load_config
from nsbuild.envs.errors import EnvError
from nsbuild.envs.session import list_sessions
from nsbuild.envs.store import base_complete, layout_for, tarball_digest
from nsbuild.envs.walk import disk_usage


@dataclass
class SessionUsage:
    id: str
    env: str
    kind: str
    alive: bool
    owner_pid: int | None
    bytes: int

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class EnvUsage:
    env: EnvConfig
    status: str
    base: str | None = None
    tarball_bytes: int = 0
    base_bytes: int = 0
    sessions: list[SessionUsage] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            **self.env.to_json(),
            "status": self.status,
            "base": self.base,
            "tarball_bytes": self.tarball_bytes,
            "base_bytes": self.base_bytes,
            "sessions": [s.to_json() for s in self.sessions],
        }


def session_usage() -> list[SessionUsage]:
    return [
        SessionUsage(
            s.id,
            s.config.name,
            s.kind,
            s.alive(),
            s.owner.pid if s.owner else None,
            # The upper dir holds what the session wrote: the base is shared.
            disk_usage(s.dir),
        )
        for s in list_sessions()
    ]


def env_usage() -> list[EnvUsage]:
    sessions = session_usage()
    rows = []
    for env in load_config():
        row = EnvUsage(env, "ready")
        if env.type == "tarball" and env.path:
            layout = layout_for(env)
            try:
                row.tarball_bytes = env.path.stat().st_size
                row.base = tarball_digest(layout, env.path)
            except OSError:
                row.status = "tarball missing"
            except EnvError as e:
                row.status = f"tarball unusable ({e})"
            else:
                if base_complete(layout, row.base):
                    row.base_bytes = disk_usage(layout.base_dir(row.base))
                else:
                    row.status = "not unpacked yet (the first use unpacks it)"
        row.sessions = [s for s in sessions if s.env == env.name]
        rows.append(row)
    return rows
