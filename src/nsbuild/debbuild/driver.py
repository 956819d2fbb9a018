"""The build driver: one source package, four phases, through a backend.

    Prepare                     fresh session; the source package copied in
                                (phases.py)
    Install build dependencies  trusted: only apt and dpkg run, network `allow`
                                (the environment's mirrors), or a cached layer
                                (deps.py, layers.py)
    Build                       untrusted: dpkg-buildpackage as an unprivileged
                                user, network `none`, fixed path /build/PKG-VERSION
                                (phases.py)
    Collect                     the .changes and the package's own results it
                                lists, copied out (anything else: refused)
                                (collect.py)

The driver knows the environment only as a `Backend` picked by name from the
registry: it never imports a backend module and never touches the
environment by host path. Results are gathered in a temporary directory and
moved to the output directory only when the build succeeded. The .build log
(its path said at the start, readable there as the build runs) and the
network log are kept in any case (a failed build's log is the point): beside
the results, or for a build whose results did not reach the output directory
(it failed, was interrupted, or the directory could not be written), in
nsbuild's cache with those results (report.py). Nothing a build made is lost.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import IO, NoReturn

from nsbuild.backends import Backend, BackendOptions, open_backend
from nsbuild.backends.errors import CopyRefused
from nsbuild.debbuild import binnmu, cross, phases, sections
from nsbuild.debbuild.checks import CheckInputs, run_checks
from nsbuild.debbuild.collect import Collected, ResultNames, collect
from nsbuild.debbuild.delivery import NotDelivered, deliver
from nsbuild.debbuild.deps import DepsPhase
from nsbuild.debbuild.environment import architecture, environment
from nsbuild.debbuild.errors import (
    BuildFailed,
    BuildInterrupted,
    DiskFull,
    UnsatisfiableDependencies,
)
from nsbuild.debbuild.extrarepo import allowed_hosts
from nsbuild.debbuild.hooks import CommandFailed, Facts, Hooks
from nsbuild.debbuild.inputs import Inputs, check_inputs, work_dir
from nsbuild.debbuild.layers import PendingLayer
from nsbuild.debbuild.log import BuildLog, open_copy
from nsbuild.debbuild.outdir import Folder
from nsbuild.debbuild.report import Logs
from nsbuild.debbuild.result import BuildRequest, BuildResult, Stats
from nsbuild.debbuild.steps import Steps
from nsbuild.errors import NsbuildError
from nsbuild.printable import printable

PHASES = ("Prepare", "Install build dependencies", "Build", "Collect")
# How many unmet dependencies the result names, and how long each may be.
UNMET_COUNT, UNMET_LENGTH = 100, 200
# Free space below which the cache's disk is full: what a write that met
# ENOSPC leaves, give or take what was freed since.
FULL_BELOW = 16 << 20
# The package's own failure (its build, or what it left), not its
# dependencies': the next attempt reuses the layer this build kept.
_PACKAGE_FAILED = (BuildFailed, CopyRefused)


class Progress:
    """Phase lines on stderr: what runs now, and how long each phase took."""

    def __init__(self, stream: IO[str] | None) -> None:
        self.stream = stream

    def say(self, text: str) -> None:
        # Names in it come from the source (its changelog's distribution).
        if self.stream is not None:
            print(f"nsbuild: {printable(text)}", file=self.stream, flush=True)


def build(request: BuildRequest, progress: IO[str] | None = sys.stderr) -> BuildResult:
    """Build one package. Returns the result (status "successful") or raises an
    NsbuildError whose `result` attribute carries the partial BuildResult."""
    return _Build(request, Progress(progress)).run()


class _Build:
    def __init__(self, request: BuildRequest, progress: Progress) -> None:
        self.req = request
        self.progress = progress
        self.result = BuildResult(backend=request.backend)
        self.stats = Stats()
        self.env_note: str | None = None
        # Each set once it exists; the end of the build uses what there is.
        self.backend: Backend | None = None
        self.logs: Logs | None = None
        self.pending: PendingLayer | None = None
        self.results: Path | None = None  # the private folder results are collected in
        self.out_dir: Folder | None = None  # --out, once every result reached it
        self.hooks: Hooks | None = None
        self.logs_placed = False
        self.log_copy: IO[bytes] | None = None  # --log-file, open from the start
        self.start = time.monotonic()

    # -- the whole run --

    def run(self) -> BuildResult:
        self.result.started = time.time()
        with ExitStack() as stack:
            tmp = work_dir(stack)
            try:
                if self.req.log_file is not None:
                    # Before anything else: a --log-file that cannot be is bad input.
                    self.log_copy = open_copy(self.req.log_file)
                    stack.callback(self.log_copy.close)
                inputs = check_inputs(self.req, tmp)
                self.result.package, self.result.version = inputs.pkg.source, inputs.pkg.version
                self._run(stack, inputs, tmp)
                self._finish("successful", "")
            except KeyboardInterrupt as e:
                which = "SIGTERM" if isinstance(e, _Terminated) else "SIGINT"
                self._finish("interrupted", f"interrupted ({which})")
                err: NsbuildError = BuildInterrupted("interrupted; everything was torn down")
                err.result = self.result  # type: ignore[attr-defined]
                raise err from None
            except NsbuildError as e:
                self._ended(e, tmp)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                # One of nsbuild's own writes: not the package's failure.
                self._ended(DiskFull(f"{e.strerror}: {e.filename}" if e.filename
                                     else str(e.strerror)), tmp)  # fmt: skip
        return self.result

    def _ended(self, raised: NsbuildError, tmp: Path) -> NoReturn:
        """The end of a build that raised `raised`: what it becomes (see
        _on_full_disk) is raised, the partial result as its `result`."""
        e = _on_full_disk(raised, tmp)
        if not isinstance(e, NotDelivered):
            self._failed_hooks()
        if isinstance(raised, CommandFailed):
            self.result.fail_stage = raised.fail_stage  # sbuild's name for it
        if isinstance(e, UnsatisfiableDependencies):
            self.result.unmet = [printable(u, UNMET_LENGTH)[:UNMET_LENGTH]
                                 for u in e.unmet[:UNMET_COUNT]]  # fmt: skip
        if isinstance(e, (*_PACKAGE_FAILED, NotDelivered)):
            with contextlib.suppress(OSError):
                self._publish_layer(_status(e))
        self._finish(_status(e), str(e))
        e.result = self.result  # type: ignore[attr-defined]
        if e is raised:
            raise e
        raise e from raised

    def _run(self, stack: ExitStack, inputs: Inputs, tmp: Path) -> None:
        pkg = inputs.pkg
        # Before anything is said of the build: an unknown --env is the
        # whole answer.
        env_name, self.env_note = environment(self.req, pkg, self.progress.stream,
                                              self.progress.say)  # fmt: skip
        self.result.environment = env_name
        results = self.results = tmp / "results"
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
        net_log = tmp / "network.jsonl"
        backend = open_backend(
            self.req.backend,
            BackendOptions(
                env=env_name,
                args=self.req.backend_args,
                # An extra repository's host, for the dependency phase only.
                allow=allowed_hosts(self.req),
                caches=("apt-lists", "apt-archives") if self.req.use_cache else (),
                net_log=str(net_log),
                debug=self.req.debug,
                extra={"egress-engine": self.req.egress_engine},
            ),
        )
        stack.callback(backend.close)
        self.backend = backend
        self.result.limitations = backend.capabilities.limitations()
        env_arch = architecture(backend)
        arches = cross.arches(self.req, env_arch, env_name)
        self.req = cross.adjust(self.req, arches)
        res = self.result
        res.architecture, res.build_architecture = arches.host, arches.build
        res.environment_architecture = env_arch
        arch = arches.host
        # Named after the version the results carry (a binNMU's), as sbuild's.
        version = binnmu.version(pkg.version, self.req).split(":", 1)[-1]
        name = f"{pkg.source}_{version}_{arch}"
        echo = self.progress.stream if self.req.verbose else None
        self.logs = Logs(BuildLog(tmp / f"{name}.build", echo, self.log_copy), net_log, name)
        # Private until placed, but the user's to read (and follow) meanwhile.
        self.progress.say(f"log, as the build runs: {self.logs.log.path}")
        self.logs.header(self.req, self.result, backend.describe(), self.env_note)
        steps = Steps(backend, self.logs.log)
        if arches.cross:
            self.progress.say(arches.describe())
            # Before anything is installed: a name dpkg does not know is the
            # request's fault, found in a second.
            cross.check_known(steps, arches.host)
        facts = Facts(dsc=pkg.dsc, build_dir=backend.work_dir, host_arch=arches.host,
                      build_arch=arches.build)  # fmt: skip
        hooks = self.hooks = Hooks(self.req, steps, facts, tmp)
        stack.callback(hooks.close)
        self.result.fail_stage = "pre-build"
        hooks.run("pre-build")
        self.result.fail_stage = "chroot-setup"
        hooks.run("chroot-setup")
        self.result.fail_stage = "prepare"
        user = phases.prepare(steps, pkg, inputs.extras)
        # Before any dependency is installed: a source that does not unpack
        # is the input's fault, found in seconds.
        self.result.fail_stage = "unpack"
        tree = phases.unpack(steps, pkg, user, self.req, arches.host)
        self._phase_done(0, t0)

        t1 = time.monotonic()
        self.progress.say(f"[2/4] {PHASES[1]}")
        self.result.fail_stage = "install-deps"
        deps = DepsPhase(steps, self.req, pkg, arches, inputs.extras, env_name,
                         self.progress.say)  # fmt: skip
        try:
            installed = deps.run(stack)
        except NsbuildError:
            hooks.run("build-deps-failed")
            raise
        self.stats.install_seconds = installed.seconds
        self.result.dependency_layer = installed.layer
        self.pending = installed.pending
        sections.build_environment(steps, user, arches.build, arches.cross)
        self._phase_done(1, t1)

        t2 = time.monotonic()
        self.progress.say(f"[3/4] {PHASES[2]}: dpkg-buildpackage")
        self.result.fail_stage = "build"
        # At its --build-path before the commands that may name it (%b, %p).
        tree = phases.place(steps, pkg, tree, user, self.req)
        facts.build_dir, facts.pkgbuild_dir = tree.dir, tree.path
        self.result.fail_stage = "starting-build"
        hooks.run("starting-build")
        self.result.fail_stage = "build"
        built = phases.build(steps, pkg, user, self.req, tree, arches)
        self.stats.build_seconds, self.stats.space = built.seconds, built.space
        self._phase_done(2, t2)
        # sbuild's order: finished-build whatever dpkg-buildpackage did; after
        # a failure, chroot-cleanup, then build-failed.
        self.result.fail_stage = "finished-build"
        hooks.run("finished-build")
        if built.failed is not None:
            self.result.fail_stage = "chroot-cleanup"
            hooks.run("chroot-cleanup")
            self.result.fail_stage = "build"
            hooks.run("build-failed")
            if self.req.shell_on_failure:
                self.progress.say(
                    f"build failed: opening a shell in {built.tree} (exit it to clean up)"
                )
                phases.shell(steps, user, built.tree, built.env)
            raise BuildFailed(f"{pkg.source} {pkg.version}: {built.failed}")

        t3 = time.monotonic()
        self.progress.say(f"[4/4] {PHASES[3]}")
        self.result.fail_stage = "collect"
        own = ResultNames(pkg, arch, self.req.source, tree.version,
                          phases.source_only_changes(pkg, tree, self.req),
                          binnmu.build_type(self.req))  # fmt: skip
        collected = collect(steps, pkg, own, results, built.dir)
        self.result.artifacts = collected.artifacts
        sections.package_contents(steps, user, built.dir, (a.name for a in collected.artifacts))
        self._phase_done(3, t3)
        changes = next(a.name for a in collected.artifacts if a.name.endswith(".changes"))
        facts.changes = f"{built.dir}/{changes}"
        self.result.fail_stage = "chroot-cleanup"
        hooks.run("chroot-cleanup")
        self.result.fail_stage = "deliver"
        self._deliver(stack, inputs, collected)
        facts.changes = str(inputs.out / changes)
        self.result.checks = run_checks(
            CheckInputs(
                self.req, env_name, arches.build, inputs.out / changes,
                tuple(Path(a.path) for a in self.result.artifacts), self.logs.log,
                self.progress.say, pkg.paths(), arches.host,
            )
        )
        self.result.fail_stage = "post-build"
        hooks.run("post-build")
        self.result.fail_stage = None
        # Last: publishing moves the directory the session has as a lower,
        # and the commands above may still run inside (the exec escape).
        self._publish_layer("successful")

    def _deliver(self, stack: ExitStack, inputs: Inputs, collected: Collected) -> None:
        assert self.logs is not None  # results exist only once the log does
        out_dir = deliver(inputs.out, inputs.pkg, collected, self.result.artifacts,
                          self.logs.kept_dir())  # fmt: skip
        stack.callback(out_dir.close)
        self.out_dir = out_dir

    def _failed_hooks(self) -> None:
        """sbuild's post-build-failed commands: the build's own failure is the
        one reported, whatever they do."""
        if self.hooks is None:
            return
        with contextlib.suppress(NsbuildError):
            self.hooks.run("post-build-failed")

    def _publish_layer(self, status: str) -> None:
        """Publish the layer this build kept, if any (see PendingLayer); a
        session kept for --purge-build is kept first, as publishing moves
        the layer it runs on."""
        self._keep(status)
        pending, self.pending = self.pending, None
        if pending is not None and self.logs is not None:
            if not pending.publish(self.logs.log):
                self.result.dependency_layer = None

    def _keep(self, status: str) -> None:
        """--purge-build: keep the session (once), and say why when it cannot be."""
        if self.backend is None or self.result.session is not None:
            return
        if _keep_session(self.req.purge_build, status):
            try:
                self.result.session = self.backend.keep_session()
            except (NsbuildError, OSError) as e:
                self.progress.say(f"the session is not kept: {e}")

    def _phase_done(self, index: int, start: float) -> None:
        took = time.monotonic() - start
        self.result.phases.append((PHASES[index], took))
        self.progress.say(f"      {PHASES[index]}: {took:.1f}s")

    # -- the end, whatever it is --

    def _finish(self, status: str, message: str) -> None:
        res = self.result
        res.status, res.message = status, message
        res.total_seconds = time.monotonic() - self.start
        if self.backend is not None:
            with contextlib.suppress(Exception):
                res.network_records = self.backend.network_records()
            with contextlib.suppress(Exception):
                res.network_summary = self.backend.network_summary()
        self._keep(status)
        if self.logs is None or self.logs_placed:
            return
        self.logs_placed = True
        self.logs.summary(self.req, res, self.stats)
        try:
            self.logs.place(res, self.out_dir, self.results)
        except NotDelivered:
            if status == "successful":
                raise
        except NsbuildError as e:
            self.progress.say(f"cannot keep this build's logs: {e}")


def _keep_session(purge: str, status: str) -> bool:
    """sbuild's --purge-build: `never` keeps every session, `successful`
    purges only a successful build's."""
    return purge == "never" or (purge == "successful" and status != "successful")


def _on_full_disk(e: NsbuildError, tmp: Path) -> NsbuildError:
    """`e`, or when the disk of nsbuild's cache (where the session, the log
    and the results are; `tmp` is the build's folder there) is full as the
    build ends, an error that says so: the package's failure stays one, any
    other (apt that could not unpack, a copy out) is DiskFull, not a
    dependency that cannot be satisfied."""
    if isinstance(e, (DiskFull, NotDelivered)):
        return e
    try:
        fs = os.statvfs(tmp)
    except OSError:
        return e
    if fs.f_bavail * fs.f_frsize >= FULL_BELOW:
        return e
    text = f"{e} ({os.strerror(errno.ENOSPC)}: nsbuild's cache, {tmp.parent.parent})"
    return BuildFailed(text) if isinstance(e, _PACKAGE_FAILED) else DiskFull(text)


def _status(e: NsbuildError) -> str:
    """The status string of a build that raised `e`."""
    if isinstance(e, NotDelivered):
        return "successful"  # the build did; the exit status says the rest
    if isinstance(e, _PACKAGE_FAILED):
        return "failed"
    if isinstance(e, UnsatisfiableDependencies):
        return "dependency-failed"
    return "error"


class _Terminated(KeyboardInterrupt):
    """SIGTERM, which ends a build as Ctrl-C does."""


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise _Terminated
