"""The results of a successful build, moved into --out.

Only then does anything reach --out, opened once for all of it. What cannot
reach it (--out removed or made unwritable during the build, a full disk)
stays in the build's private folder; the driver keeps it in nsbuild's cache
with the logs (report.Logs.place), in the folder the error names.
"""

from __future__ import annotations

from pathlib import Path

from nsbuild.debbuild.collect import Collected
from nsbuild.debbuild.dsc import SourcePackage
from nsbuild.debbuild.errors import BuildFailed
from nsbuild.debbuild.outdir import Folder
from nsbuild.debbuild.result import Artifact
from nsbuild.errors import NsbuildError


class NotDelivered(NsbuildError):
    """Results or logs of a build could not be written to --out; the message
    says where they are kept. The build itself succeeded."""


def deliver(
    out: Path, pkg: SourcePackage, collected: Collected, artifacts: list[Artifact], kept: Path
) -> Folder:
    """Move `artifacts` into `out` (each artifact's path follows it); returns
    `out`, open. Raises NotDelivered naming `kept`, where what did not move
    is to be kept, or BuildFailed when a file of --out is not this build's to
    replace."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _not_delivered(f"cannot make {out}: {e.strerror}", 0, kept) from None
    try:
        folder = Folder(out)
    except NsbuildError as e:
        raise _not_delivered(str(e), 0, kept) from None
    try:
        _move(folder, pkg, collected, artifacts, kept)
    except BaseException:
        folder.close()
        raise
    return folder


def _move(
    folder: Folder, pkg: SourcePackage, collected: Collected, artifacts: list[Artifact], kept: Path
) -> None:
    out = folder.path
    taken = sorted(n for n in collected.no_replace if folder.has(n))
    if taken:
        raise BuildFailed(
            f"{taken[0]} is in {out} already and is not at {pkg.source}'s version "
            f"{pkg.version}: not replaced"
            + (f" (nor {len(taken) - 1} more)" if len(taken) > 1 else "")
            + f"; this build's results are kept in {kept}"
        )
    # The .changes goes last, so a set with its .changes is complete even
    # when a kill comes between moves. A source file the same as the
    # input's is not written over the input itself.
    in_place = folder.same_as(pkg.directory)
    moved = 0
    for art in sorted(artifacts, key=lambda a: a.name.endswith(".changes")):
        if art.name in collected.same_as_input and in_place:
            art.path = str(out / art.name)
            continue
        replace = art.name not in collected.no_replace
        try:
            art.path = str(folder.put(Path(art.path), art.name, replace=replace))
        except NsbuildError as e:
            raise _not_delivered(str(e), moved, kept) from None
        except OSError as e:
            raise _not_delivered(f"cannot write {out / art.name}: {e.strerror}", moved, kept) \
                from None  # fmt: skip
        moved += 1


def _not_delivered(reason: str, moved: int, kept: Path) -> NotDelivered:
    what = "its logs and the results not written there are" if moved else \
        "its results and logs are"  # fmt: skip
    return NotDelivered(f"{reason}; the build succeeded: {what} kept in {kept}")
