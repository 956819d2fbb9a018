"""Helpers of the environments tests (a module of its own: every test
directory has a conftest.py, so `from conftest import ...` is ambiguous)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

NSBUILD = [sys.executable, "-m", "nsbuild"]


def chroot_d(xdg: Path) -> Path:
    d = xdg / "config" / "nsbuild" / "chroot.d"
    d.mkdir(parents=True, exist_ok=True)
    return d


def nsbuild(*args: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run the nsbuild command line as a user would, capturing its output."""
    proc = subprocess.run(
        [*NSBUILD, *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        **kw,  # type: ignore[call-overload]
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"nsbuild {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc  # type: ignore[no-any-return]


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [ln.split()[4] for ln in f if ln.split()[4].startswith(str(path))]


def processes_with(marker: str) -> list[int]:
    """Pids whose command line contains `marker` (a unique argument of the test)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found

