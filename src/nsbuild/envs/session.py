"""Copy-on-write sessions: an overlay of a fresh upper dir over an environment's base.

A session is a directory `sessions/ID/` holding `upper/`, `work/` and a
`session.json` record. Nothing is mounted on the host: each command gets its
own sandbox that mounts the overlay in its private mount namespace, so a
crash leaves no mount behind, and two sessions never see each other's files.

Kinds:
- throwaway: owned by the process that made it (pid + start time); removed
  when it is done, or by `nsbuild gc` once that process is gone.
- persistent (`nsbuild session begin`): lives until `nsbuild session end`.
  While `session begin` still runs it sits under a `.tmp-PID-...` name, so a
  SIGKILL there leaves only something gc recognises as dead.

Commands running in a session hold a shared flock on `session.lock`;
`end_session` takes it exclusively, so a session is not deleted under a
running command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from nsbuild.envs.aptsources import apt_mirrors
from nsbuild.envs.arches import elf_arch, personality_for, require_runnable
from nsbuild.envs.config import EnvConfig, load_config
from nsbuild.envs.errors import ConfigError, EnvError
from nsbuild.envs.masks import cache_masks
from nsbuild.envs.overlay import overlay_usable
from nsbuild.envs.owner import Owner, give_to_sandbox_root, tmp_name
from nsbuild.envs.paths import Layout
from nsbuild.envs.records import UnreadableRecord, read_record, write_record
from nsbuild.envs.remove import remove_tree
from nsbuild.envs.store import layout_for, use_base
from nsbuild.printable import printable
from nsbuild.sandbox import (
    Bind,
    Dev,
    File,
    Mount,
    Overlay,
    Proc,
    Sandbox,
    Sys,
    Tmpfs,
    caller_idmap,
    host_view,
)
from nsbuild.sandbox.spec import RootMount

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RECORD = "session.json"
LOCK = "session.lock"


def default_env(home: str = "/root") -> tuple[tuple[str, str], ...]:
    """A clean, reproducible environment: no host variable leaks in unless asked."""
    env = [("PATH", DEFAULT_PATH), ("LANG", "C.UTF-8"), ("TZ", "UTC"), ("HOME", home)]
    if "SOURCE_DATE_EPOCH" in os.environ:
        env.append(("SOURCE_DATE_EPOCH", os.environ["SOURCE_DATE_EPOCH"]))
    return tuple(env)


@dataclass(frozen=True)
class Session:
    id: str
    config: EnvConfig
    dir: Path
    # Read-only layers, top first; the base is last.
    lowers: tuple[str, ...]
    base: str | None  # sha256 of the base tarball, None if not from the store
    kind: str  # "throwaway" or "persistent"
    owner: Owner | None
    created: float
    # Overlayfs refused here: upper/ holds a full copy of the layers instead.
    copied: bool = False

    @property
    def upper(self) -> Path:
        return self.dir / "upper"

    @property
    def work(self) -> Path:
        return self.dir / "work"

    @property
    def root(self) -> RootMount:
        """The root filesystem for a `Sandbox`."""
        if self.config.type == "host":
            return Tmpfs("/")
        if self.copied:
            # The session's own tree, under the private cache: dpkg in it
            # may make setuid files.
            return Bind(str(self.upper), "/", private=True)
        # A throwaway session is discarded after use (and by gc after a
        # crash): its writes need not survive a power loss.
        volatile = self.kind == "throwaway"
        return Overlay(self.lowers, str(self.upper), str(self.work), "/", volatile)

    @property
    def mounts(self) -> tuple[Mount, ...]:
        """Default mounts: /proc, /dev, /sys, tmpfs /tmp, then the config's
        Bind-Mounts, with the cache folders they show masked (`cache_masks`)."""
        binds: tuple[Mount, ...] = tuple(
            Bind(b.src, b.dst, readonly=b.readonly) for b in self.config.bind_mounts
        )
        binds += tuple(cache_masks(binds))
        if self.config.type == "host":
            return (*host_view(), *binds)
        return (Proc(), Dev(), Sys(), Tmpfs("/tmp", 0o1777), *binds)

    @property
    def env(self) -> tuple[tuple[str, str], ...]:
        return default_env()

    @property
    def personality(self) -> int | None:
        """The persona its commands run under (Sandbox.personality): 32-bit
        for an i386 environment on amd64, so that uname agrees with dpkg."""
        return None if self.config.type == "host" else personality_for(self.config.architecture)

    def require_runnable(self) -> None:
        """A one-line EnvError if this machine cannot run the environment's
        programs (qemu-user unregistered since the session began)."""
        if self.config.type != "host":
            require_runnable(self.config.architecture, self.config.name)

    def mirrors(self) -> tuple[str, ...]:
        """The config's mirrors, then every archive in the base's apt sources:
        what `--allow-from-env` lets through. Read from the host side, never by
        running anything inside, and only from the base (the environment as
        configured): the session's own changes, and any layer above the base
        (a dependency layer, kept after build dependencies' maintainer scripts
        ran), were made by code inside, which is not trusted to widen its own
        allowlist (or to point a symlink at a host file)."""
        found = list(self.config.mirrors)
        base = Path("/") if self.config.type == "host" else self.base_layer
        if base is not None:
            found += [m for m in apt_mirrors(base) if m not in found]
        return tuple(found)

    @property
    def base_layer(self) -> Path | None:
        """The lowest layer: the environment's base (None if it has no layers)."""
        return Path(self.lowers[-1]) if self.lowers else None

    def sandbox(
        self,
        argv: Sequence[str],
        *,
        mounts: Sequence[Mount] = (),
        env: Sequence[tuple[str, str]] = (),
        unsetenv: Sequence[str] = (),
        clearenv: bool = False,
        user: str | None = None,
        cwd: str = "/",
        share_net: bool = False,
        hostname: str = "nsbuild",
        debug: bool = False,
    ) -> Sandbox:
        """A Sandbox running `argv` in this session; `mounts` and `env` add to the defaults.

        `clearenv` starts from an empty environment, `unsetenv` drops defaults."""
        merged = {} if clearenv else dict(self.env)
        for name in unsetenv:
            merged.pop(name, None)
        merged.update(env)
        return Sandbox(
            argv=tuple(argv),
            idmap=caller_idmap(),
            root=self.root,
            mounts=(*self.mounts, *mounts),
            env=tuple(merged.items()),
            user=user,
            cwd=cwd,
            hostname=hostname,
            share_net=share_net,
            personality=self.personality,
            debug=debug,
        )

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """Hold while a command runs: `end_session` then refuses to delete the session."""
        fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "env": self.config.to_json(),
            "lowers": list(self.lowers),
            "base": self.base,
            "kind": self.kind,
            "owner": self.owner.to_json() if self.owner else None,
            "created": self.created,
            "copied": self.copied,
        }

    @classmethod
    def load(cls, directory: Path) -> Session:
        try:
            data = read_record(directory / RECORD)
        except UnreadableRecord as e:
            raise EnvError(f"{directory / RECORD}: unreadable session record: {e.why}") from None
        try:
            return cls(
                id=str(data["id"]),
                config=EnvConfig.from_json(data["env"]),
                dir=directory,
                lowers=tuple(str(x) for x in data["lowers"]),
                base=data["base"] if isinstance(data["base"], str) else None,
                kind=str(data["kind"]),
                owner=Owner.from_json(data.get("owner")),
                created=float(data["created"]),
                copied=data.get("copied") is True,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            why = f"{type(e).__name__} {printable(str(e), 100)}"
            raise EnvError(f"{directory / RECORD}: unreadable session record: {why}") from None

    def alive(self) -> bool:
        """Persistent sessions live until ended; throwaway ones while their owner runs."""
        return self.kind == "persistent" or (self.owner is not None and self.owner.alive())


def host_resolver_mounts() -> tuple[Mount, ...]:
    """The host's /etc/resolv.conf, for a sandbox that shares the host's network."""
    try:
        with open("/etc/resolv.conf", "rb") as f:
            return (File("/etc/resolv.conf", f.read()),)
    except OSError:
        return ()


def _resolve(name_or_config: str | EnvConfig) -> EnvConfig:
    if isinstance(name_or_config, EnvConfig):
        return name_or_config
    return load_config().get(name_or_config)


def _copy_layers(lowers: Sequence[str], upper: Path) -> None:
    """The overlay fallback: copy the layers, bottom first, keeping owners and modes."""
    from nsbuild.sandbox import run

    binds = [Bind(lower, f"/layer{i}", readonly=True) for i, lower in enumerate(lowers)]
    script = " && ".join(f"cp -a /layer{i}/. /upper/" for i in reversed(range(len(lowers))))
    spec = Sandbox(
        argv=("sh", "-c", script),
        idmap=caller_idmap(),
        root=Tmpfs("/"),
        mounts=(*host_view(), *binds, Bind(str(upper), "/upper", private=True)),
    )
    status = run(spec)
    if status != 0:
        raise EnvError(f"copying the environment into {upper} failed (status {status})")


@dataclass(frozen=True)
class _HostBase:
    """A `Type: host` environment has no base layer: the host view is its root."""

    root: Path | None = None
    digest: str | None = None


@contextlib.contextmanager
def _no_base() -> Iterator[_HostBase]:
    yield _HostBase()


def _create(
    config: EnvConfig, kind: str, extra_lowers: Sequence[str | os.PathLike[str]]
) -> Session:
    if config.type != "host" and config.architecture:
        # Before anything is made: an environment this machine cannot run
        # would only fail later with "Exec format error".
        require_runnable(config.architecture, config.name)
    layout = layout_for(config)
    layout.sessions.mkdir(parents=True, exist_ok=True)
    for lower in extra_lowers:
        if not os.path.isdir(lower):
            raise EnvError(f"extra lower layer {lower}: not a directory")
    # Made under a name that says who makes it; renamed into place when complete.
    tmp = layout.sessions / tmp_name()
    tmp.mkdir()
    try:
        (tmp / "upper").mkdir()
        (tmp / "work").mkdir()
        give_to_sandbox_root(tmp / "upper", tmp / "work")
        copied = config.type != "host" and not overlay_usable(layout)
        with use_base(config) if config.type != "host" else _no_base() as base:
            config = _with_architecture(config, base.root)
            lowers = (*(os.fspath(x) for x in extra_lowers),
                      *((str(base.root),) if base.root else ()))  # fmt: skip
            if copied:
                _copy_layers(lowers, tmp / "upper")
            session_id = f"{config.name}-{secrets.token_hex(4)}"
            session = Session(
                id=session_id,
                config=config,
                dir=layout.session_dir(session_id),
                lowers=lowers,
                base=base.digest,
                kind=kind,
                owner=Owner.me() if kind == "throwaway" else None,
                created=time.time(),
                copied=copied,
            )
            write_record(tmp / RECORD, session.to_json())
            # The rename publishes the session while the base is still locked
            # against gc, which looks for session records before deleting a base.
            os.rename(tmp, session.dir)
    except BaseException:
        remove_tree(tmp)
        raise
    return session


def _with_architecture(config: EnvConfig, root: Path | None) -> EnvConfig:
    """`config`, its Architecture read from the base's dpkg if it declares
    none (a chroot.d entry written by hand): the session then runs it as it
    must, or says it cannot. Without a dpkg there, it runs natively."""
    if config.architecture or root is None:
        return config
    found = elf_arch(root)
    if found is None:
        return config
    require_runnable(found, config.name)
    return dataclasses.replace(config, architecture=found)


@contextlib.contextmanager
def throwaway(
    name_or_config: str | EnvConfig, extra_lowers: Sequence[str | os.PathLike[str]] = ()
) -> Iterator[Session]:
    """A fresh copy-on-write session, removed on exit (also on exceptions).

    `extra_lowers` are read-only layers stacked between the base and the upper
    dir (top first), e.g. a cached dependency layer."""
    session = _create(_resolve(name_or_config), "throwaway", extra_lowers)
    try:
        yield session
    finally:
        _delete(session)


def begin_session(name_or_config: str | EnvConfig) -> Session:
    """A persistent session: it lives until `end_session(id)`."""
    return _create(_resolve(name_or_config), "persistent", ())


def _layouts() -> list[Layout]:
    layouts = [Layout.default()]
    # Environments with their own Unpack folder keep their sessions there.
    unpacks: list[Path] = []
    with contextlib.suppress(ConfigError):
        unpacks = [env.unpack for env in load_config() if env.unpack]
    for root in unpacks:
        if Layout(root) not in layouts:
            layouts.append(Layout.private(root))
    return layouts


def get_session(session_id: str) -> Session:
    if not session_id or "/" in session_id or session_id.startswith("."):
        raise EnvError(f"bad session id {session_id!r}")
    default = Layout.default()
    candidates = [default.session_dir(session_id)]
    if not candidates[0].is_dir():
        candidates = [layout.session_dir(session_id) for layout in _layouts()]
    for directory in candidates:
        if directory.is_dir():
            return Session.load(directory)
    raise EnvError(f"no session {session_id!r} (see: nsbuild session list)")


def list_sessions() -> list[Session]:
    found: list[Session] = []
    for layout in _layouts():
        try:
            names = sorted(os.listdir(layout.sessions))
        except FileNotFoundError:
            continue
        for name in names:
            if not name.startswith("."):
                with contextlib.suppress(EnvError):
                    found.append(Session.load(layout.sessions / name))
    return found


def _delete(session: Session) -> None:
    # Rename first: if we die while deleting, what is left carries our (dead)
    # pid in its name and gc finishes the job.
    doomed = session.dir.parent / tmp_name()
    try:
        os.rename(session.dir, doomed)
    except FileNotFoundError:
        return
    remove_tree(doomed)


def end_session(session_id: str) -> None:
    """Delete a session and its files; refused while a command runs in it."""
    session = get_session(session_id)
    fd = os.open(session.dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EnvError(f"session {session_id!r} is in use by a running command") from None
        _delete(session)
    finally:
        os.close(fd)
