"""Helpers for the sandbox tests: run `nsbuild run` the way a user does, and
look at the host from outside (processes, mounts, subordinate id ranges).

Named uniquely (not `helpers.py`): tests import it by module name (pyproject's
pytest pythonpath), and module names must not collide across tests/.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from waiting import HANG_GUARD

# The interpreter running the tests has nsbuild installed (a venv or the system).
NSBUILD = (sys.executable, "-m", "nsbuild")
# Inside the default root (a read-only view of the host's /usr) the system
# Python is available; the venv running the tests is not.
PY = "/usr/bin/python3"

SETUP_FAILED = 125
USAGE = 2


def nsbuild_argv(*args: str, debug: bool = False) -> list[str]:
    return [*NSBUILD, *(["--debug"] if debug else []), "run", *args]


def py(code: str, *args: str) -> list[str]:
    """argv running Python code inside the sandbox."""
    return [PY, "-c", textwrap.dedent(code), *args]


def sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


def nsbuild(
    *args: str,
    cwd: Path | str,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    debug: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m nsbuild run ARGS...` and capture its output as text."""
    return subprocess.run(
        nsbuild_argv(*args, debug=debug),
        cwd=cwd,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=dict(env) if env is not None else None,
        timeout=HANG_GUARD,
        check=False,
    )


def explain(r: subprocess.CompletedProcess[str]) -> str:
    return f"exit status {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"


def ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, explain(r)
    return r


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    """nsbuild's own failures: exactly one line on stderr, `nsbuild: ...`, no traceback."""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr\n{explain(r)}"
    assert lines[0].startswith("nsbuild"), f"expected 'nsbuild...'\n{explain(r)}"
    assert "Traceback" not in r.stderr
    return lines[0]


def nonblank_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# --- subordinate ids ---------------------------------------------------------


@dataclass(frozen=True)
class SubRange:
    start: int
    count: int

    def __contains__(self, host_id: object) -> bool:
        return isinstance(host_id, int) and self.start <= host_id < self.start + self.count


def subrange(path: str, uid: int) -> SubRange | None:
    """The first range of `uid` (by name or number) in a subuid/subgid file."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = None
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) != 3 or line.startswith("#"):
            continue
        if parts[0] in (name, str(uid)):
            return SubRange(int(parts[1]), int(parts[2]))
    return None


def parse_idmap(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in line.split()) for line in text.splitlines() if line.strip()]  # type: ignore[misc]


# --- processes and mounts seen from the host ----------------------------------


def pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")


def stat_fields(pid: int) -> tuple[int, int] | None:
    """(ppid, starttime) of a process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2 :].split()
    return int(rest[1]), int(rest[19])


def descendants(root_pid: int) -> set[tuple[int, int]]:
    """(pid, starttime) of every live descendant of `root_pid`."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for pid in pids():
        f = stat_fields(pid)
        if f is None:
            continue
        children.setdefault(f[0], []).append(pid)
        starts[pid] = f[1]
    found: set[tuple[int, int]] = set()
    todo = [root_pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add((child, starts[child]))
            todo.append(child)
    return found


def alive(procs: set[tuple[int, int]]) -> set[tuple[int, int]]:
    out = set()
    for pid, start in procs:
        f = stat_fields(pid)
        if f is not None and f[1] == start:
            out.add((pid, start))
    return out


def processes_with_arg(marker: str) -> list[int]:
    me = os.getpid()
    return [p for p in pids() if p != me and any(marker in a for a in cmdline(p))]


def mountinfo_mentioning(text: str) -> list[str]:
    """Lines of every visible process's mountinfo that contain `text`."""
    hits = []
    for pid in [*pids(), "self"]:
        try:
            data = Path(f"/proc/{pid}/mountinfo").read_text()
        except OSError:
            continue
        hits += [f"pid {pid}: {line}" for line in data.splitlines() if text in line]
    return hits


def kill_all(pids_: Iterator[int] | Sequence[int]) -> None:
    for pid in pids_:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
