"""The Backend interface: where a build runs, seen only through four verbs.

The build driver never touches an environment by host path. It asks a backend
to run a command (as a user, with a network mode), to copy a file or tree in,
to copy a result out, and to close. Everything else a backend may offer is
declared in `capabilities` and used only when declared, so a backend that
cannot, say, restrict the network per phase still works and the driver can
say plainly which guarantee was not given.

    backend = nsbuild.backends.open_backend("local", BackendOptions(env="bookworm"))
    with backend:
        backend.copy_in(Path("hello_2.10-3.dsc"), "/build/hello_2.10-3.dsc")
        status = backend.run(["dpkg-source", "-x", "hello_2.10-3.dsc"], cwd="/build")
        backend.copy_out("/build/hello_2.10-3_amd64.deb", Path("out/hello_2.10-3_amd64.deb"))
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
import tarfile
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from nsbuild.backends.errors import BackendError, CopyRefused
from nsbuild.backends.tarfeed import TarFeeder
from nsbuild.net.netlog import NetSummary

Network = Literal["none", "allow", "host"]
# A stream argument: None inherits nsbuild's own, an int is a host fd, or an
# open file object with a real fd.
Stream = int | IO[Any] | None
# For `stderr`: send it where stdout goes.
STDOUT = -2
# The largest result copied out by default: a bound on what a sparse file
# made inside (a few blocks there) may write on the host.
MAX_COPY_OUT = 8 << 30
# Shell text run inside before a copy out of "$1/$2" of at most $3 bytes
# (paths travel as arguments, never inside the script): every component a
# real directory or, last, a regular file, since tar stores a symlink as a
# link and a virt server's `cat` would follow one. Exits with a status in
# REFUSED and the reason on stderr.
CHECK_OUT = (
    'set -f; p=$1; IFS=/; for part in $2; do p="$p/$part"; '
    'if [ -L "$p" ]; then echo "$p is a symlink" >&2; exit 3; fi; done; '
    'if [ ! -f "$p" ]; then echo "$p is not a regular file" >&2; exit 4; fi; '
    # A second name for the file means it was made by linking, not by
    # a build tool: whose file it really is cannot be told.
    'n=$(stat -c %h -- "$p") || exit 1; '
    'if [ "$n" != 1 ]; then echo "$p is a hard link ($n names)" >&2; exit 5; fi; '
    'n=$(stat -c %s -- "$p") || exit 1; '
    'if [ "$n" -gt "$3" ]; then echo "$p is larger than $3 bytes" >&2; exit 6; fi; '
    # What a build leaves is compressed data or text, never mostly holes;
    # tar would stream the holes as zeros, so a `truncate -s 1T` costing
    # nothing inside would fill the host's disk.
    'a=$(stat -c "%b*%B" -- "$p") || exit 1; '
    'if [ "$n" -gt 1048576 ] && [ $(($a * 2)) -lt "$n" ]; then '
    'echo "$p is sparse ($n bytes, $(($a)) allocated)" >&2; exit 7; fi; '
)
REFUSED = (3, 4, 5, 6, 7)
# The largest file copied in by default (callers that know a file's size
# give it as the bound).
MAX_COPY_IN = 8 << 30
# What check_output keeps of a command's output, and of a refusal's reason.
MAX_OUTPUT = 16 << 20
MAX_REASON = 4096


@dataclass(frozen=True)
class Capabilities:
    """What a backend can guarantee. The driver adapts to each `False` and says so."""

    # run(network=...) is enforced command by command: the build can run
    # without network right after the dependencies were installed with it.
    network_per_phase: bool = False
    # revert(): back to a fresh copy of the environment.
    revert: bool = False
    # Commands may run as root inside (needed to install build dependencies).
    root_inside: bool = False
    # A second, unprivileged user exists or can be created for the build.
    unprivileged_user: bool = False
    # keep_layer()/use_layer(): the installed state can be kept and reused.
    dependency_layers: bool = False

    def limitations(self) -> list[str]:
        """Plain sentences naming the guarantees this backend cannot give."""
        out = []
        if not self.network_per_phase:
            out.append("network during build: not restricted by this backend")
        if not self.root_inside:
            out.append("build dependencies: cannot be installed (no root inside)")
        if not self.unprivileged_user:
            out.append("build user: the package builds as root inside")
        return out


@dataclass(frozen=True)
class BackendOptions:
    """How to open a backend. Each backend reads the fields it understands."""

    # Environment name (local backend) as known to `nsbuild env`.
    env: str | None = None
    # Arguments of a backend that drives something external (e.g. a virt server argv).
    args: tuple[str, ...] = ()
    # Host names the trusted phase may reach besides the environment's own mirrors.
    allow: tuple[str, ...] = ()
    # Where per-run network records also go, one JSON line each (None: memory only).
    net_log: str | None = None
    # Persistent caches to use in trusted runs, by name ("apt-lists",
    # "apt-archives"); a backend without them ignores the request.
    caches: tuple[str, ...] = ()
    debug: bool = False
    extra: Mapping[str, str] = field(default_factory=dict)


class Backend(ABC):
    """An open environment. Use as a context manager: `close()` always runs."""

    name: str = "backend"
    capabilities: Capabilities = Capabilities()
    # A writable directory inside that exists after open, owned by root.
    # Results may be copied out only from under it.
    work_dir: str = "/build"

    @abstractmethod
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
        """Run `argv` inside; return its exit status (128+N if killed by signal N).

        `env` adds to (and overrides) the environment's own variables. Raises
        BackendError only when the command could not be started at all."""

    @abstractmethod
    def close(self) -> None:
        """Tear everything down. Idempotent; safe after a failed open."""

    # -- copies: generic implementations over run() and tar; override when the
    # backend has a faster way (a shared directory, a protocol verb). --

    def copy_in(self, host_path: Path, guest_path: str, *, limit: int = MAX_COPY_IN) -> None:
        """Copy a host file or directory tree to `guest_path` (parents are made).
        In a tree, symlinks and FIFOs are copied as such, never followed nor
        opened, sockets are left out and a device refused; a file is read from
        one descriptor, refused unless it is a regular file of at most `limit`
        bytes (in a tree: each file). The tar stream goes straight
        into the command that unpacks it: nothing is spooled on the host, where
        a sparse file would grow to its full size."""
        guest_path = absolute_path(guest_path)
        parent, base = posixpath.split(guest_path)
        script = 'mkdir -p -- "$1" && exec tar -C "$1" --no-same-owner -xf -'
        argv = ["sh", "-c", script, "copy-in", parent]
        with TarFeeder(host_path, base, limit) as feeder:
            status = self.run(argv, stdin=feeder.fd, stderr=STDOUT, stdout=_devnull())
        if feeder.error is not None:
            raise feeder.error
        if status != 0:
            raise BackendError(
                f"{self.name}: copying {host_path} in to {guest_path} failed "
                f"(tar exit status {status})"
            )

    def copy_out(
        self,
        guest_path: str,
        host_path: Path,
        *,
        within: str | None = None,
        limit: int = MAX_COPY_OUT,
    ) -> None:
        """Copy the regular file `guest_path` to `host_path`, as a new file of
        mode 0644 (no setuid or setgid bit, no owner's mode of the inside).

        Refused (CopyRefused) when the path leaves `within` (default: work_dir),
        when any part of it is a symlink, when it is not a regular file with
        a single name (a FIFO, a device, a hard link are refused), or when it
        is larger than `limit` bytes. The inside is never trusted: the checks
        are repeated on the host on what actually arrives, and no more than
        the bound is ever written."""
        within = absolute_path(within or self.work_dir)
        guest_path = absolute_path(guest_path)
        if not guest_path.startswith(within.rstrip("/") + "/"):
            raise CopyRefused(f"refusing to copy {guest_path}: outside {within}")
        rel = guest_path[len(within.rstrip("/")) + 1 :]
        script = CHECK_OUT + 'exec tar -C "$1" --no-recursion -cf - -- "$2"'
        argv = ["sh", "-c", script, "copy-out", within, rel, str(limit)]
        # The tar stream (the file, its header and the end blocks) waits
        # beside its destination, not in a /tmp that may be memory.
        host_path.parent.mkdir(parents=True, exist_ok=True)
        with Sink(limit + (64 << 10), host_path.parent) as out, Sink(MAX_REASON) as err:
            status = self.run(argv, stdout=out.fd, stderr=err.fd)
        why = err.text().strip()
        if status in REFUSED:
            raise CopyRefused(f"refusing to copy {guest_path}: {why}")
        if status != 0 or out.overflow:
            raise BackendError(
                f"{self.name}: copying {guest_path} out failed: "
                f"{why or f'exit status {status}'}"
                + (" (more output than the file's bound)" if out.overflow else "")
            )
        with out.file:
            out.file.seek(0)
            _extract_one(out.file, rel, guest_path, host_path, limit)

    def check_output(self, argv: Sequence[str], **kwargs: Any) -> tuple[int, str]:
        """run() with stdout captured (its first MAX_OUTPUT bytes): (status, text)."""
        with Sink(MAX_OUTPUT) as out:
            status = self.run(argv, stdout=out.fd, **kwargs)
        return status, out.text()

    def take_downloads(self) -> list[str]:
        """Take what apt downloaded in this session into the environment's
        shared caches, where the backend keeps them; lines saying what was
        taken. Only to be called while nothing but apt has run in the session:
        the maintainer scripts of a package could have planted anything."""
        return []

    # -- optional, declared in capabilities --

    def revert(self) -> None:
        """Start over from a fresh copy of the environment."""
        raise BackendError(f"backend {self.name} cannot revert")

    def base_id(self) -> str | None:
        """An id that changes whenever the environment's base changes (keys caches)."""
        return None

    def keep_layer(self, dest: Path) -> None:
        """Store what was changed since open/revert as a reusable layer at `dest`.
        The work directory is kept; the next call must be use_layer() or revert()."""
        raise BackendError(f"backend {self.name} cannot keep dependency layers")

    def use_layer(self, layer: Path) -> None:
        """Start over from a fresh session with `layer` (made by keep_layer) below it."""
        raise BackendError(f"backend {self.name} cannot use dependency layers")

    def keep_session(self) -> str | None:
        """Keep the session past close() (sbuild's --purge-build), and return a
        command line that enters it; None when the backend cannot keep one."""
        return None

    def network_records(self) -> list[dict[str, Any]]:
        """Network attempts seen so far (allowed and denied), as net log records:
        the first ones only, a bounded number."""
        return []

    def network_summary(self) -> NetSummary | None:
        """Counts of every network attempt so far, bounded whatever their
        number; None when the backend keeps none (network_records then says
        what it knows)."""
        return None

    def describe(self) -> str:
        """One line for the build log header."""
        return self.name

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def absolute_path(path: str) -> str:
    """`path` normalised, when it is absolute, without NUL or '..'."""
    if not path.startswith("/") or "\0" in path:
        raise CopyRefused(f"not an absolute path: {path!r}")
    if any(p == ".." for p in path.split("/")):
        raise CopyRefused(f"refusing a path with '..': {path}")
    return posixpath.normpath(path)


def _extract_one(stream: IO[bytes], rel: str, guest_path: str, host_path: Path, limit: int) -> None:
    """Take exactly one regular file named `rel`, of at most `limit` bytes, out
    of a tar stream, into a new file of mode 0644."""
    shown = guest_path
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            member = tar.next()
            if member is None or member.name.rstrip("/") != rel:
                raise CopyRefused(f"refusing to copy {shown}: unexpected archive content")
            if not member.isreg():
                raise CopyRefused(f"refusing to copy {shown}: not a regular file")
            if member.size > limit:
                raise CopyRefused(f"refusing to copy {shown}: larger than {limit} bytes")
            data = tar.extractfile(member)
            assert data is not None
            host_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = host_path.with_name(f".{host_path.name}.part")
            with _new_file(tmp) as out:
                while block := data.read(1 << 20):
                    out.write(block)
            os.replace(tmp, host_path)
    except tarfile.TarError as e:
        raise BackendError(f"copying {shown} out: bad archive from inside: {e}") from None


@contextlib.contextmanager
def _new_file(path: Path) -> Iterator[IO[bytes]]:
    """A file made anew at `path` (never through a link left there), mode
    0644, removed again if writing it fails."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o644)
    os.fchmod(fd, 0o644)  # whatever the umask
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def copy_bounded(src_fd: int, host_path: Path, limit: int, what: str) -> None:
    """Copy the open regular file `src_fd` (at most `limit` bytes) to a new
    file `host_path` of mode 0644: its data only, never its mode or links."""
    st = os.fstat(src_fd)
    if not stat.S_ISREG(st.st_mode):
        raise CopyRefused(f"refusing to copy {what}: not a regular file")
    if st.st_size > limit:
        raise CopyRefused(f"refusing to copy {what}: larger than {limit} bytes")
    tmp = host_path.with_name(f".{host_path.name}.part")
    left = limit
    with _new_file(tmp) as out:
        while block := os.read(src_fd, min(1 << 20, left + 1)):
            left -= len(block)
            if left < 0:
                raise CopyRefused(f"refusing to copy {what}: larger than {limit} bytes")
            out.write(block)
    os.replace(tmp, host_path)


class Sink:
    """A pipe whose read end a thread copies into a temporary file, up to
    `limit` bytes: a command's output, bounded whatever the command (or a
    program replaced inside) writes. Past the bound the pipe is closed, and
    the writer gets EPIPE."""

    def __init__(self, limit: int, folder: Path | None = None) -> None:
        self.limit = limit
        self.overflow = False
        self.file: IO[bytes] = tempfile.TemporaryFile(dir=folder)
        self._read_fd, self.fd = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._copy, name="nsbuild-sink", daemon=True)
        self._thread.start()

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        # The command is over: its output ends with the write end closed here
        # (a process left behind that keeps it open would keep this waiting,
        # as it keeps the command's own run waiting).
        os.close(self.fd)
        self._thread.join()

    def _copy(self) -> None:
        left = self.limit
        try:
            while data := os.read(self._read_fd, 1 << 16):
                if len(data) > left:
                    self.file.write(data[:left])
                    self.overflow = True
                    break
                self.file.write(data)
                left -= len(data)
        finally:
            os.close(self._read_fd)

    def text(self) -> str:
        with self.file:
            self.file.seek(0)
            return self.file.read(self.limit).decode(errors="replace")


_DEVNULL: IO[bytes] | None = None


def _devnull() -> IO[bytes]:
    global _DEVNULL
    if _DEVNULL is None:
        _DEVNULL = open(os.devnull, "wb")  # lives as long as the process
    return _DEVNULL
