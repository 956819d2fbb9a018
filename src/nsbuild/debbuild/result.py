"""What a build is asked to do, and what it reports: plain records."""

from __future__ import annotations

from dataclasses import dataclass, field
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
class Stats:
    """Figures of the log's summary; 0 where the step did not run to its end."""

    install_seconds: float = 0.0
    build_seconds: float = 0.0
    space: int = 0  # bytes of the build tree after the build


@dataclass
class BuildResult:
    package: str = ""
    version: str = ""
    architecture: str = ""
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
        }
