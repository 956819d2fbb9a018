"""What a build is asked to do, and what it reports: plain records."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

from nsbuild.net.netlog import NetSummary


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
    # -- sbuild's everyday options, with sbuild's meaning (see `man sbuild`) --
    dist: str | None = None  # -d: picks the environment; the .changes' Distribution
    create_env: bool = True  # False: --no-create, never run mmdebstrap on the way
    verbose: bool = False  # -v: the build's output on stderr as it runs
    source_only_changes: bool = False
    profiles: tuple[str, ...] = ()  # -P: DEB_BUILD_PROFILES, also for Build-Depends
    debbuildopts: tuple[str, ...] = ()  # more dpkg-buildpackage arguments, in order
    extra_repositories: tuple[str, ...] = ()  # 'deb URL SUITE COMP...' lines
    extra_repository_keys: tuple[Path, ...] = ()
    add_depends: tuple[str, ...] = ()
    add_conflicts: tuple[str, ...] = ()
    add_depends_arch: tuple[str, ...] = ()
    add_conflicts_arch: tuple[str, ...] = ()
    add_depends_indep: tuple[str, ...] = ()
    add_conflicts_indep: tuple[str, ...] = ()
    binnmu: int | None = None  # N of +bN; None or 0: no +bN suffix
    make_binnmu: str | None = None  # the binNMU changelog entry's text
    append_to_version: str | None = None
    maintainer: str | None = None  # -m
    uploader: str | None = None  # -e
    build_path: str | None = None  # the build tree's path inside
    clean_source: bool = True  # False: build a source tree as it is
    purge_build: str = "always"  # always | successful | never: drop the session?
    # External commands by stage (hooks.STAGES), each a /bin/sh command line.
    commands: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Checks after a successful build, each with its own options.
    run_lintian: bool = False
    lintian_opts: tuple[str, ...] = ()
    run_autopkgtest: bool = False
    autopkgtest_opts: tuple[str, ...] = ()
    run_piuparts: bool = False
    # --host-arch (sbuild's --host): cross-build for this architecture; None
    # builds for the environment's own.
    host_arch: str | None = None
    # sbuild's --build: must be the environment's architecture (checked once known).
    build_arch: str | None = None
    # Whether arch_all was chosen (-A, --no-arch-all, the file): else a cross
    # build leaves the arch-all packages out, as sbuild's default does.
    arch_all_given: bool = False
    # --log-file: the .build log is also written here as the build runs.
    log_file: Path | None = None
    # --egress-engine: proxy (rootless) or nftables (root) for the dependency phase.
    egress_engine: str = "proxy"

    def commands_for(self, stage: str) -> tuple[str, ...]:
        """The external commands of one stage, in the order given."""
        return tuple(c for s, cmds in self.commands if s == stage for c in cmds)

    def build_type(self) -> str:
        """dpkg-buildpackage's --build value, as sbuild's logs name it."""
        chosen = (("source", self.source), ("any", self.arch_any), ("all", self.arch_all))
        return ",".join(part for part, on in chosen if on)


@dataclass
class Artifact:
    name: str
    path: str
    size: int
    sha256: str

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "path": self.path, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class LayerUse:
    """The dependency layer a build ran on: taken from the cache, or stored by it."""

    key: str
    cached: bool

    def to_json(self) -> dict[str, object]:
        return {"key": self.key, "cached": self.cached}


@dataclass
class CheckResult:
    """The outcome of one check after the build (lintian, autopkgtest, ...)."""

    name: str
    # "pass", "fail" (the check found a problem), "error" (it could not run)
    # or "skipped" (it cannot apply to this build, e.g. a cross build's tests)
    status: str
    summary: str = ""  # one line for the terminal and the log's summary
    details: dict[str, Any] = field(default_factory=dict)  # e.g. lintian's tag counts
    seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "status": self.status, "summary": self.summary,
                "details": self.details, "seconds": round(self.seconds, 3)}


@dataclass
class Stats:
    """Figures of the log's summary; 0 where the step did not run to its end."""

    install_seconds: float = 0.0
    build_seconds: float = 0.0
    space: int = 0  # bytes of the build tree after the build


@dataclass
class BuildResult:
    package: str = ""
    version: str = ""
    architecture: str = ""  # the host architecture: what the packages are for
    build_architecture: str = ""  # where they were built (the environment's dpkg)
    environment_architecture: str = ""  # the environment's, as dpkg inside says
    environment: str = ""
    backend: str = ""
    status: str = "error"
    message: str = ""
    phases: list[tuple[str, float]] = field(default_factory=list)
    artifacts: list[Artifact] = field(default_factory=list)
    log: str | None = None
    network_log: str | None = None
    # The first attempts one by one (a bounded number); the summary counts all.
    network_records: list[dict[str, Any]] = field(default_factory=list)
    network_summary: NetSummary | None = None
    dependency_layer: LayerUse | None = None
    limitations: list[str] = field(default_factory=list)
    fail_stage: str | None = None  # sbuild's Fail-Stage of a build that did not succeed
    # The build dependencies apt could not satisfy (status dependency-failed),
    # bounded: apt's words quote the archive.
    unmet: list[str] = field(default_factory=list)
    checks: list[CheckResult] = field(default_factory=list)
    started: float = 0.0  # time.time() when the build began
    total_seconds: float = 0.0
    session: str | None = None  # the session kept by --purge-build, to enter

    def denied(self) -> list[dict[str, Any]]:
        return [r for r in self.network_records if r.get("decision") != "allow"]

    def attempts(self) -> tuple[int, int]:
        """(attempts, denied) of the whole build: the summary's counts, or
        for a backend without one, its records'."""
        if self.network_summary is not None:
            return self.network_summary.attempts, self.network_summary.denied
        return len(self.network_records), len(self.denied())

    def to_json(self) -> dict[str, object]:
        layer = self.dependency_layer
        return {
            "status": self.status,
            "message": self.message,
            "package": self.package,
            "version": self.version,
            "architecture": self.architecture,
            "host_architecture": self.architecture,
            "build_architecture": self.build_architecture,
            "environment_architecture": self.environment_architecture,
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
            "dependency_layer": layer.to_json() if layer is not None else None,
            "limitations": self.limitations,
            "fail_stage": self.fail_stage,
            "unmet": self.unmet,
            "checks": [c.to_json() for c in self.checks],
            "started": _iso(self.started),
            "total_seconds": round(self.total_seconds, 3),
            "nsbuild_version": _version(),
            "session": self.session,
        }


def _iso(when: float) -> str | None:
    from datetime import datetime

    return datetime.fromtimestamp(when, UTC).isoformat() if when else None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nsbuild")
    except PackageNotFoundError:
        return "unknown"
