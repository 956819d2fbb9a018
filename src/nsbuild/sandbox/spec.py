"""A sandbox described as data: frozen, validated, then executed by runner.py.

Nothing here touches the system. Layers above build a `Sandbox` and hand it to
`nsbuild.sandbox.run()` / `spawn()`; the runtime knows nothing of Debian,
configs or builds.

Paths: every `src` is a host path, every `dst` an absolute path inside the
sandbox. Destinations are resolved *inside* the new root without following
symlinks, so an untrusted root cannot redirect a mount onto the host.
"""

from __future__ import annotations

import os

# Type checkers see real dataclasses; at run time record.py's (the run path,
# cli/main.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from dataclasses import dataclass, field
else:
    from nsbuild.sandbox.record import dataclass, field


PERSONA_MAX = 0xFF  # personality(2)'s PER_MASK: the bits above are flags


class SpecError(ValueError):
    """The description of a sandbox is invalid (a usage error)."""


def is_tmpfs_size(size: str) -> bool:
    """A tmpfs size: a number from 1 and at most one unit (k, m, g, or % of
    the RAM). Not 0, which tmpfs takes as no limit at all."""
    digits = size[:-1] if size[-1:] in ("k", "K", "m", "M", "g", "G", "%") else size
    return digits.isascii() and digits.isdigit() and not digits.startswith("0")


def _check_dst(dst: str) -> str:
    if not dst.startswith("/"):
        raise SpecError(f"mount destination must be absolute: {dst!r}")
    if "\0" in dst or any(part == ".." for part in dst.split("/")):
        raise SpecError(f"mount destination must not contain '..' or NUL: {dst!r}")
    # normpath keeps a leading "//" (POSIX leaves its meaning open): not here.
    return "/" + os.path.normpath(dst).lstrip("/")


@dataclass(frozen=True)
class Bind:
    """Bind-mount host path `src` (recursively) at `dst`."""

    src: str
    dst: str
    readonly: bool = False
    # A missing source is skipped instead of failing (for best-effort host views).
    optional: bool = False
    # The source is a directory of nsbuild's own that no other user can reach
    # (a session's tree, a build directory under the private cache). Only
    # there may the sandbox make setuid/setgid files: a writable bind that is
    # not private makes the sandbox refuse such mode changes, and new mounts.
    private: bool = False

    def describe(self) -> str:
        kind = "read-only bind" if self.readonly else "bind"
        return f"{kind} {self.src} on {self.dst}{' (private)' if self.private else ''}"


@dataclass(frozen=True)
class Tmpfs:
    dst: str
    mode: int = 0o755
    size: str | None = None  # e.g. "1G"; None = kernel default (half of RAM)

    def describe(self) -> str:
        return f"tmpfs on {self.dst} (mode {self.mode:o})"


@dataclass(frozen=True)
class Overlay:
    """overlayfs at `dst`: `lowers` (top first) read-only, writes go to `upper`.

    `upper` and `work` must be empty-or-owned directories on one filesystem
    that does not overlap the lowers (the kernel refuses otherwise), or both
    empty with `tmpfs_size` set: the writes then go to a fresh tmpfs of that
    size (e.g. "4G", "50%"), made inside the sandbox and gone with it."""

    lowers: tuple[str, ...]
    upper: str
    work: str
    dst: str = "/"
    # fsync and syncfs become no-ops: for throwaway trees, where durability
    # buys nothing and dpkg's per-file fsync costs seconds. The caller vouches
    # that the machine has not restarted since an earlier volatile mount of the
    # same upper (the kernel's crash mark is removed); after a restart such an
    # upper must be discarded, as gc does with a dead owner's throwaway session.
    volatile: bool = False
    tmpfs_size: str | None = None

    def describe(self) -> str:
        how = ", volatile: fsync is a no-op" if self.volatile else ""
        upper = f"a tmpfs of {self.tmpfs_size}" if self.tmpfs_size else self.upper
        return f"overlay on {self.dst} (lower {':'.join(self.lowers)}, upper {upper}{how})"


@dataclass(frozen=True)
class Symlink:
    target: str
    dst: str

    def describe(self) -> str:
        return f"symlink {self.dst} -> {self.target}"


@dataclass(frozen=True)
class Dir:
    dst: str
    mode: int = 0o755

    def describe(self) -> str:
        return f"directory {self.dst}"


@dataclass(frozen=True)
class File:
    """A small file with fixed content, bind-mounted read-only at `dst`
    (e.g. /etc/resolv.conf, an apt proxy configuration)."""

    dst: str
    data: bytes
    mode: int = 0o644

    def describe(self) -> str:
        return f"file {self.dst} ({len(self.data)} bytes)"


@dataclass(frozen=True)
class Proc:
    dst: str = "/proc"

    def describe(self) -> str:
        return f"fresh proc on {self.dst} (new PID namespace), /proc/sys read-only"


@dataclass(frozen=True)
class Dev:
    dst: str = "/dev"

    def describe(self) -> str:
        return f"minimal /dev on {self.dst}: null zero full random urandom tty, devpts, shm"


@dataclass(frozen=True)
class Sys:
    dst: str = "/sys"

    def describe(self) -> str:
        return f"read-only sysfs on {self.dst} with /sys/kernel masked"


Mount = Bind | Tmpfs | Overlay | Symlink | Dir | File | Proc | Dev | Sys
RootMount = Bind | Tmpfs | Overlay


@dataclass(frozen=True)
class IdRange:
    inside: int
    outside: int
    count: int

    def line(self) -> str:
        return f"{self.inside} {self.outside} {self.count}"


@dataclass(frozen=True)
class IdMap:
    """How ids inside map to the host. `helper` means newuidmap/newgidmap write
    the maps (subordinate ranges); otherwise the parent writes them itself."""

    uids: tuple[IdRange, ...]
    gids: tuple[IdRange, ...]
    helper: bool
    # Set when only one id could be mapped: said once to the user.
    warning: str | None = None

    @property
    def full(self) -> bool:
        return sum(r.count for r in self.uids) > 1


@dataclass(frozen=True)
class InsideSocket:
    """A socket created inside the sandbox's network namespace and handed to the
    caller (over SCM_RIGHTS) before the command starts. This is how host-side
    services (egress proxy, DNS logger) serve the sandbox without the sandbox
    ever holding a way out: the listening socket lives in the sandbox's
    namespace, the caller accepts on it, and its outgoing connections are made
    from the host namespace by the caller alone."""

    kind: str  # "tcp" (listening) or "udp" (bound)
    host: str  # "127.0.0.1" or "::1"
    port: int

    def describe(self) -> str:
        return f"{self.kind} socket {self.host}:{self.port} handed to nsbuild"


@dataclass(frozen=True)
class Sandbox:
    argv: tuple[str, ...]
    idmap: IdMap
    root: RootMount = field(default_factory=lambda: Tmpfs("/"))
    mounts: tuple[Mount, ...] = ()
    cwd: str = "/"
    env: tuple[tuple[str, str], ...] = ()
    # NAME, UID or UID:GID, resolved against the new root's /etc/passwd.
    user: str | None = None
    hostname: str = "nsbuild"
    share_net: bool = False
    inside_sockets: tuple[InsideSocket, ...] = ()
    # Host cgroup v2 directory the sandbox is placed in before anything runs.
    cgroup: str | None = None
    # New session: the command cannot push keystrokes into the caller's tty.
    new_session: bool = True
    # Extra host fds (besides 0, 1, 2) to keep open in the command, same numbers.
    pass_fds: tuple[int, ...] = ()
    # personality(2) persona the command runs under (PER_LINUX32: uname says
    # i686 in an i386 environment on amd64, as schroot's personality=linux32);
    # None: the caller's. A persona only: no flag such as ADDR_NO_RANDOMIZE.
    personality: int | None = None
    debug: bool = False

    def shared_writable(self) -> tuple[Bind, ...]:
        """The writable binds of host paths other users may reach. While there
        is one, the sandbox refuses setuid/setgid modes, and mounts, through
        which the kernel would set them itself (syscalls.py): inside, uid 0 is
        the caller, and such a file would run as the caller for them."""
        return tuple(m for m in (self.root, *self.mounts)
                     if isinstance(m, Bind) and not m.readonly and not m.private)

    def validate(self) -> Sandbox:
        if not self.argv:
            raise SpecError("no command given")
        if not self.cwd.startswith("/"):
            raise SpecError(f"working directory must be absolute: {self.cwd!r}")
        for k, _ in self.env:
            if not k or "=" in k or "\0" in k:
                raise SpecError(f"bad environment variable name: {k!r}")
        for m in (self.root, *self.mounts):
            if isinstance(m, Overlay) and bool(m.tmpfs_size) == bool(m.upper or m.work):
                raise SpecError(f"overlay on {m.dst}: give either upper and work, or tmpfs_size")
            # Sizes go into tmpfs's option string: a ',' would add options.
            size = (m.tmpfs_size if isinstance(m, Overlay)
                    else m.size if isinstance(m, Tmpfs) else None)
            if size is not None and not is_tmpfs_size(size):
                raise SpecError(f"tmpfs size on {m.dst}: expected a size such as 512M, 8G "
                                f"or 50%, got {size!r}")
        for m in self.mounts:
            _check_dst(m.dst)
        if not any(isinstance(m, Proc) for m in self.mounts):
            # The sandbox's own /proc: without it, none, or the host's pids.
            raise SpecError("a sandbox needs a Proc() mount")
        if self.personality is not None and not 0 <= self.personality <= PERSONA_MAX:
            raise SpecError(f"personality must be a persona without flags (0 to "
                            f"{PERSONA_MAX:#x}), got {self.personality:#x}")
        if self.share_net and self.inside_sockets:
            raise SpecError("inside sockets need a private network namespace")
        return self
