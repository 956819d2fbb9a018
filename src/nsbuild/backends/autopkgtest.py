"""The autopkgtest backend: build through any autopkgtest virtualisation server.

    nsbuild build --backend autopkgtest PKG.dsc -- autopkgtest-virt-SERVER [ARGS...]

The server (schroot, lxc, qemu, ssh, podman, unshare, null, or nsbuild's own)
is started, asked for its capabilities, opened, and asked for the program
that runs a command in the testbed. Each `run()` is that program plus the
command; copies in and out are the protocol's `copydown` and `copyup`. The
testbed is closed and the server quit on every way out, and a server that
misbehaves ends in a one-line error within a bounded time (virtproto.py).

What the server can guarantee is declared honestly: most servers run every
command with the same network, so the build is not cut off from it; only
nsbuild's own server (capability `nsbuild-network-per-command`) lets the
build run with none right after dependencies were installed with the
mirrors.
"""

from __future__ import annotations

import errno
import os
import posixpath
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from nsbuild.backends.base import (
    CHECK_OUT,
    MAX_COPY_IN,
    MAX_COPY_OUT,
    MAX_REASON,
    REFUSED,
    STDOUT,
    Backend,
    BackendOptions,
    Capabilities,
    Network,
    Sink,
    Stream,
    absolute_path,
    copy_bounded,
)
from nsbuild.backends.errors import BackendError, CopyRefused
from nsbuild.backends.virtproto import VirtServer

WORK_DIR = "/build"
PREFIX = "autopkgtest-virt-"
# Asked for per command by the client when the server advertises it.
NET_CAPABILITY = "nsbuild-network-per-command"
NET_ARG = "--nsbuild-net"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# cd, then exec: the working directory travels as an argument, never as code.
_IN_DIR = 'cd -- "$1" || exit 125; shift; exec "$@"'


@dataclass(frozen=True)
class VirtCapabilities(Capabilities):
    """Capabilities that name the server when a guarantee cannot be given."""

    server: str = "the virt server"

    def limitations(self) -> list[str]:
        who = f"backend autopkgtest ({self.server})"
        out = []
        if not self.network_per_phase:
            out.append(f"network during build: not restricted — {who} cannot enforce it")
        if not self.root_inside:
            out.append(f"build dependencies: cannot be installed — {who} gives no root")
        if not self.unprivileged_user:
            who_builds = "root" if self.root_inside else "the testbed's own user"
            out.append(f"build user: the package builds as {who_builds} — {who} has no spare user")
        if not self.revert:
            out.append(f"clean environment: not guaranteed — {who} cannot revert its testbed")
        return out


def resolve_server(argv: Sequence[str]) -> list[str]:
    """The server command, with autopkgtest's shorthand: `null` means
    `autopkgtest-virt-null` when no program `null` exists."""
    if not argv:
        raise BackendError(
            "autopkgtest backend: give the virt server after --, e.g. "
            "--backend autopkgtest -- autopkgtest-virt-nsbuild bookworm"
        )
    prog = argv[0]
    if "/" not in prog and shutil.which(prog) is None:
        if shutil.which(PREFIX + prog) is not None:
            return [PREFIX + prog, *argv[1:]]
        raise BackendError(f"autopkgtest backend: virt server {prog!r} not found on PATH")
    return list(argv)


class AutopkgtestBackend(Backend):
    name = "autopkgtest"

    def __init__(self, options: BackendOptions) -> None:
        self.options = options
        self.argv = resolve_server(options.args)
        self.server = VirtServer(self.argv, debug=options.debug)
        try:
            self._open()
        except BaseException:
            self.server.stop()
            raise

    def _open(self) -> None:
        server = self.server
        self.scratch = server.open()
        # Capabilities after open: downtmp-host and users exist only then.
        caps = server.capabilities()
        self.caps = caps
        root = "root-on-testbed" in caps
        revert = "revert" in caps
        suggested = [c.split("=", 1)[1] for c in caps if c.startswith("suggested-normal-user=")]
        self.capabilities = VirtCapabilities(
            network_per_phase=NET_CAPABILITY in caps,
            revert=revert,
            root_inside=root,
            # The driver adds its own build user: only where root may, and where
            # the change goes away with the testbed.
            unprivileged_user=root and (revert or bool(suggested)),
            dependency_layers=False,
            server=server.name,
        )
        self._after_open()

    def _after_open(self) -> None:
        self.exec_cmd = self.server.execute_command()
        if self.capabilities.root_inside:
            self.work_dir = WORK_DIR
            status = self.run(["mkdir", "-p", WORK_DIR], stdout=subprocess.DEVNULL)
            if status != 0:
                raise BackendError(
                    f"{self.server.name}: cannot create {WORK_DIR} (status {status})"
                )
        else:
            # Without root, the scratch directory is the one place known writable.
            self.work_dir = self.scratch

    def describe(self) -> str:
        return f"autopkgtest ({' '.join(self.argv)}; capabilities: {' '.join(self.caps)})"

    # -- running --

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
        # The server's execute command, then the user, variables and directory.
        line = list(self.exec_cmd)
        if self.capabilities.network_per_phase:
            line += [NET_ARG, network]
        if user != "root" and self.capabilities.root_inside:
            line += ["/sbin/runuser", "-u", user, "--"]
        variables = {"PATH": DEFAULT_PATH, **(env or {})}
        line += ["env", *(f"{k}={v}" for k, v in variables.items())]
        line += ["sh", "-c", _IN_DIR, "in-dir", cwd, *argv]
        err = subprocess.STDOUT if stderr == STDOUT else stderr
        try:
            proc = subprocess.Popen(line, stdin=stdin, stdout=stdout, stderr=err)
        except OSError as e:
            raise BackendError(
                f"{self.server.name}: cannot start its execute command {line[0]}: {e.strerror}"
            ) from None
        try:
            status = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        return 128 - status if status < 0 else status

    # -- copies through the protocol --

    def copy_in(self, host_path: Path, guest_path: str, *, limit: int = MAX_COPY_IN) -> None:
        guest_path = absolute_path(guest_path)
        # The server reads the file by its path: it must be one nothing else
        # can change (the build driver's private copies), and it is bounded.
        st = host_path.lstat()
        if stat.S_ISREG(st.st_mode):
            if st.st_size > limit:
                raise CopyRefused(f"refusing to copy {host_path}: larger than {limit} bytes")
        elif not stat.S_ISDIR(st.st_mode):
            raise CopyRefused(f"refusing to copy {host_path}: not a regular file")
        parent = posixpath.dirname(guest_path)
        if self.run(["mkdir", "-p", "--", parent], stdout=subprocess.DEVNULL) != 0:
            raise BackendError(f"{self.server.name}: cannot create {parent} in the testbed")
        if host_path.is_dir():
            self.server.copydown(str(host_path).rstrip("/") + "/", guest_path.rstrip("/") + "/")
        else:
            self.server.copydown(str(host_path), guest_path)

    def copy_out(
        self,
        guest_path: str,
        host_path: Path,
        *,
        within: str | None = None,
        limit: int = MAX_COPY_OUT,
    ) -> None:
        within = absolute_path(within or self.work_dir).rstrip("/") or "/"
        guest_path = absolute_path(guest_path)
        shown = guest_path
        prefix = within if within.endswith("/") else within + "/"
        if not guest_path.startswith(prefix):
            raise CopyRefused(f"refusing to copy {shown}: outside {within}")
        rel = guest_path[len(prefix) :]
        # Checked inside first (servers copy up with `cat` or through a shared
        # directory, and either would follow a symlink), then again on the
        # host on what arrived.
        with Sink(MAX_REASON) as err:
            argv = ["sh", "-c", CHECK_OUT + "true", "check", within, rel, str(limit)]
            status = self.run(argv, stdout=subprocess.DEVNULL, stderr=err.fd)
        why = err.text().strip()
        if status in REFUSED:
            raise CopyRefused(f"refusing to copy {shown}: {why}")
        if status != 0:
            raise BackendError(
                f"{self.server.name}: checking {shown} failed: {why or f'status {status}'}"
            )
        host_path.parent.mkdir(parents=True, exist_ok=True)
        landing = Path(tempfile.mkdtemp(prefix=".nsbuild-copyup-", dir=host_path.parent))
        try:
            arrived = landing / posixpath.basename(guest_path)
            self.server.copyup(guest_path, str(arrived))
            # The server wrote it: its data is copied into a file of our own,
            # never its mode (setuid, setgid), a link, or more than the bound.
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            try:
                fd = os.open(arrived, flags)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    raise BackendError(f"{self.server.name}: copyup of {shown} reported "
                                       "success but nothing arrived") from None  # fmt: skip
                raise CopyRefused(f"refusing to copy {shown}: not a regular file on arrival "
                                  f"({e.strerror})") from None  # fmt: skip
            try:
                copy_bounded(fd, host_path, limit, guest_path)
            finally:
                os.close(fd)
        finally:
            shutil.rmtree(landing, ignore_errors=True)

    # -- the rest of the interface --

    def revert(self) -> None:
        if not self.capabilities.revert:
            raise BackendError(f"{self.server.name} cannot revert its testbed")
        self.scratch = self.server.revert()
        self._after_open()

    def close(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.stop()
