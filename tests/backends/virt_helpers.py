"""Helpers shared by the backend tests (imported by name: this folder is on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from build.conftest import FIXTURES, TARBALL, Env, fixture_dsc  # noqa: E402

__all__ = ["FIXTURES", "TARBALL", "Env", "fixture_dsc"]

HERE = Path(__file__).resolve().parent
VENV_BIN = str(Path(sys.executable).parent)
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def run(
    env: Env, argv: list[str], *, cwd: Path | None = None, timeout: float = 1800
) -> subprocess.CompletedProcess[str]:
    """Run a program as a user would, output captured; `timeout` only keeps a
    hang from stalling the suite (the test fails then)."""
    return subprocess.run(
        argv,
        env=env.vars,
        cwd=cwd,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )


def sessions(env: Env) -> list[str]:
    """The session folders of the test session's cache (live or left behind)."""
    d = env.cache / "nsbuild" / "sessions"
    return sorted(os.listdir(d)) if d.is_dir() else []


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
