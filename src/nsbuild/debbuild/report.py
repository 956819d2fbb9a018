"""The head and the summary of a build's .build log, and where a build's
logs go when it ends: beside the results, or for a build that did not
succeed, in nsbuild's cache (`log.kept_logs_dir`), never into --out."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from nsbuild.debbuild.log import BuildLog, kept_logs_dir
from nsbuild.debbuild.outdir import Folder
from nsbuild.debbuild.result import BuildRequest, BuildResult, Stats
from nsbuild.printable import printable


@dataclass
class Logs:
    """A build's two logs, in its private folder until placed."""

    log: BuildLog
    net_log: Path  # every network attempt, written by the backend as it goes
    name: str  # PKG_VERSION_ARCH: what the logs are named after

    def header(self, req: BuildRequest, res: BuildResult, backend: str, note: str | None) -> None:
        self.log.header(
            f"{res.package} {res.version} ({res.architecture})",
            [
                ("Package", res.package),
                ("Version", res.version),
                ("Source Version", res.version),
                ("Distribution", res.environment),
                *((("Distribution Note", note),) if note else ()),
                ("Machine Architecture", os.uname().machine),
                ("Host Architecture", res.architecture),
                ("Build Architecture", res.architecture),
                ("Build Type", req.build_type()),
                ("Backend", backend),
                *(("Limitation", text) for text in res.limitations),
            ],
        )

    def summary(self, req: BuildRequest, res: BuildResult, stats: Stats) -> None:
        log = self.log
        log.section("Summary")
        if res.message:
            # It may quote the build (file names): one line, whatever they hold.
            log.line(printable(res.message, 4096))
            log.line()
        space = str(stats.space // 1024) if stats.space else "n/a"
        fields = [
            ("Build Architecture", res.architecture),
            ("Build Type", req.build_type()),
            ("Build-Space", space),
            ("Build-Time", str(int(stats.build_seconds))),
            ("Distribution", res.environment),
            ("Host Architecture", res.architecture),
            ("Install-Time", str(int(stats.install_seconds))),
            ("Job", req.input.name),
            ("Machine Architecture", os.uname().machine),
            ("Package", res.package),
            ("Package-Time", str(int(sum(took for _name, took in res.phases)))),
            ("Source-Version", res.version),
            ("Space", space),
            ("Status", res.status),
            ("Version", res.version),
        ]
        if res.dependency_layer:
            state = "cached" if res.dependency_layer.cached else "stored"
            fields.append(("Dependency-Layer", f"{state} {res.dependency_layer.key[:16]}"))
        fields.append(("Network-Denied", str(res.attempts()[1])))
        log.fields(fields)
        for name, took in res.phases:
            log.line(f"Phase {name}: {took:.1f}s")
        log.line("-" * 80)
        log.close()

    def put(self, folder: Folder, res: BuildResult) -> None:
        """Move both logs into `folder`, and name them in the result."""
        res.log = str(folder.put(self.log.path, self.log.path.name))
        if not self.net_log.exists():
            # The backend keeps no file of its own: what it recorded, the
            # first records only, as lines.
            self.net_log.write_text("".join(json.dumps(r) + "\n" for r in res.network_records))
        res.network_log = str(folder.put(self.net_log, f"{self.name}.network.jsonl"))

    def keep(self, res: BuildResult) -> None:
        """The logs of a build that did not succeed: kept apart, in a new folder."""
        where = kept_logs_dir(self.name)
        where.mkdir(parents=True, exist_ok=True)
        folder = Folder(where)
        try:
            self.put(folder, res)
        finally:
            folder.close()
