"""The head and the summary of a build's .build log, and where a build's
logs go when it ends: beside the results in --out, or for a build whose
results did not reach --out (it failed, was interrupted, or --out could not
be written), in a folder of nsbuild's cache (`log.kept_logs_dir`) with the
results that did not: nothing a build made is lost, nothing of a failed build
lands in --out."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from nsbuild.debbuild import binnmu
from nsbuild.debbuild.checks import summary_fields
from nsbuild.debbuild.delivery import NotDelivered
from nsbuild.debbuild.log import BuildLog, kept_logs_dir
from nsbuild.debbuild.outdir import Folder
from nsbuild.debbuild.result import BuildRequest, BuildResult, Stats
from nsbuild.errors import NsbuildError
from nsbuild.printable import printable


def _build_arch(res: BuildResult) -> str:
    """Where the packages were built: the host architecture unless cross-built."""
    return res.build_architecture or res.architecture


@dataclass
class Logs:
    """A build's two logs, in its private folder until placed."""

    log: BuildLog
    net_log: Path  # every network attempt, written by the backend as it goes
    name: str  # PKG_VERSION_ARCH: what the logs are named after
    _kept: Path | None = field(default=None, init=False)

    def kept_dir(self) -> Path:
        """Where this build's logs are kept if they do not go beside its
        results: named once, so that a message can name it before it exists."""
        if self._kept is None:
            self._kept = kept_logs_dir(self.name)
        return self._kept

    def header(self, req: BuildRequest, res: BuildResult, backend: str, note: str | None) -> None:
        self.log.header(
            f"{res.package} {res.version} ({res.architecture})",
            [
                ("Package", res.package),
                ("Version", binnmu.version(res.version, req)),
                ("Source Version", res.version),
                ("Distribution", req.dist or res.environment),
                *((("Distribution Note", note),) if note else ()),
                ("Machine Architecture", os.uname().machine),
                ("Host Architecture", res.architecture),
                ("Build Architecture", _build_arch(res)),
                ("Build Type", binnmu.build_type(req)),
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
            ("Build Architecture", _build_arch(res)),
            ("Build Type", binnmu.build_type(req)),
            ("Build-Space", space),
            ("Build-Time", str(int(stats.build_seconds))),
            ("Distribution", req.dist or res.environment),
            ("Host Architecture", res.architecture),
            ("Install-Time", str(int(stats.install_seconds))),
            ("Job", req.input.name),
            ("Machine Architecture", os.uname().machine),
            ("Package", res.package),
            ("Package-Time", str(int(sum(took for _name, took in res.phases)))),
            ("Source-Version", res.version),
            ("Space", space),
            ("Status", res.status),
            ("Version", binnmu.version(res.version, req)),
        ]
        if res.status != "successful" and res.fail_stage:
            fields.append(("Fail-Stage", res.fail_stage))
        fields.extend(summary_fields(res.checks))
        if res.dependency_layer:
            state = "cached" if res.dependency_layer.cached else "stored"
            fields.append(("Dependency-Layer", f"{state} {res.dependency_layer.key[:16]}"))
        fields.append(("Network-Denied", str(res.attempts()[1])))
        log.fields(fields)
        for name, took in res.phases:
            log.line(f"Phase {name}: {took:.1f}s")
        log.line("-" * 80)
        log.close()

    def place(self, res: BuildResult, out_dir: Folder | None, results: Path | None) -> None:
        """Both logs beside the results once they all reached --out (`out_dir`);
        else kept apart with the results that did not (see keep). Raises
        NotDelivered when --out took the results but not the logs (they are
        kept then, and named)."""
        failed = None
        if out_dir is not None:
            try:
                self.put(out_dir, res)
                return
            except NsbuildError as e:
                failed = f"{e}; the build's results are in {out_dir.path}"
        self.keep(res, results)
        if failed is not None:
            raise NotDelivered(f"{failed}, its logs are kept in {self.kept_dir()}")

    def put(self, folder: Folder, res: BuildResult) -> None:
        """Move both logs into `folder`, and name them in the result."""
        # Each once: a second folder takes what the first could not.
        if res.log is None:
            res.log = str(folder.put(self.log.path, self.log.path.name))
        if res.network_log is None:
            if not self.net_log.exists():
                # The backend keeps no file of its own: what it recorded, the
                # first records only, as lines.
                self.net_log.write_text("".join(json.dumps(r) + "\n" for r in res.network_records))
            res.network_log = str(folder.put(self.net_log, f"{self.name}.network.jsonl"))

    def keep(self, res: BuildResult, results: Path | None) -> None:
        """Keep both logs apart, in a new folder, with the results still in
        the private folder `results` (those that did not reach --out); the
        result names where each now is."""
        where = self.kept_dir()
        try:
            where.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise NsbuildError(f"cannot make {where}: {e.strerror}") from None
        folder = Folder(where)
        try:
            # The .changes last, as in --out: a set with its .changes is whole.
            for art in sorted(res.artifacts, key=lambda a: a.name.endswith(".changes")):
                if Path(art.path).parent == results:
                    art.path = str(folder.put(Path(art.path), art.name))
            self.put(folder, res)
        finally:
            folder.close()
