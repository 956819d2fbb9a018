"""The local backend: an nsbuild environment in rootless sandboxes.

Each `run()` is its own sandbox over one copy-on-write session of the
environment (the session's overlay is mounted in the sandbox's private mount
namespace, so nothing stays mounted between runs), with the network policy of
that run alone: `none` gets loopback and a DNS responder that logs names,
`allow` gets the egress proxy limited to the environment's mirrors and apt
sources (as root, with the option `egress-engine: nftables`, the kernel
firewall of the run's own cgroup instead), `host` shares the host's network.

Besides the session, the backend keeps on the host:

- a work directory (`<session dir>/build`), bind-mounted at /build in every
  run: the build tree lives outside the overlay, so it is never part of a
  kept dependency layer and survives `keep_layer()`/`use_layer()`;
- persistent caches (e.g. apt's lists and downloaded packages), shared by
  the builds of an environment. A session never writes them: in trusted runs
  (as root, with network) each is the read-only lower of an overlay whose
  upper is the session's own (`<session dir>/cache/NAME/`), never seen in the
  build itself. What apt wrote there is taken into the shared cache by
  `take_downloads()`, which the driver calls only while nothing but apt has
  run in the session: a maintainer script that plants a package in
  /var/cache/apt/archives plants it in its own session, thrown away with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nsbuild.backends.base import (
    STDOUT,
    Backend,
    BackendOptions,
    Capabilities,
    Network,
    Stream,
)
from nsbuild.backends.errors import BackendError

if TYPE_CHECKING:
    from nsbuild.net.netlog import NetSummary

WORK_DIR = "/build"
# Persistent caches a caller may ask for by name, mounted in trusted runs only.
CACHE_MOUNTS = {
    "apt-lists": "/var/lib/apt/lists",
    "apt-archives": "/var/cache/apt/archives",
}
# What apt keeps at the top of those folders and a later build may reuse:
# package lists (not the lock), downloaded packages, and the binary caches
# of the lists that APT_OPTS of the build driver name.
_TAKEN = {
    "apt-lists": re.compile(r"(?!lock$)[A-Za-z0-9][A-Za-z0-9._+~%-]*"),
    "apt-archives": re.compile(
        r"[a-z0-9][a-z0-9.+-]*_[A-Za-z0-9.+~%-]+_[a-z0-9-]+\.deb|nsbuild-(src)?pkgcache\.bin"
    ),
}
# Network records kept for the build's summary and log (a flood makes many).
MAX_RECORDS = 10000
# A bound on one file taken into a shared cache (the largest .debs are a few GiB).
MAX_TAKEN = 8 << 30
# apt names a downloaded package NAME_VERSION_ARCH.deb, an epoch's ':' as %3a.
_DEB_NAME = re.compile(r"([a-z0-9][a-z0-9.+-]*)_([A-Za-z0-9.+~%-]+)_([a-z0-9-]+)\.deb")


def _fd(stream: Stream, default: int) -> int:
    if stream is None:
        return default
    if isinstance(stream, int):
        return stream
    return stream.fileno()


@contextlib.contextmanager
def _stdin_fd(stdin: Stream) -> Iterator[int]:
    """The descriptor a run reads: the caller's, else /dev/null. Never
    nsbuild's own stdin by default: it may be the user's terminal, and code
    in the build (debian/rules, maintainer scripts) would read what is typed."""
    if stdin is not None:
        yield _fd(stdin, 0)
        return
    fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


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
        from nsbuild.envs.owner import give_to_sandbox_root, sandbox_root_ids
        from nsbuild.envs.paths import apt_cache_dir
        from nsbuild.sandbox import caller_idmap

        if not options.env:
            raise BackendError("local backend: no environment given")
        # Before any session exists: the root engine's needs (root, nft,
        # cgroup v2) fail as one line naming the rootless engine.
        self._engine = egress_engine(options)
        # Unknown names fail here, before any session exists.
        self.config = load_config().get(options.env)
        self.options = options
        self._idmap = caller_idmap()
        self.capabilities = Capabilities(
            network_per_phase=True,
            revert=True,
            root_inside=True,
            unprivileged_user=self._idmap.full,
            dependency_layers=True,
        )
        self._caches: dict[str, Path] = {}
        for name in options.caches:
            if name not in CACHE_MOUNTS:
                raise BackendError(f"local backend: unknown cache {name!r}")
            host = apt_cache_dir(self.config.name) / name
            host.mkdir(parents=True, exist_ok=True)
            give_to_sandbox_root(host)
            self._caches[name] = host
        if (ids := sandbox_root_ids()) is not None:
            with _cache_lock(self._caches):
                for host in self._caches.values():
                    _give_files_to(host, ids)
        self._records: list[dict[str, Any]] = []
        self._net_summary: NetSummary | None = None
        self._stack = ExitStack()
        self._session: Any = None
        self._build_dir: Path | None = None
        # The session's own upper directory of each cache overlay, and what
        # was already taken from it (name -> (inode, size, mtime)).
        self._cache_uppers: dict[str, Path] = {}
        self._taken: dict[tuple[str, str], tuple[int, int, int]] = {}
        self._known: dict[str, tuple[int, str]] = {}
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
            uppers = self._cache_dirs(session)
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
        self._cache_uppers = uppers
        self._taken = {}

    def _cache_dirs(self, session: Any) -> dict[str, Path]:
        """The session's upper and work directories of each cache overlay
        (none where the session could not use overlayfs: apt then writes in
        the session alone, and nothing is shared)."""
        from nsbuild.envs.owner import give_to_sandbox_root

        if session.copied or session.config.type == "host":
            return {}
        uppers = {}
        for name in self._caches:
            upper, work = (session.dir / "cache" / name / sub for sub in ("upper", "work"))
            upper.mkdir(parents=True)
            work.mkdir()
            give_to_sandbox_root(upper, work)
            uppers[name] = upper
        return uppers

    def take_downloads(self) -> list[str]:
        """Copy into the shared caches what apt wrote in this session: new
        regular files of apt's own names, with one link, of bounded size;
        a name apt removed (an overlay whiteout) is removed there too.
        Under the caches' lock, as no overlay of them is mounted then."""
        said: list[str] = []
        with _cache_lock(self._caches):
            for name, upper in self._cache_uppers.items():
                taken = removed = 0
                entries = [e for e in os.scandir(upper) if _TAKEN[name].fullmatch(e.name)]
                self._known = self._indexed({e.name for e in entries if e.name.endswith(".deb")})
                for entry in sorted(entries, key=lambda e: e.name):
                    what = self._take(name, entry)
                    taken += what == "taken"
                    removed += what == "removed"
                if taken or removed:
                    said.append(f"apt cache {name}: {taken} files taken, {removed} removed")
        return said

    def _indexed(self, debs: set[str]) -> dict[str, tuple[int, str]]:
        """deb -> (size, SHA256) of the package files `debs` as the package
        indexes of the session's apt lists give them (the session's own, else
        the shared ones: both only ever written by apt, which checked them
        against their signed InRelease)."""
        wanted = {m.groups(): deb for deb in debs if (m := _DEB_NAME.fullmatch(deb))}
        folders = [self._cache_uppers.get("apt-lists"), self._caches.get("apt-lists")]
        found: dict[str, tuple[int, str]] = {}
        seen: set[str] = set()
        for folder in folders:
            for index in sorted(folder.glob("*_Packages")) if folder and wanted else ():
                if index.name in seen or index.is_symlink() or not index.is_file():
                    continue
                seen.add(index.name)
                found.update(_package_entries(index, wanted))
        return found

    def _take(self, name: str, entry: os.DirEntry[str]) -> str | None:
        shared = self._caches[name] / entry.name
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            # A whiteout: apt deleted the file (an index no longer listed).
            if shared.exists():
                shared.unlink()
                return "removed"
            return None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._taken.get((name, entry.name)) == stamp:
            return None  # taken already, unchanged since
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size > MAX_TAKEN:
                return None
            if entry.name.endswith(".deb"):
                # apt checked it as it downloaded; checked again here, as
                # what the cache gives a later build must be the archive's.
                expected = self._known.get(entry.name)
                if expected is None or expected != (st.st_size, _sha256_fd(fd)):
                    return None
                os.lseek(fd, 0, os.SEEK_SET)
            _put(fd, st, shared)
        finally:
            os.close(fd)
        self._taken[(name, entry.name)] = stamp
        return "taken"

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
            mounts=(
                *host_view(),
                Bind(str(src), "/src", readonly=True),
                # A dependency layer in the private cache: dpkg's setuid programs stay so.
                Bind(str(dest), "/dest", private=True),
            ),
        )
        if spawn(spec).wait() != 0:
            raise BackendError(f"local backend: cannot copy layer {src} to {dest}")

    def keep_session(self) -> str | None:
        """sbuild's --purge-build: the session outlives the build as a
        persistent session (`nsbuild session list`, `shell`, `end`), renamed
        so that the build's own clean-up finds nothing to delete. The build
        directory moves into the session's tree, at /build as the build saw
        it; the dependency layers it runs on are linked into it (the store
        may move or drop them once the build ends); the apt caches' overlays
        are the build's alone and go. Call it before the layer is published."""
        from dataclasses import replace

        from nsbuild.envs.owner import give_to_sandbox_root
        from nsbuild.envs.records import write_record
        from nsbuild.envs.remove import remove_tree
        from nsbuild.envs.session import RECORD

        session, build = self._session, self._build_dir
        if session is None or build is None or session.config.type == "host":
            return None
        if os.path.lexists(session.upper / WORK_DIR.lstrip("/")):
            raise BackendError("cannot keep the session: its /build was written under the bind")
        layers = [Path(p) for p in session.lowers[:-1]]  # the base is last
        gone = [p for p in layers if not p.is_dir()]
        if gone:
            raise BackendError(f"cannot keep the session: its layer {gone[0]} is gone")
        own = [session.dir / f"layer{i}" for i in range(len(layers))]
        self._keep_in_userns(session.dir, build, layers)
        remove_tree(session.dir / "cache")
        # A throwaway session's overlay is volatile, which leaves a mark in
        # its work directory that a later (persistent) mount refuses.
        remove_tree(session.work)
        session.work.mkdir()
        give_to_sandbox_root(session.work)
        kept_id = f"{session.config.name}-{secrets.token_hex(4)}"
        kept_dir = session.dir.parent / kept_id
        kept = replace(session, id=kept_id, dir=kept_dir, kind="persistent", owner=None,
                       lowers=(*(str(kept_dir / p.name) for p in own), *session.lowers[-1:]))
        os.rename(session.dir, kept.dir)
        # Until this record is written the session is still throwaway, of
        # this (live, then dead) process: a crash here leaves what gc removes.
        write_record(kept.dir / RECORD, kept.to_json())
        self._session, self._build_dir = kept, None
        return f"nsbuild session shell {kept.id}"

    def _keep_in_userns(self, session_dir: Path, build: Path, layers: list[Path]) -> None:
        """Move the build directory into the session's upper layer, and link
        (else copy) each layer into the session: in a user namespace with the
        session's id map, where the build user's files are ours to move."""
        from nsbuild.sandbox import Bind, Sandbox, Tmpfs, host_view, spawn

        # One mount for everything, so that links stay on it (no EXDEV).
        top = Path(os.path.commonpath([session_dir, build, *layers]))
        if top == Path("/"):
            raise BackendError("cannot keep the session: its layers are on another tree")
        rel = [f"/top/{p.relative_to(top)}" for p in (session_dir, build, *layers)]
        script = 'set -e; s=$1; mv -- "$2" "$s/upper/build"; shift 2; i=0; for l; do ' \
                 'cp -al -- "$l" "$s/layer$i" 2>/dev/null || { rm -rf -- "$s/layer$i"; ' \
                 'cp -a -- "$l" "$s/layer$i"; }; i=$((i+1)); done'  # fmt: skip
        spec = Sandbox(argv=("sh", "-c", script, "keep", *rel), idmap=self._idmap,
                       root=Tmpfs("/"), mounts=(*host_view(), Bind(str(top), "/top", private=True)))
        if spawn(spec).wait() != 0:
            raise BackendError(f"cannot keep the session: moving {build} into it failed")

    def describe(self) -> str:
        base = (self._session.base or "")[:12]
        return (f"local (environment {self.config.name}, base {base or 'directory'}, "
                f"egress engine {self._engine})")

    # -- running --

    def mirrors(self) -> tuple[str, ...]:
        """URLs of the environment's mirrors: its config, then the apt sources
        of its base, read on the host. Never what the session holds: a
        dependency layer or a script that ran in it could add its own."""
        mirrors: tuple[str, ...] = self._session.mirrors()
        return mirrors

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
        # stderr joins stdout through its own descriptor: the runtime wants
        # three distinct fds to place on 0, 1 and 2.
        err_fd = os.dup(out_fd) if stderr == STDOUT else _fd(stderr, 2)
        try:
            with _stdin_fd(stdin) as in_fd:
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
        from nsbuild.net.launch import run_under
        from nsbuild.sandbox import Bind, Mount, Overlay

        assert self._session is not None
        trusted = user == "root" and network != "none"
        mirrors: tuple[str, ...] = ()
        if network == "allow":
            mirrors = self.mirrors()
        opts = net.NetOptions(
            mode=network,
            allowlist=Allowlist.parse(self.options.allow),
            allow_from_env=network == "allow",
            engine=self._engine,
            # Every run appends to the same file: one network log for the build.
            log_path=self.options.net_log,
        )
        # The build directory is nsbuild's own, under the private cache: the
        # build may make setuid files there (debian/tmp), no one else reaches them.
        # Once keep_session() moved it into the session, it is there as is.
        mounts: list[Mount] = []
        if self._build_dir is not None:
            mounts.append(Bind(str(self._build_dir), WORK_DIR, private=True))
        caches = self._caches if trusted and self._cache_uppers else {}
        for name, host in caches.items():
            upper = self._cache_uppers[name]
            mounts.append(Overlay((str(host),), str(upper), str(upper.parent / "work"),
                                  CACHE_MOUNTS[name], volatile=True))  # fmt: skip
        spec = self._session.sandbox(argv, mounts=mounts, env=tuple((env or {}).items()),
                                     user=None if user == "root" else user, cwd=cwd,
                                     debug=self.options.debug)  # fmt: skip
        with (
            _cache_lock(caches),
            net.network(opts, mirrors=mirrors, trusted_mirrors=self._session.config.mirrors,
                        debug=self.options.debug) as plan,
        ):
            with self._session.in_use():
                status = run_under(plan, spec, stdin=in_fd, stdout=out_fd, stderr=err_fd)
        # Once the plan is closed: the nftables engine reports its allowed
        # traffic and the refusals it did not log one by one at tear-down.
        # Each attempt from inside is a record: a bounded number is kept,
        # and the bounded counts of every run add up.
        room = max(MAX_RECORDS - len(self._records), 0)
        self._records.extend(plan.records()[:room])
        summary = plan.summary()
        if self._net_summary is not None:
            summary = self._net_summary.merge(summary)
        self._net_summary = summary
        return status

    def network_records(self) -> list[dict[str, Any]]:
        return list(self._records)

    def network_summary(self) -> NetSummary | None:
        """Counts of the network attempts of every run so far (None before the
        first run): bounded, whatever the runs did."""
        return self._net_summary

    def close(self) -> None:
        self._stack.close()
        self._session = None
        self._build_dir = None


def egress_engine(options: BackendOptions) -> str:
    """What limits the trusted runs' network (BackendOptions.extra's
    `egress-engine`): "proxy", else "nftables" once it is known usable here."""
    from nsbuild.net.allowlist import Allowlist
    from nsbuild.net.options import ENGINES, check_nftables_usable

    engine = options.extra.get("egress-engine") or "proxy"
    if engine not in ENGINES:
        raise BackendError(f"local backend: egress engine {engine[:40]!r}: expected one of "
                           f"{', '.join(ENGINES)}")  # fmt: skip
    if engine == "nftables":
        check_nftables_usable(Allowlist.parse(options.allow))
    return engine


def _give_files_to(folder: Path, ids: tuple[int, int]) -> None:
    """Hand the files of host root in a shared cache (put there by an older
    nsbuild) to the sandbox's root `ids`, as _put does now."""
    for entry in os.scandir(folder):
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISREG(st.st_mode) and st.st_uid == 0:
            os.chown(entry.path, *ids, follow_symlinks=False)


def _put(fd: int, st: os.stat_result, dest: Path) -> None:
    """Copy the open file `fd` into a shared cache as a new file of nsbuild's
    own (never through a name something else planted), mode 0644, with the
    file's time (apt asks a mirror for what is newer than its InRelease's),
    then renamed over the old one: whole or not at all."""
    out_fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        left = st.st_size
        while left > 0:
            sent = os.sendfile(out_fd, fd, None, min(left, 1 << 30))
            if sent == 0:
                raise OSError(f"{dest.name}: shorter than its size")
            left -= sent
        os.fchmod(out_fd, 0o644)
        # Run by root, a file of host root is nobody's inside: apt there could
        # not chown or chmod its own lists.
        from nsbuild.envs.owner import sandbox_root_ids

        if (ids := sandbox_root_ids()) is not None:
            os.fchown(out_fd, *ids)
        os.utime(out_fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.close(out_fd)
        out_fd = -1
        os.replace(tmp, dest)
    except BaseException:
        if out_fd >= 0:
            os.close(out_fd)
        os.unlink(tmp)
        raise


def _package_entries(index: Path, wanted: dict[tuple[str, ...], str]) -> dict[str, tuple[int, str]]:
    """deb -> (Size, SHA256) of the `wanted` packages ((name, version as in
    the file name, arch) -> deb) that a Packages index lists, in one pass."""
    names = sorted({key[0] for key in wanted})
    start = re.compile(rb"^Package: (" + b"|".join(re.escape(n.encode()) for n in names) + rb")\n",
                       re.M)  # fmt: skip
    found: dict[str, tuple[int, str]] = {}
    with open(index, "rb") as f:
        try:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # empty
            return found
        with data:
            for hit in start.finditer(data):
                end = data.find(b"\n\n", hit.start())
                stanza = data[hit.start() : end if end >= 0 else len(data)].decode(errors="replace")
                fields = dict(re.findall(r"^([A-Za-z0-9-]+): (.*)$", stanza, re.M))
                key = (fields.get("Package", ""), fields.get("Version", "").replace(":", "%3a"),
                       fields.get("Architecture", ""))  # fmt: skip
                with contextlib.suppress(KeyError, ValueError):
                    if key in wanted:
                        found[wanted[key]] = (int(fields["Size"]), fields["SHA256"].lower())
    return found


def _sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    while block := os.read(fd, 1 << 20):
        h.update(block)
    return h.hexdigest()
