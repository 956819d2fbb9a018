"""The build driver: one source package, four phases, through a backend.

    Prepare                     fresh session; the source package copied in
    Install build dependencies  trusted: only apt and dpkg run, network `allow`
                                (the environment's mirrors), or a cached layer;
                                what apt downloads is shared with later builds
                                only from runs of apt alone, before any
                                maintainer script
    Build                       untrusted: dpkg-buildpackage as an unprivileged
                                user, network `none`, fixed path /build/PKG-VERSION
    Collect                     the .changes and the package's own results it
                                lists, copied out (anything else: refused)

The driver knows the environment only as a `Backend` picked by name from the
registry: it never imports a backend module and never touches the
environment by host path. Results are gathered in a temporary directory and
moved to the output directory only when the build succeeded. The .build log
and the network log are kept in any case (a failed build's log is the point):
beside the results, or for a build that did not succeed, in nsbuild's cache
(`log.kept_logs_dir`), so that nothing of it lands in the output directory.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from nsbuild.backends import STDOUT, Backend, BackendOptions, Network, open_backend
from nsbuild.backends.base import MAX_COPY_OUT, CopyRefused, open_regular
from nsbuild.debbuild.cache import DepCache, Syncer, answer_key, layer_key
from nsbuild.debbuild.dsc import SourcePackage, load_dsc, source_from_tree
from nsbuild.debbuild.errors import (
    BuildFailed,
    BuildInputError,
    BuildInterrupted,
    UnsatisfiableDependencies,
)
from nsbuild.debbuild.log import BuildLog, kept_logs_dir
from nsbuild.errors import NsbuildError
from nsbuild.net.netlog import NetSummary
from nsbuild.printable import printable

BUILD_USER = "nsbuild"
BUILD_UID = 2000
# apt's binary caches of the package lists live beside the downloaded
# packages: with the local backend's apt cache mount they are shared by the
# apt runs of a build (update, resolve, install: each would parse the lists
# again, a second or two each) and by the next builds (apt checks them against
# the lists and the dpkg status, and rebuilds them when stale), and they never
# bloat a kept dependency layer.
APT_OPTS = (
    "-o", "Dir::Cache::pkgcache=/var/cache/apt/archives/nsbuild-pkgcache.bin",
    "-o", "Dir::Cache::srcpkgcache=/var/cache/apt/archives/nsbuild-srcpkgcache.bin",
    "-o", "Acquire::Languages=none",
    "-o", "APT::Install-Recommends=false",
    "-o", "APT::Get::Assume-Yes=true",
    "-o", "Dpkg::Use-Pty=false",
    "-o", "quiet=1",
)  # fmt: skip
MAN_DB_OFF = "echo 'man-db man-db/auto-update boolean false' | debconf-set-selections"
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive", "DEBCONF_NONINTERACTIVE_SEEN": "true"}
ANSWER_KNOWN = "the same question on the same package lists as a build before"
PHASES = ("Prepare", "Install build dependencies", "Build", "Collect")


@dataclass(frozen=True)
class BuildRequest:
    input: Path  # a .dsc, or a source tree with debian/
    env: str | None = None
    out: Path | None = None
    arch_any: bool = True
    arch_all: bool = True
    source: bool = False
    jobs: int | None = None
    extra_packages: tuple[Path, ...] = ()
    use_cache: bool = True
    shell_on_failure: bool = False
    backend: str = "local"
    backend_args: tuple[str, ...] = ()
    debug: bool = False


@dataclass
class Artifact:
    name: str
    path: str
    size: int
    sha256: str

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "path": self.path, "size": self.size, "sha256": self.sha256}


@dataclass
class BuildResult:
    package: str = ""
    version: str = ""
    architecture: str = ""
    environment: str = ""
    backend: str = ""
    status: str = "error"
    exit_status: int = 2
    message: str = ""
    phases: list[tuple[str, float]] = field(default_factory=list)
    artifacts: list[Artifact] = field(default_factory=list)
    log: str | None = None
    network_log: str | None = None
    # The first attempts one by one (a bounded number); the summary counts all.
    network_records: list[dict[str, Any]] = field(default_factory=list)
    network_summary: NetSummary | None = None
    dependency_layer: dict[str, object] | None = None
    limitations: list[str] = field(default_factory=list)

    def denied(self) -> list[dict[str, Any]]:
        return [r for r in self.network_records if r.get("decision") != "allow"]

    def attempts(self) -> tuple[int, int]:
        """(attempts, denied) of the whole build: the summary's counts, or
        for a backend without one, its records'."""
        if self.network_summary is not None:
            return self.network_summary.attempts, self.network_summary.denied
        return len(self.network_records), len(self.denied())

    def to_json(self) -> dict[str, object]:
        return {
            "status": self.status,
            "exit_status": self.exit_status,
            "message": self.message,
            "package": self.package,
            "version": self.version,
            "architecture": self.architecture,
            "environment": self.environment,
            "backend": self.backend,
            "phases": [{"name": n, "seconds": round(s, 3)} for n, s in self.phases],
            "artifacts": [a.to_json() for a in self.artifacts],
            "log": self.log,
            "network_log": self.network_log,
            "network": {
                "attempts": self.attempts()[0],
                "denied": [
                    {k: r.get(k) for k in ("time", "kind", "host", "port", "decision", "rule")}
                    for r in self.denied()
                ],
            },
            "dependency_layer": self.dependency_layer,
            "limitations": self.limitations,
        }


class Progress:
    """Phase lines on stderr: what runs now, and how long each phase took."""

    def __init__(self, stream: IO[str] | None) -> None:
        self.stream = stream

    def say(self, text: str) -> None:
        # Names in it come from the source (its changelog's distribution).
        if self.stream is not None:
            print(f"nsbuild: {printable(text)}", file=self.stream, flush=True)


def build(request: BuildRequest, progress: IO[str] | None = sys.stderr) -> BuildResult:
    """Build one package. Returns the result (status 0) or raises an NsbuildError
    whose `result` attribute carries the partial BuildResult."""
    return _Build(request, Progress(progress)).run()


class _Build:
    def __init__(self, request: BuildRequest, progress: Progress) -> None:
        self.req = request
        self.progress = progress
        self.result = BuildResult(backend=request.backend)
        self.log: BuildLog | None = None
        self.env_note: str | None = None
        self.times: dict[str, float] = {}
        self.space = 0
        self.logs_placed = False
        # Results at another version than the source's: never written over a
        # file of --out (it may be another package's, the user's own).
        self.no_replace: set[str] = set()
        self._pending: tuple[DepCache, Path, str, dict[str, object], Syncer] | None = None

    # -- the whole run --

    def run(self) -> BuildResult:
        with ExitStack() as stack:
            tmp = _work_dir(stack)
            try:
                pkg, out = self._check_input(tmp)
                self._run(stack, pkg, out, tmp)
            except KeyboardInterrupt:
                self._finish("interrupted", 130, "interrupted (SIGINT)")
                err: NsbuildError = BuildInterrupted("interrupted; everything was torn down")
                err.result = self.result  # type: ignore[attr-defined]
                raise err from None
            except NsbuildError as e:
                if e.exit_status == 1:
                    # The package failed, not its dependencies: the next
                    # attempt reuses them.
                    with contextlib.suppress(OSError):
                        self._publish_layer()
                status = {1: "failed", 3: "dependency-failed"}.get(e.exit_status, "error")
                self._finish(status, e.exit_status, str(e))
                e.result = self.result  # type: ignore[attr-defined]
                raise
        return self.result

    def _check_input(self, tmp: Path) -> tuple[SourcePackage, Path]:
        src = self.req.input
        if src.is_dir():
            made = tmp / "source"
            made.mkdir()
            pkg = source_from_tree(src, made)
            default_out = src.absolute().parent
        else:
            # The build copies in what load_dsc checked, not whatever stands
            # next to the .dsc by then: that folder may be the package author's.
            checked = tmp / "checked"
            checked.mkdir()
            pkg = load_dsc(src, keep=checked)
            default_out = pkg.directory
        out = (self.req.out or default_out).absolute()
        if out.exists() and not out.is_dir():
            raise BuildInputError(f"--out {out}: not a directory")
        if not (self.req.arch_any or self.req.arch_all or self.req.source):
            raise BuildInputError("nothing to build: give --arch-any, --arch-all or --source")
        extras = tmp / "extra"
        extras.mkdir()
        self.extras = [_take_extra(extra, extras) for extra in self.req.extra_packages]
        self.result.package, self.result.version = pkg.source, pkg.version
        return pkg, out

    def _run(self, stack: ExitStack, pkg: SourcePackage, out: Path, tmp: Path) -> None:
        env_name = self.req.env or self._default_env(pkg)
        self.result.environment = env_name
        results = tmp / "results"
        results.mkdir()
        # SIGTERM takes the same path as Ctrl-C: tear down, then exit.
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        stack.callback(signal.signal, signal.SIGTERM, previous)

        t0 = time.monotonic()
        where = (f"in {env_name}" if self.req.backend == "local"
                 else f"through backend {self.req.backend} {' '.join(self.req.backend_args)}")
        self.progress.say(f"[1/4] {PHASES[0]}: {pkg.source} {pkg.version} {where}".rstrip())
        # Where the backend writes every network attempt: a private file,
        # placed beside the results (or the kept log) at the end.
        self.net_log = tmp / "network.jsonl"
        backend = open_backend(
            self.req.backend,
            BackendOptions(
                env=env_name,
                args=self.req.backend_args,
                caches=("apt-lists", "apt-archives") if self.req.use_cache else (),
                net_log=str(self.net_log),
                debug=self.req.debug,
            ),
        )
        stack.callback(backend.close)
        self.backend = backend
        self.result.limitations = backend.capabilities.limitations()
        arch = self._arch(backend)
        self.result.architecture = arch
        name = f"{pkg.source}_{pkg.upstream_less_epoch}_{arch}"
        self.base_name = name
        self.log = BuildLog(tmp / f"{name}.build")
        self.tmp = tmp
        self.out = out
        self._header(pkg, arch, env_name, backend)
        self.build_user = self._prepare(backend, pkg)
        self._phase_done(0, t0)

        t1 = time.monotonic()
        self.progress.say(f"[2/4] {PHASES[1]}")
        self._install_deps(stack, backend, pkg, arch)
        self._phase_done(1, t1)

        t2 = time.monotonic()
        self.progress.say(f"[3/4] {PHASES[2]}: dpkg-buildpackage")
        failed = self._build(backend, pkg)
        self._phase_done(2, t2)
        if failed is not None:
            if self.req.shell_on_failure:
                self._shell(backend, pkg)
            raise BuildFailed(f"{pkg.source} {pkg.version}: {failed}")

        t3 = time.monotonic()
        self.progress.say(f"[4/4] {PHASES[3]}")
        same_as_input = self._collect(backend, pkg, results)
        self._publish_layer()
        self._phase_done(3, t3)
        # Only now does anything reach --out, opened once for all of it.
        out.mkdir(parents=True, exist_ok=True)
        self.out_dir = _Folder(out)
        stack.callback(self.out_dir.close)
        taken = sorted(n for n in self.no_replace if self.out_dir.has(n))
        if taken:
            raise BuildFailed(
                f"{taken[0]} is in {out} already and is not at {pkg.source}'s version "
                f"{pkg.version}: not replaced"
                + (f" (nor {len(taken) - 1} more)" if len(taken) > 1 else "")
            )
        self._finish("successful", 0, "")
        # The .changes goes last, so a set with its .changes is complete even
        # when a kill comes between moves. A source file the same as the
        # input's is not written over the input itself.
        in_place = self.out_dir.same_as(pkg.directory)
        for art in sorted(self.result.artifacts, key=lambda a: a.name.endswith(".changes")):
            if art.name in same_as_input and in_place:
                art.path = str(out / art.name)
                continue
            replace = art.name not in self.no_replace
            art.path = str(self.out_dir.put(results / art.name, art.name, replace=replace))

    def _default_env(self, pkg: SourcePackage) -> str:
        """The environment named after the changelog's distribution; for the
        local backend, created on first use."""
        from nsbuild.debbuild.distribution import choose, resolve

        choice = choose(pkg.distribution())
        # Environments are the local backend's: another backend gets the name
        # and makes of it what it can.
        if self.req.backend != "local":
            return choice.name
        name, note = resolve(choice, self.progress.stream)
        if note:
            self.progress.say(note)
            self.env_note = note
        return name

    # -- phases --

    def _arch(self, backend: Backend) -> str:
        status, text = backend.check_output(["dpkg", "--print-architecture"])
        arch = text.strip()
        if status != 0 or not re.fullmatch(r"[a-z0-9-]+", arch):
            raise NsbuildError(f"cannot learn the environment's architecture: {text.strip()}")
        return arch

    def _header(self, pkg: SourcePackage, arch: str, env_name: str, backend: Backend) -> None:
        assert self.log is not None
        self.log.header(
            f"{pkg.source} {pkg.version} ({arch})",
            [
                ("Package", pkg.source),
                ("Version", pkg.version),
                ("Source Version", pkg.version),
                ("Distribution", env_name),
                *((("Distribution Note", self.env_note),) if self.env_note else ()),
                ("Machine Architecture", os.uname().machine),
                ("Host Architecture", arch),
                ("Build Architecture", arch),
                ("Build Type", self._build_type()),
                ("Backend", backend.describe()),
                *(("Limitation", text) for text in self.result.limitations),
            ],
        )

    def _build_type(self) -> str:
        parts = [
            p
            for p, on in (
                ("source", self.req.source),
                ("any", self.req.arch_any),
                ("all", self.req.arch_all),
            )
            if on
        ]
        return ",".join(parts)

    def _cmd(self, backend: Backend, argv: Sequence[str], **kw: Any) -> int:
        """Run a command with its output in the log, after a line naming it."""
        assert self.log is not None
        self.log.line(f"$ {' '.join(argv)}")
        start = time.monotonic()
        self.output_start = self.log.path.stat().st_size
        with self.log.command_output() as output:
            status = backend.run(argv, stdout=output, stderr=STDOUT, **kw)
        # Each step's duration: where a phase's time goes, read from the log.
        self.log.line(f"[nsbuild: {argv[0]} exited {status} after {time.monotonic() - start:.1f}s]")
        return status

    def _prepare(self, backend: Backend, pkg: SourcePackage) -> str:
        assert self.log is not None
        self.log.section("Prepare")
        work = backend.work_dir
        user = "root"
        if backend.capabilities.unprivileged_user:
            user = BUILD_USER
            # A build user with no home (as sbuild does: nothing leaks in from
            # one), added by hand: the environment need not have useradd.
            script = (
                f"grep -q '^{user}:' /etc/passwd || {{ "
                f"echo '{user}:x:{BUILD_UID}:{BUILD_UID}:nsbuild build user:"
                f"/nonexistent:/bin/sh' >> /etc/passwd && "
                f"echo '{user}:x:{BUILD_UID}:' >> /etc/group; }}"
            )
            if self._cmd(backend, ["sh", "-c", script]) != 0:
                raise NsbuildError("cannot create the build user inside; see the log")
        else:
            self.log.line("Warning: the backend cannot give an unprivileged user; building as root")
        # Private copies of what was checked (never links), each bounded by
        # the size it was checked at.
        for path in (*pkg.paths(), *self.extras):
            where = f"{work}/extra" if path in self.extras else work
            backend.copy_in(path, f"{where}/{path.name}", limit=path.lstat().st_size)
        self.log.line(f"Copied {len(pkg.paths())} source files to {work}")
        return user

    def _deps(self, pkg: SourcePackage) -> tuple[str, str]:
        deps = ["build-essential", "fakeroot"]
        conflicts = []
        if pkg.build_depends:
            deps.append(pkg.build_depends)
        if pkg.build_conflicts:
            conflicts.append(pkg.build_conflicts)
        if self.req.arch_any:
            deps += [pkg.build_depends_arch] if pkg.build_depends_arch else []
            conflicts += [pkg.build_conflicts_arch] if pkg.build_conflicts_arch else []
        if self.req.arch_all:
            deps += [pkg.build_depends_indep] if pkg.build_depends_indep else []
            conflicts += [pkg.build_conflicts_indep] if pkg.build_conflicts_indep else []
        return ", ".join(deps), ", ".join(conflicts)

    def _install_deps(
        self, stack: ExitStack, backend: Backend, pkg: SourcePackage, arch: str
    ) -> None:
        assert self.log is not None
        log = self.log
        log.section("Install package build dependencies")
        start = time.monotonic()
        caps = backend.capabilities
        if not caps.root_inside:
            log.line("Warning: the backend has no root inside; build dependencies not installed")
            return
        deps, conflicts = self._deps(pkg)
        log.line(f"Build-Depends: {deps}")
        if conflicts:
            log.line(f"Build-Conflicts: {conflicts}")
        network: Network = "allow" if caps.network_per_phase else "host"
        # Without Generate=false, update deletes and rebuilds apt's caches even
        # when no list changed (half a second); the next apt run checks them
        # against the lists and rebuilds them only if they are stale.
        update = ["apt-get", *APT_OPTS, "-o", "pkgCacheFile::Generate=false", "update"]
        status = self._cmd(backend, update, network=network, env=APT_ENV)
        if status != 0:
            raise UnsatisfiableDependencies(
                f"apt-get update failed (exit status {status}); see the log"
            )
        # Only apt has run in the session so far: its package lists may go
        # to the environment's shared cache.
        self._take_downloads(backend)
        satisfy = ["apt-get", *APT_OPTS]
        extras = [f"{backend.work_dir}/extra/{p.name}" for p in self.extras]
        for e in extras:
            satisfy += ["--with-source", e]
        satisfy += ["satisfy", deps]
        if conflicts:
            satisfy.append(f"Conflicts: {conflicts}")
        base = backend.base_id()
        # A layer is reused on its key's word: the archive's packages it
        # names, as their signed archive made them. An extra package (or one
        # from a source apt does not check) is nobody's signed word, and its
        # maintainer scripts ran as root over the whole session: they may have
        # changed other packages' files, apt's configuration or keys, in ways
        # its checksum in the key does not pin (a script may act on the time,
        # on chance, on what it finds). Such a session is used once.
        layers = bool(caps.dependency_layers and base and self.req.use_cache)
        if layers and (self.req.extra_packages or unchecked_sources(backend)):
            log.line(
                "No dependency layer is kept: an extra package, or an apt source or "
                "setting that lets unchecked packages in, puts unsigned packages in this session"
            )
            layers = False
        if not layers or base is None:
            # No layer to look up or to store: apt installs at once, and is
            # asked what it would do only if that fails (to name what is unmet).
            self._install(backend, satisfy, network)
            self.times["install"] = time.monotonic() - start
            return

        cache = DepCache()
        extra_sums = [_sha256(p) for p in self.extras]
        # apt's answer is a function of the question and of what it knows:
        # when both are as in an earlier build, so is the answer (its layer).
        lists = self._lists_state(backend, network)
        question = (
            answer_key(base, arch, satisfy, extra_sums, lists) if lists is not None else None
        )
        known = cache.recall(question) if question else None
        if known and self._use_layer(stack, backend, cache, known, ANSWER_KNOWN):
            self.times["install"] = time.monotonic() - start
            return
        resolution = self._resolve(backend, satisfy, network)
        log.line(f"Resolved: {len(resolution)} package actions")
        for line in resolution:
            log.line(f"  {line}")
        key = layer_key(base, arch, resolution, extra_sums)
        if question:
            cache.remember(question, key)
        if self._use_layer(stack, backend, cache, key, "same resolution"):
            self.times["install"] = time.monotonic() - start
            return
        self._install(backend, satisfy, network)
        self.times["install"] = time.monotonic() - start
        self._keep_layer(stack, backend, cache, key, base, arch, resolution)

    def _use_layer(
        self, stack: ExitStack, backend: Backend, cache: DepCache, key: str, why: str
    ) -> bool:
        """Build on the stored layer `key`, if there is one."""
        assert self.log is not None
        layer = stack.enter_context(cache.use(key))
        if layer is None:
            return False
        backend.use_layer(layer.path)
        self.log.line(f"Using cached dependency layer {key[:16]} ({why}; {layer.path})")
        if why == ANSWER_KNOWN:
            with contextlib.suppress(OSError, ValueError, TypeError):
                packages = json.loads((layer.path.parent / "layer.json").read_text())["packages"]
                self.log.line(f"Resolved (as before): {len(packages)} package actions")
                for line in packages:
                    self.log.line(f"  {line}")
        self.progress.say(f"      using cached dependency layer {key[:16]}")
        self.result.dependency_layer = {"key": key, "cached": True}
        return True

    def _lists_state(self, backend: Backend, network: Network) -> str | None:
        """What apt knows of the archive: every file of its lists (name, size,
        time) and the checksum of each Release file, which pins the content
        of the package lists. None if it cannot be told."""
        script = (
            "cd /var/lib/apt/lists || exit 1; for f in *; do "
            "[ -f \"$f\" ] && [ \"$f\" != lock ] && stat -c '%n %s %Y' -- \"$f\"; done; "
            "for f in *Release; do [ -f \"$f\" ] && sha256sum -- \"$f\"; done; true"
        )
        status, text = backend.check_output(["sh", "-c", script], network=network)
        return text if status == 0 and text.strip() else None

    def _install(self, backend: Backend, satisfy: list[str], network: Network) -> None:
        # Nothing a build reads comes from man-db's index of manual pages;
        # building it when man-db is installed costs seconds.
        self._cmd(backend, ["sh", "-c", MAN_DB_OFF])
        # Downloads first, in a run of apt alone, which checks each package
        # against the signed indexes: those may go to the shared cache. Then
        # dpkg runs the packages' maintainer scripts, and from then on
        # nothing of the session is taken (they could plant anything).
        download = [satisfy[0], "--download-only", *satisfy[1:]]
        if self._cmd(backend, download, network=network, env=APT_ENV) == 0:
            self._take_downloads(backend)
        status = self._cmd(backend, satisfy, network=network, env=APT_ENV)
        if status != 0:
            # Unmet dependencies are named (exit status 3) by the resolver.
            self._resolve(backend, satisfy, network)
            raise UnsatisfiableDependencies(
                f"installing build dependencies failed (exit status {status}); see the log"
            )
        # No `apt-get clean`: the downloaded packages are in the apt cache
        # mount (kept for the next build), or in a session that is thrown away.

    def _take_downloads(self, backend: Backend) -> None:
        assert self.log is not None
        for line in backend.take_downloads():
            self.log.line(line)

    def _keep_layer(
        self,
        stack: ExitStack,
        backend: Backend,
        cache: DepCache,
        key: str,
        base: str | None,
        arch: str,
        resolution: list[str],
    ) -> None:
        """Set the installed state aside as a layer and build on it at once.

        The session ran with fsync off, so the layer's files may still be only
        in memory: a background syncfs writes them out while the package
        builds, and the layer is published under its key (`_publish_layer`)
        only after that, at the end of the build. Until then it serves this
        build from its staging directory, which gc leaves alone while we live
        and removes if we die."""
        assert self.log is not None
        staging = cache.staging()
        meta: dict[str, object] = {
            "environment": self.result.environment,
            "base": base,
            "architecture": arch,
            "packages": resolution,
            "extra_packages": [p.name for p in self.extras],
        }
        try:
            backend.keep_layer(staging / "layer")
            backend.use_layer(staging / "layer")
            syncer = Syncer(staging)
        except BaseException:
            cache.discard(staging)
            raise
        self._pending = (cache, staging, key, meta, syncer)
        stack.callback(self._drop_pending)
        self.log.line(f"Kept dependency layer {key[:16]} (published when the build ends)")
        self.result.dependency_layer = {"key": key, "cached": False}

    def _publish_layer(self) -> None:
        """Publish the layer kept by this build, once its files are on disk.
        Runs when nothing runs inside any more: publishing moves the directory
        the session has as a lower."""
        if self._pending is None:
            return
        assert self.log is not None
        cache, staging, key, meta, syncer = self._pending
        self._pending = None
        try:
            took = syncer.wait()
        except OSError as e:
            self.log.line(f"Dependency layer {key[:16]} not stored: {e}")
            cache.discard(staging)
            self.result.dependency_layer = None
            return
        if cache.commit(staging, key, meta) is None:
            # Another build stored the same layer first: that one serves.
            cache.discard(staging)
        self.log.line(f"Stored dependency layer {key[:16]} (written to disk in {took:.1f}s, "
                      "during the build)")  # fmt: skip

    def _drop_pending(self) -> None:
        """An unpublished layer (interrupted build) goes with the build."""
        if self._pending is not None:
            cache, staging, *_rest, syncer = self._pending
            self._pending = None
            with contextlib.suppress(OSError):
                syncer.wait()
            self.backend.close()
            cache.discard(staging)

    def _resolve(self, backend: Backend, satisfy: list[str], network: Network) -> list[str]:
        """apt's own answer to "what would satisfy these?", without installing.
        Unmet dependencies end the build with exit status 3."""
        assert self.log is not None
        argv = [satisfy[0], "-s", *satisfy[1:]]
        self.log.line(f"$ {' '.join(argv)}")
        start = time.monotonic()
        status, text = backend.check_output(argv, stderr=STDOUT, env=APT_ENV, network=network)
        self.log.line(f"[nsbuild: {argv[0]} exited {status} after {time.monotonic() - start:.1f}s]")
        actions = []
        for line in text.splitlines():
            m = re.match(r"^(Inst|Remv) (\S+)(?: \[([^\]]*)\])?(?: \((\S+)[^)]*\[(\S+)\]\))?", line)
            if m:
                verb, name, _old, new, a = m.groups()
                actions.append(
                    f"{'install' if verb == 'Inst' else 'remove'} {name}"
                    + (f" {new} {a}" if new else "")
                )
        unmet = _unmet(text)
        if status != 0 or unmet or "E: " in text:
            self.log.write(text)
            if not unmet:
                unmet = [ln[3:] for ln in text.splitlines() if ln.startswith("E: ")]
            listing = "; ".join(unmet) or f"apt-get exit status {status}"
            raise UnsatisfiableDependencies(
                f"unsatisfiable build dependencies: {listing}", tuple(unmet)
            )
        return sorted(actions)

    def _build(self, backend: Backend, pkg: SourcePackage) -> str | None:
        """Unpack and build; None when it succeeded, else which step failed and why."""
        assert self.log is not None
        log = self.log
        log.section("Build")
        work = backend.work_dir
        user = self.build_user
        tree = f"{work}/{pkg.source}-{pkg.upstream_less_epoch}"
        self.tree = tree
        start = time.monotonic()
        if user != "root":
            if self._cmd(backend, ["chown", "-R", f"{user}:{user}", work]) != 0:
                raise NsbuildError("cannot hand the build directory to the build user")
        status = self._cmd(
            backend,
            ["dpkg-source", "--no-check", "-x", pkg.dsc.name, tree],
            user=user, cwd=work,
        )  # fmt: skip
        if status != 0:
            return self._failed("dpkg-source -x", status)
        status, text = backend.check_output(
            ["dpkg-parsechangelog", "-STimestamp"], user=user, cwd=tree
        )
        epoch = text.strip()
        if status != 0 or not epoch.isdigit():
            log.line(f"cannot read the changelog's date: {text.strip()}")
            return f"cannot read the changelog's date (exit status {status}); see the log"
        env = {
            "SOURCE_DATE_EPOCH": epoch,
            "DEB_BUILD_OPTIONS": self._build_options(),
            "HOME": "/nonexistent",
            "USER": user,
            "LOGNAME": user,
            "LC_ALL": "C.UTF-8",
            "TZ": "UTC",
        }
        for name in ("DEB_BUILD_PROFILES",):
            if os.environ.get(name):
                env[name] = os.environ[name]
        log.line(f"SOURCE_DATE_EPOCH={epoch}")
        log.line(f"DEB_BUILD_OPTIONS={env['DEB_BUILD_OPTIONS']}")
        argv = ["dpkg-buildpackage", "-us", "-uc", f"--build={self._build_type()}"]
        # The package's own code runs here: unprivileged, no network.
        status = self._cmd(backend, argv, user=user, cwd=tree, network="none", env=env)
        self.times["build"] = time.monotonic() - start
        _, text = backend.check_output(["du", "-sk", tree])
        with contextlib.suppress(ValueError, IndexError):
            self.space = int(text.split()[0]) * 1024
        failed = self._failed("dpkg-buildpackage", status) if status != 0 else None
        log.line()
        log.line(f"dpkg-buildpackage exit status: {status}")
        return failed

    def _failed(self, step: str, status: int) -> str:
        """What a failed step says: its name, and its last line of output
        (where dpkg's tools say why they stop), escaped: the package chose it."""
        assert self.log is not None
        tool = step.split()[0]
        with open(self.log.path, "rb") as f:
            start = max(self.output_start, f.seek(0, os.SEEK_END) - 4096)
            f.seek(start)
            lines = f.read().decode(errors="surrogateescape").splitlines()
        # The log's own line after each command ("[nsbuild: ... exited ...]").
        said = [ln for ln in lines if ln.strip() and not ln.startswith("[nsbuild: ")]
        if not said:
            return f"{step} failed (exit status {status}); see the log"
        last = said[-1].strip().removeprefix(f"{tool}: error: ")
        return f"{step} failed: {printable(last, 300)}"

    def _build_options(self) -> str:
        opts = [
            o
            for o in os.environ.get("DEB_BUILD_OPTIONS", "").split()
            if not o.startswith("parallel=")
        ]
        jobs = self.req.jobs or os.cpu_count() or 1
        return " ".join([*opts, f"parallel={jobs}"])

    def _collect(self, backend: Backend, pkg: SourcePackage, results: Path) -> set[str]:
        """Copy out the .changes and what it lists. The .changes is the build's
        own word: only names that are this package's results are taken (never
        another file of --out, nor nsbuild's logs), each bounded by the size
        the .changes gives and checked against its checksum. Returns the
        names of source files the same as the input's."""
        assert self.log is not None
        self.log.section("Collect")
        work = backend.work_dir
        own = _ResultNames(pkg, self.result.architecture, self.req.source)
        status, text = backend.check_output(["ls", "-1", work])
        changes = [n for n in text.splitlines() if n in own.changes]
        if status != 0 or len(changes) != 1:
            found = ", ".join(changes)
            raise BuildFailed(f"no single {own.prefix}*.changes after the build (found: {found})")
        names = [changes[0]]
        backend.copy_out(f"{work}/{changes[0]}", results / changes[0], limit=MAX_CHANGES)
        listed = _changes_files(results / changes[0])
        for fname, _size, _sha in listed:
            if "/" in fname or fname in (".", ".."):
                raise BuildFailed(f"{changes[0]} lists a file with a path: '{fname}'")
        refused = [fname for fname, _size, _sha in listed if not own.result(fname)]
        if refused:
            more = f" and {len(refused) - 10} more" if len(refused) > 10 else ""
            raise BuildFailed(
                f"{changes[0]} lists files that are not results of {pkg.source} "
                f"{pkg.version}, refused: " + ", ".join(f"'{n}'" for n in refused[:10]) + more
            )
        _check_sizes(changes[0], listed)
        for fname, size, sha in listed:
            if fname in names:
                continue
            got = results / fname
            backend.copy_out(f"{work}/{fname}", got, limit=size)
            if got.stat().st_size != size or (sha and _sha256(got) != sha):
                raise BuildFailed(f"{fname}: does not match its checksum in {changes[0]}")
            if _DEB_NAME.fullmatch(fname) and not _is_deb(got):
                raise BuildFailed(f"{fname}: not a Debian package (no ar archive of debian-binary)")
            names.append(fname)
            if not own.own_version(fname):
                self.no_replace.add(fname)
        same = self._same_as_input(pkg, results, names)
        for n in names:
            p = results / n
            art = Artifact(n, str(p), p.stat().st_size, _sha256(p))
            self.result.artifacts.append(art)
            self.log.line(f"{n} {art.size} {art.sha256}")
        return same

    def _same_as_input(self, pkg: SourcePackage, results: Path, names: list[str]) -> set[str]:
        """The results named like a file of the input .dsc (with --source, by
        default next to the user's own files). The .dsc and the Debian part
        are the source build asked for and replace the input's, as with
        sbuild; an upstream tarball never changes in a source build, and other
        revisions reuse it: one the build made differently fails the build,
        named. Returns the names identical to the input (nothing to write)."""
        if pkg.kept is None:  # built from a tree: the input is no such file
            return set()
        inputs = {p.name: p for p in pkg.paths()}
        named = [n for n in names if n in inputs]
        same = {n for n in named if _sha256(results / n) == _sha256(inputs[n])}
        forged = [n for n in named if n not in same and _ORIG.search(n)]
        if forged:
            raise BuildFailed(
                f"{pkg.source} {pkg.version}: upstream tarballs the build made differ from the "
                "input's of the same name, refused: " + ", ".join(f"'{n}'" for n in forged)
            )
        return same

    def _shell(self, backend: Backend, pkg: SourcePackage) -> None:
        self.progress.say(f"build failed: opening a shell in {self.tree} (exit it to clean up)")
        backend.run(
            ["/bin/bash", "-i"],
            user=self.build_user,
            cwd=self.tree,
            network="none",
            env={"PS1": "(nsbuild: failed build) \\w\\$ "},
            # The one run that reads the user's terminal: the shell asked for.
            stdin=0,
        )

    def _phase_done(self, index: int, start: float) -> None:
        took = time.monotonic() - start
        self.result.phases.append((PHASES[index], took))
        self.progress.say(f"      {PHASES[index]}: {took:.1f}s")

    # -- the end, whatever it is --

    def _finish(self, status: str, exit_status: int, message: str) -> None:
        res = self.result
        res.status, res.exit_status, res.message = status, exit_status, message
        backend = getattr(self, "backend", None)
        if backend is not None:
            with contextlib.suppress(Exception):
                res.network_records = backend.network_records()
            with contextlib.suppress(Exception):
                res.network_summary = backend.network_summary()
        if self.log is None or self.logs_placed:
            return
        self.logs_placed = True
        if status == "interrupted":
            # Nothing reaches --out from an interrupted build, not even its log.
            self.log.close()
            return
        log = self.log
        log.section("Summary")
        if message:
            # It may quote the build (file names): one line, whatever they hold.
            log.line(printable(message, 4096))
            log.line()
        times = dict(res.phases)
        fields = [
            ("Build Architecture", res.architecture),
            ("Build Type", self._build_type()),
            ("Build-Space", str(self.space // 1024) if self.space else "n/a"),
            ("Build-Time", str(int(self.times.get("build", 0)))),
            ("Distribution", res.environment),
            ("Host Architecture", res.architecture),
            ("Install-Time", str(int(self.times.get("install", 0)))),
            ("Job", self.req.input.name),
            ("Machine Architecture", os.uname().machine),
            ("Package", res.package),
            ("Package-Time", str(int(sum(times.values())))),
            ("Source-Version", res.version),
            ("Space", str(self.space // 1024) if self.space else "n/a"),
            ("Status", status),
            ("Version", res.version),
        ]
        if res.dependency_layer:
            state = "cached" if res.dependency_layer["cached"] else "stored"
            fields.append(("Dependency-Layer", f"{state} {str(res.dependency_layer['key'])[:16]}"))
        fields.append(("Network-Denied", str(res.attempts()[1])))
        log.fields(fields)
        for name, took in res.phases:
            log.line(f"Phase {name}: {took:.1f}s")
        log.line("-" * 80)
        log.close()
        # A successful build's logs go to --out beside its results; a failed
        # build writes nothing there, its logs are kept apart (and named).
        if status == "successful":
            self._put_logs(self.out_dir)
        else:
            where = kept_logs_dir(self.base_name)
            where.mkdir(parents=True, exist_ok=True)
            folder = _Folder(where)
            try:
                self._put_logs(folder)
            finally:
                folder.close()

    def _put_logs(self, folder: _Folder) -> None:
        assert self.log is not None
        res = self.result
        res.log = str(folder.put(self.log.path, self.log.path.name))
        if not self.net_log.exists():
            # The backend keeps no file of its own: what it recorded, the
            # first records only, as lines.
            self.net_log.write_text("".join(json.dumps(r) + "\n" for r in res.network_records))
        res.network_log = str(folder.put(self.net_log, f"{self.base_name}.network.jsonl"))


# A source that may let an unsigned package in: an option about trust or
# insecurity (any spelling, any value), or a local repository (whose
# Release file, if any, is whoever made it).
_UNCHECKED_SOURCE = re.compile(
    r"trusted|allow-insecure|allow-weak|allow-downgrade|\b(file|copy|cdrom):", re.IGNORECASE
)
# A line of `apt-config dump`, and the settings that let unsigned packages in
# (at any scope, as Binary::apt::APT::Get::AllowUnauthenticated), unless off.
_APT_SETTING = re.compile(r'^(\S+) "(.*)";$', re.MULTILINE)
_UNCHECKED_SETTING = re.compile(
    r"AllowUnauthenticated|AllowInsecure|AllowDowngrade|AllowWeak|allow-unauthenticated",
    re.IGNORECASE,
)
_OFF = {"0", "no", "false", "off", "without", "disable"}
# A .changes is a few KiB; one larger than this was not made by dpkg-genchanges.
MAX_CHANGES = 16 << 20
# An upstream tarball of a source package (main or component), or its signature.
_ORIG = re.compile(r"\.orig(-[A-Za-z0-9][A-Za-z0-9-]*)?\.tar\.[a-z0-9]+(\.asc)?$")
# What a file name in a .changes may be: Debian's package, version and
# architecture characters, nothing a shell or a terminal reads specially.
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+~_-]{0,254}")
_DEB_NAME = re.compile(
    r"([a-z0-9][a-z0-9.+-]*)_([0-9][A-Za-z0-9.+~-]*)_([a-z0-9-]+)\.(deb|udeb|ddeb)"
)


class _ResultNames:
    """The names a build of `pkg` may leave as results: its .changes and
    .buildinfo, the .debs of the binary packages its .dsc declares (and their
    -dbgsym), and with --source its own source files. Not nsbuild's logs
    (`.build`, `.network.jsonl`), not another package's files."""

    def __init__(self, pkg: SourcePackage, arch: str, source: bool) -> None:
        self.prefix = f"{pkg.source}_{pkg.upstream_less_epoch}_"
        arches = (arch, "all", "source")
        self.changes = {f"{self.prefix}{a}.changes" for a in arches}
        self.buildinfo = {f"{self.prefix}{a}.buildinfo" for a in arches}
        self.binaries = {*pkg.binaries, *(f"{b}-dbgsym" for b in pkg.binaries)}
        self.deb_arches = {arch, "all"}
        self.sources = {p.name for p in pkg.paths()} if source else set()
        self.version = re.compile(re.escape(pkg.upstream_less_epoch) + r"(\+b[0-9]+)?")

    def result(self, name: str) -> bool:
        if not _FILE_NAME.fullmatch(name):
            return False
        if name in self.changes or name in self.buildinfo or name in self.sources:
            return True
        m = _DEB_NAME.fullmatch(name)
        # Any version: a source may give its binaries versions of their own.
        return bool(m and m.group(1) in self.binaries and m.group(3) in self.deb_arches)

    def own_version(self, name: str) -> bool:
        """Whether a result is at this source's own version (a .deb may add a
        binNMU's +bN): only such a file may replace one of its name in --out.
        A .deb at another version may be another source's, the user's own."""
        m = _DEB_NAME.fullmatch(name)
        return m is None or bool(self.version.fullmatch(m.group(2)))


# The largest extra package taken (the largest .debs are a few GiB).
MAX_EXTRA = 8 << 30


def _take_extra(path: Path, folder: Path) -> Path:
    """A private copy, in `folder`, of the package the user named with
    --extra-package: the user's own path followed once, the file it leads to
    opened once (no link followed then), checked to be a regular file of
    bounded size and copied as it is read. The build gets this copy: the
    named file may be swapped (for a link to the user's home, say) once checked."""
    if not path.name.endswith((".deb", ".udeb")):
        raise BuildInputError(f"--extra-package {path}: not a .deb file")
    try:
        source = open_regular(path.resolve(), MAX_EXTRA)
    except CopyRefused as e:
        raise BuildInputError(f"--extra-package {path}: {e}") from None
    copy = folder / path.name
    try:
        with source, copy.open("xb") as out:
            left = os.fstat(source.fileno()).st_size
            while left >= 0 and (block := source.read(min(1 << 20, left + 1))):
                out.write(block)
                left -= len(block)
    except OSError as e:
        raise BuildInputError(f"--extra-package {path}: {e.strerror}") from None
    if left != 0:
        raise BuildInputError(f"--extra-package {path}: changed while it was read")
    return copy


class _Folder:
    """A folder results and logs are written into, opened once (the path the
    user gave followed then, never again). Each file arrives under a name of
    its own and is renamed over its final name: a link or file already there
    is replaced, never written through."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise NsbuildError(f"cannot open {path}: {e.strerror}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def same_as(self, path: Path) -> bool:
        try:
            return os.path.samestat(os.fstat(self.fd), os.stat(path))
        except OSError:
            return False

    def has(self, name: str) -> bool:
        """Whether `name` is here (as anything, a link included)."""
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def put(self, src: Path, name: str, *, replace: bool = True) -> Path:
        """Move the private file `src` here as `name`: renamed on the same
        filesystem, else copied into a new file beside `name`, then renamed.
        With replace=False, linked into place instead: an existing `name` is
        left as it is, and the move refused."""
        src_dir = os.open(src.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._place(src.name, src_dir, name, replace)
            if not replace:
                os.unlink(src.name, dir_fd=src_dir)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise self._refused(name, e) from None
            self._copy(src, name, replace)
            os.unlink(src.name, dir_fd=src_dir)
        finally:
            os.close(src_dir)
        return self.path / name

    def _place(self, src: str, src_dir: int, name: str, replace: bool) -> None:
        if replace:
            os.rename(src, name, src_dir_fd=src_dir, dst_dir_fd=self.fd)
        else:
            os.link(src, name, src_dir_fd=src_dir, dst_dir_fd=self.fd, follow_symlinks=False)

    def _refused(self, name: str, e: OSError) -> NsbuildError:
        if e.errno == errno.EEXIST:
            return NsbuildError(f"{self.path / name} exists and is not this build's: not replaced")
        return NsbuildError(f"cannot write {self.path / name}: {e.strerror}")

    def _copy(self, src: Path, name: str, replace: bool = True) -> None:
        part = f".{name}.{secrets.token_hex(4)}.part"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(part, flags, 0o644, dir_fd=self.fd)
        except OSError as e:
            raise NsbuildError(f"cannot write in {self.path}: {e.strerror}") from None
        try:
            os.fchmod(fd, 0o644)  # whatever the umask
            with open(src, "rb") as f, open(fd, "wb", closefd=False) as out:
                shutil.copyfileobj(f, out, 1 << 20)
            self._place(part, self.fd, name, replace)
            if not replace:
                os.unlink(part, dir_fd=self.fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(part, dir_fd=self.fd)
            raise self._refused(name, e) from None
        finally:
            os.close(fd)


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _unmet(text: str) -> list[str]:
    """The dependencies apt names after "The following packages have unmet dependencies"."""
    out: list[str] = []
    lines = text.splitlines()
    try:
        i = next(n for n, ln in enumerate(lines) if "have unmet dependencies" in ln)
    except StopIteration:
        return out
    for line in lines[i + 1 :]:
        if not line.startswith(" "):
            break
        m = re.search(r"(?:Depends|Conflicts|Breaks|PreDepends): (.*)$", line)
        if m:
            out.append(m.group(1).strip())
    return out


def _work_dir(stack: ExitStack) -> Path:
    """The build's private host directory (log in progress, results before they
    move to --out), removed at the end. It lives in nsbuild's cache under a name
    that says which process made it, so `nsbuild gc` removes it after a crash."""
    from nsbuild.debbuild.cache import builds_root
    from nsbuild.envs.owner import tmp_name
    from nsbuild.envs.paths import private_cache_dir
    from nsbuild.envs.remove import remove_tree

    # Under the cache's top, which no other user may walk into: the build
    # directory, the session's and the results may hold setuid files.
    private_cache_dir()
    root = builds_root()
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / tmp_name()
    tmp.mkdir(mode=0o700)
    stack.callback(remove_tree, tmp)
    return tmp


def unchecked_sources(backend: Backend) -> bool:
    """Whether apt in this session may install packages no signature
    vouches for. apt spells its booleans many ways (yes, true, 1, on...),
    so no value is interpreted: a source with any option about trust or
    insecurity, or a local (file:, copy:, cdrom:) one, is enough; so is
    an Allow* setting of apt's that is not plainly off, or any failure
    to tell. Run before any maintainer script, by apt's own tools."""
    # The source lists where apt's configuration (which may move them) says.
    sources = (
        'eval "$(apt-config shell SL Dir::Etc::sourcelist/f SP Dir::Etc::sourceparts/d)" '
        '&& cat -- "$SL" "$SP"*.list "$SP"*.sources 2>/dev/null; true'
    )
    status, text = backend.check_output(["sh", "-c", sources])
    if status != 0:
        return True
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    if any(_UNCHECKED_SOURCE.search(ln) for ln in lines):
        return True
    status, text = backend.check_output(["apt-config", "dump"])
    if status != 0:
        return True
    for m in _APT_SETTING.finditer(text):
        if _UNCHECKED_SETTING.search(m.group(1)) and m.group(2).lower() not in _OFF:
            return True
    return False


# What one build may write to --out, all its results together.
MAX_RESULTS = MAX_COPY_OUT
# How every .deb, .udeb and .ddeb begins: an ar archive whose first member
# is debian-binary.
_DEB_MAGIC = b"!<arch>\ndebian-binary"


def _check_sizes(changes: str, listed: list[tuple[str, int, str | None]]) -> None:
    """Refuse, before anything is copied, a result or a set of results
    larger than any build makes: the .changes is the build's own word."""
    for fname, size, _sha in listed:
        if not 0 <= size <= MAX_COPY_OUT:
            raise BuildFailed(f"{changes} lists {fname} of {size} bytes, over {MAX_COPY_OUT}")
    total = sum(size for _f, size, _s in listed)
    if total > MAX_RESULTS:
        raise BuildFailed(
            f"{changes} lists {total} bytes of results, over the bound of {MAX_RESULTS} bytes"
        )


def _is_deb(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(len(_DEB_MAGIC)) == _DEB_MAGIC


def _changes_files(path: Path) -> list[tuple[str, int, str | None]]:
    """(name, size, sha256) of each file a .changes lists. The .changes comes
    out of the build: a malformed one is the build's failure, said in one line."""
    from debian.deb822 import Changes

    try:
        with open(path, encoding="utf-8") as f:
            changes = Changes(f)
        sha = {e["name"]: e["sha256"] for e in changes.get("Checksums-Sha256", [])}
        return [(e["name"], int(e["size"]), sha.get(e["name"]))
                for e in changes.get("Files", [])]  # fmt: skip
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise BuildFailed(f"{path.name}: malformed .changes left by the build ({e!r})") from None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


__all__ = ["BuildRequest", "BuildResult", "build"]
