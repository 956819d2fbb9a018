"""The local backend: an nsbuild environment in rootless sandboxes.

Each `run()` is its own sandbox over one copy-on-write session of the
environment (the session's overlay is mounted in the sandbox's private mount
namespace, so nothing stays mounted between runs), with the network policy of
that run alone: `none` gets loopback and a DNS responder that logs names,
`allow` gets the egress proxy limited to the environment's mirrors and apt
sources, `host` shares the host's network.

Besides the session, the backend keeps on the host:

- a work directory (`<session dir>/build`), bind-mounted at /build in every
  run: the build tree lives outside the overlay, so it is never part of a
  kept dependency layer and survives `keep_layer()`/`use_layer()`;
- persistent caches (e.g. apt's lists and downloaded packages), mounted only
  in trusted runs (as root, with network) and never in the build itself.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from nsbuild.backends.base import (
    STDOUT,
    Backend,
    BackendError,
    BackendOptions,
    Capabilities,
    Network,
    Stream,
)

WORK_DIR = "/build"
# Persistent caches a caller may ask for by name, mounted in trusted runs only.
CACHE_MOUNTS = {
    "apt-lists": "/var/lib/apt/lists",
    "apt-archives": "/var/cache/apt/archives",
}
_URL_RE = re.compile(r"\b(?:https?|ftp)://[^\s\]\"']+")


def open_local(options: BackendOptions) -> LocalBackend:
    return LocalBackend(options)


def _fd(stream: Stream, default: int) -> int:
    if stream is None:
        return default
    if isinstance(stream, int):
        return stream
    return stream.fileno()


@contextlib.contextmanager
def _cache_lock(caches: Mapping[str, Path]) -> Iterator[None]:
    """Hold the environment's apt caches for one run. Two apt processes of
    two builds would otherwise meet on the same lists and archives: apt's own
    locks make the second one fail at once instead of waiting."""
    if not caches:
        yield
        return
    from nsbuild.envs.store import locked_file

    with locked_file(next(iter(caches.values())).parent / ".lock"):
        yield


class LocalBackend(Backend):
    name = "local"
    work_dir = WORK_DIR

    def __init__(self, options: BackendOptions) -> None:
        from nsbuild.envs.config import load_config
        from nsbuild.envs.owner import give_to_sandbox_root
        from nsbuild.envs.paths import cache_dir
        from nsbuild.sandbox import caller_idmap

        if not options.env:
            raise BackendError("local backend: no environment given")
        # Unknown names fail here, before any session exists.
        self.config = load_config().get(options.env)
        self.options = options
        self._idmap = caller_idmap()
        self.capabilities = Capabilities(
            network_per_phase=True,
            revert=True,
            root_inside=True,
            unprivileged_user=self._idmap.full,
            shared_dir=True,
            dependency_layers=True,
        )
        self._caches: dict[str, Path] = {}
        for name in options.caches:
            if name not in CACHE_MOUNTS:
                raise BackendError(f"local backend: unknown cache {name!r}")
            host = cache_dir() / "apt" / self.config.name / name
            host.mkdir(parents=True, exist_ok=True)
            give_to_sandbox_root(host)
            self._caches[name] = host
        self._records: list[dict[str, Any]] = []
        self._mirrors: tuple[str, ...] | None = None
        self._stack = ExitStack()
        self._session: Any = None
        self._build_dir: Path | None = None
        self._open(())

    # -- session handling --

    def _open(self, lowers: Sequence[Path]) -> None:
        from nsbuild.envs.owner import give_to_sandbox_root
        from nsbuild.envs.session import throwaway

        stack = ExitStack()
        try:
            session = stack.enter_context(throwaway(self.config, extra_lowers=tuple(lowers)))
            build = session.dir / "build"
            build.mkdir(exist_ok=True)
            give_to_sandbox_root(build)
        except BaseException:
            stack.close()
            raise
        old_build = self._build_dir
        if old_build is not None and old_build.exists():
            # Carry the build tree over (same filesystem: both under sessions/),
            # then let the old session go.
            build.rmdir()
            os.rename(old_build, build)
        self._stack.close()
        self._stack = stack
        self._session = session
        self._build_dir = build

    def revert(self) -> None:
        self._build_dir = None
        self._open(())

    def base_id(self) -> str | None:
        base: str | None = self._session.base
        return base

    def keep_layer(self, dest: Path) -> None:
        from nsbuild.envs.owner import give_to_sandbox_root

        upper: Path = self._session.upper
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(upper, dest)
        except OSError:
            # Another filesystem: copy inside a user namespace, where the
            # files of the subordinate range are ours, then drop the original.
            self._copy_tree_in_userns(upper, dest)
        # An empty upper keeps the old session valid until use_layer() or
        # revert() replaces it.
        upper.mkdir()
        give_to_sandbox_root(upper)

    def use_layer(self, layer: Path) -> None:
        self._open((layer,))

    def _copy_tree_in_userns(self, src: Path, dest: Path) -> None:
        from nsbuild.sandbox import Bind, Sandbox, Tmpfs, host_view, spawn

        dest.mkdir()
        spec = Sandbox(
            argv=("cp", "-a", "--", "/src/.", "/dest/"),
            idmap=self._idmap,
            root=Tmpfs("/"),
            mounts=(*host_view(), Bind(str(src), "/src", readonly=True), Bind(str(dest), "/dest")),
        )
        if spawn(spec).wait() != 0:
            raise BackendError(f"local backend: cannot copy layer {src} to {dest}")

    def describe(self) -> str:
        base = (self._session.base or "")[:12]
        return f"local (environment {self.config.name}, base {base or 'directory'})"

    # -- running --

    def mirrors(self) -> tuple[str, ...]:
        """URLs of the environment's mirrors: its config, then its own apt sources."""
        if self._mirrors is None:
            found = list(self.config.mirrors)
            script = (
                "cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list "
                "/etc/apt/sources.list.d/*.sources 2>/dev/null; true"
            )
            _status, text = self.check_output(["sh", "-c", script])
            for line in text.splitlines():
                line = line.split("#", 1)[0]
                for url in _URL_RE.findall(line):
                    if url not in found:
                        found.append(url)
            self._mirrors = tuple(found)
        return self._mirrors

    def run(
        self,
        argv: Sequence[str],
        *,
        user: str = "root",
        network: Network = "none",
        cwd: str = "/",
        env: Mapping[str, str] | None = None,
        stdin: Stream = None,
        stdout: Stream = None,
        stderr: Stream = None,
    ) -> int:
        out_fd = _fd(stdout, 1)
        in_fd = _fd(stdin, 0)
        # stderr joins stdout through its own descriptor: the runtime wants
        # three distinct fds to place on 0, 1 and 2.
        err_fd = os.dup(out_fd) if stderr == STDOUT else _fd(stderr, 2)
        try:
            return self._run(argv, user, network, cwd, env, in_fd, out_fd, err_fd)
        finally:
            if stderr == STDOUT:
                os.close(err_fd)

    def _run(
        self,
        argv: Sequence[str],
        user: str,
        network: Network,
        cwd: str,
        env: Mapping[str, str] | None,
        in_fd: int,
        out_fd: int,
        err_fd: int,
    ) -> int:
        from nsbuild import net
        from nsbuild.net.allowlist import Allowlist
        from nsbuild.sandbox import Bind, Sandbox, spawn

        assert self._session is not None and self._build_dir is not None
        trusted = user == "root" and network != "none"
        mirrors: tuple[str, ...] = ()
        if network == "allow":
            mirrors = self.mirrors()
        opts = net.NetOptions(
            mode=network,
            allowlist=Allowlist.parse(self.options.allow),
            allow_from_env=network == "allow",
        )
        mounts: list[Any] = [Bind(str(self._build_dir), WORK_DIR)]
        caches = self._caches if trusted else {}
        for name, host in caches.items():
            mounts.append(Bind(str(host), CACHE_MOUNTS[name]))
        with (
            _cache_lock(caches),
            net.network(opts, mirrors=mirrors, debug=self.options.debug) as plan,
        ):
            base = self._session.sandbox(
                argv,
                mounts=(*mounts, *plan.mounts),
                env=(*plan.env, *(env or {}).items()),
                user=None if user == "root" else user,
                cwd=cwd,
                share_net=plan.share_net,
                debug=self.options.debug,
            )
            # The session knows its root, default mounts and environment; the
            # network plan adds its sockets and cgroup.
            spec = Sandbox(
                argv=base.argv,
                idmap=base.idmap,
                root=base.root,
                mounts=base.mounts,
                env=base.env,
                user=base.user,
                cwd=base.cwd,
                hostname=base.hostname,
                share_net=base.share_net,
                inside_sockets=plan.inside_sockets,
                cgroup=plan.cgroup,
                debug=base.debug,
            )
            with self._session.in_use():
                proc = spawn(spec, stdin=in_fd, stdout=out_fd, stderr=err_fd)
                try:
                    plan.serve(proc.sockets)
                    status = proc.wait()
                except BaseException:
                    # Interrupted: the helper's death takes the whole sandbox with it.
                    proc.kill()
                    proc.wait()
                    raise
            self._records.extend(plan.records())
        # Only after the plan stopped its services: they serve these sockets.
        for sock in proc.sockets:
            sock.close()
        if proc.exec_error:
            msg = f"{proc.exec_error}\n".encode(errors="replace")
            with contextlib.suppress(OSError):
                os.write(err_fd, msg)
        return status

    def network_records(self) -> list[dict[str, Any]]:
        return list(self._records)

    def close(self) -> None:
        self._stack.close()
        self._session = None
        self._build_dir = None


__all__ = ["LocalBackend", "open_local"]
