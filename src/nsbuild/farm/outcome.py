"""What a worker's `nsbuild build` said, read by the master: its exit status
and its JSON summary. The worker, and the build on it, are not trusted: the
summary is bounded, every field is checked for its type, and file names are
taken only when they are plain names.

Statuses follow buildd's words: built, failed, dep-wait (the build
dependencies cannot be satisfied, a distinct state that names them), error
(bad input, or nsbuild's own failure).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

BUILT, FAILED, DEP_WAIT, ERROR = "built", "failed", "dep-wait", "error"

# `nsbuild build`'s exit statuses, the numbers of nsbuild.cli.exits: the
# farm sits beside the command line and does not import it
# (tests/farm/test_outcome.py checks that they agree).
BUILD_FAILED, USAGE, UNSATISFIABLE, SETUP_FAILED, INTERRUPTED = 1, 2, 3, 125, 130

# Those statuses as buildd states. Anything else is the farm's error, not the
# package's: 126/127 (no nsbuild to run on the worker), 128+N (nsbuild
# itself killed: out of memory, the orphan killer), a status nsbuild never gives.
STATES = {
    0: BUILT,
    BUILD_FAILED: FAILED,
    UNSATISFIABLE: DEP_WAIT,
    USAGE: ERROR,
    SETUP_FAILED: ERROR,
    INTERRUPTED: ERROR,
}

# A summary is a few KiB; a worker sending more is not believed past this.
SUMMARY_LIMIT = 1 << 20
# How many unmet dependencies are named, and how long each may be: the
# bounds of `nsbuild build`'s own list.
UNMET_COUNT, UNMET_LENGTH = 100, 200
# What nsbuild's message for exit status 3 starts with, before the list.
UNSAT_PREFIX = "unsatisfiable build dependencies: "

# A file name as Debian's tools make them (.deb, .changes, .build, .dsc ...).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+~_-]{0,254}")
# A package name and an optional version, as apt-get source takes them.
_SOURCE = re.compile(r"([a-z0-9][a-z0-9+.-]{0,99})(?:=([0-9][A-Za-z0-9.+~:-]{0,99}))?")


def state(exit_status: int) -> str:
    return STATES.get(exit_status, ERROR)


def judge(exit_status: int, summary: dict[str, Any]) -> str:
    """The buildd state of a build from its exit status, if its summary
    agrees: a success needs a summary that says so, and a summary's own
    exit status must be the command's."""
    said = summary.get("exit_status")
    if summary and (not isinstance(said, int) or isinstance(said, bool) or said != exit_status):
        return ERROR
    if exit_status == 0 and summary.get("status") != "successful":
        return ERROR
    return state(exit_status)


def plain_name(name: object) -> str | None:
    """`name` if it is a plain file name Debian's tools would make, else None."""
    if isinstance(name, str) and _NAME.fullmatch(name) and ".." not in name:
        return name
    return None


def read_summary(data: str) -> dict[str, Any]:
    """The JSON summary on a build's stdout; {} when there is none, it is too
    long or it is not an object."""
    if len(data) > SUMMARY_LIMIT:
        return {}
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):  # deep nesting exhausts the parser's stack
        return {}
    return doc if isinstance(doc, dict) else {}


def text(summary: dict[str, Any], key: str, limit: int = 200) -> str:
    """A string field of the summary, cut to `limit`; "" if absent or not a string."""
    value = summary.get(key)
    return value[:limit] if isinstance(value, str) else ""


# What nsbuild's message says when the disk of its cache was full (ENOSPC).
NO_SPACE = "No space left on device"


def describe(state: str, summary: dict[str, Any]) -> str:
    """The build's text, in buildd's words: built PKG VER, failed PKG VER at
    STAGE, dep-wait: the unmet dependencies, error: the message."""
    what = f"{text(summary, 'package', 100)} {text(summary, 'version', 100)}".strip()
    if state == DEP_WAIT:
        said = f"dep-wait: {', '.join(unmet(summary)) or 'see the log'}"
    elif state == BUILT:
        said = f"built {what or 'the package'}"
    elif state == FAILED:
        stage = text(summary, "fail_stage", 50)
        said = f"failed {what or 'the package'}" + (f" at {stage}" if stage else "")
    else:
        said = f"error: {text(summary, 'message', 200) or 'see the log'}"
    if NO_SPACE in text(summary, "message", 4096) and NO_SPACE not in said:
        # The worker's state, not the package's: a farm's keeper must see it.
        said += f" ({NO_SPACE})"
    return said


def unmet(summary: dict[str, Any]) -> list[str]:
    """The unmet build dependencies a dep-wait build names: the summary's
    `unmet` list where it has one, else its message's list."""
    found = summary.get("unmet")
    if not isinstance(found, list):
        message = text(summary, "message", UNMET_COUNT * UNMET_LENGTH)
        found = message[len(UNSAT_PREFIX):].split("; ") if message.startswith(UNSAT_PREFIX) else []
    return [item[:UNMET_LENGTH] for item in found[:UNMET_COUNT] if isinstance(item, str) and item]


# The largest file a worker may upload or download (a big package's -dbgsym
# .deb is a few hundred MiB); a build's uploads all together; how many.
MAX_FILE = 4 << 30
MAX_TOTAL = 16 << 30
FILES_LIMIT = 500
# The .build and network logs have no size in the summary: this much each.
LOG_FILE_MAX = 256 << 20
# Names the master writes in a build's results folder itself.
RESERVED = frozenset({"summary.json"})


@dataclass(frozen=True)
class Upload:
    path: str  # on the worker
    maxsize: int  # what the summary claims + 1 (artifacts), or LOG_FILE_MAX
    sha256: str | None  # what the summary claims, checked after the upload


def _sha256(value: object) -> str | None:
    return value if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) else None


def files(summary: dict[str, Any]) -> dict[str, Upload]:
    """Plain name -> upload of every file the build reports: its artifacts
    (each allowed the size the summary claims, no more), its .build log and
    its network log. ValueError if it names more files or bytes than a
    master takes from one build."""
    found: list[tuple[object, int, str | None]] = [
        (summary.get(k), LOG_FILE_MAX, None) for k in ("log", "network_log")]
    artifacts = summary.get("artifacts")
    if isinstance(artifacts, list):
        if len(artifacts) > FILES_LIMIT:
            raise ValueError(f"the summary names more than {FILES_LIMIT} files")
        for a in artifacts:
            size = a.get("size") if isinstance(a, dict) else None
            if isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= MAX_FILE:
                # A worker's upload of exactly maxsize bytes fails (Buildbot
                # 4.3 says "maximum filesize reached" before it sees the end):
                # one byte more, which the sha256 check then catches.
                found.append((a.get("path"), size + 1, _sha256(a.get("sha256"))))
    out: dict[str, Upload] = {}
    for path, size, sha256 in found:
        if isinstance(path, str) and path.startswith("/") and len(path) < 4096:
            name = plain_name(path.rsplit("/", 1)[1])
            if name and name not in RESERVED:
                out[name] = Upload(path, size, sha256)
    if sum(u.maxsize for u in out.values()) > MAX_TOTAL:
        raise ValueError(f"the summary's files are more than {MAX_TOTAL} bytes")
    return out


class Budget:
    """A stream the master keeps (a build's output in its database, a
    worker's stdout in memory): the first `limit` characters, then a note
    once, then nothing. Buildbot 4 accepts logMaxSize but no longer applies
    it, and a build's output is under the source's control."""

    NOTE = "\n[nsbuild farm: output cut here, after {limit} characters]\n"

    def __init__(self, limit: int) -> None:
        self.limit, self.used, self.cut = limit, 0, False

    def take(self, data: str) -> str:
        room = self.limit - self.used
        if len(data) <= room:
            self.used += len(data)
            return data
        if self.cut:
            return ""
        self.used, self.cut = self.limit, True
        return data[:max(room, 0)] + self.NOTE.format(limit=self.limit)


def split_source(spec: str) -> tuple[str, str | None]:
    """`name[=version]` as apt-get source takes it; ValueError if it is not one."""
    m = _SOURCE.fullmatch(spec)
    if not m:
        raise ValueError(f"not a package name[=version]: {spec!r}")
    return m.group(1), m.group(2)
