"""The sandbox's PID 1 shows nothing of nsbuild's host command line or
environment: init is a fork of nsbuild's Python, whose argv names the user's
files (--bind sources, --extra-package locations) and whose environment is
the caller's (HOME, paths, tokens)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sandbox_helpers import explain, nsbuild, ok, py

pytestmark = pytest.mark.userns

MARKER = "tell-no-one-7c1e"

READ_PID1 = py("""
    import sys
    for name in ("cmdline", "environ"):
        try:
            with open(f"/proc/1/{name}", "rb") as f:
                data = f.read()
        except OSError as e:
            data = f"unreadable: {e.strerror}".encode()
        sys.stdout.write(f"{name}: {data!r}\\n")
""")


def test_pid1_shows_neither_host_paths_nor_host_environment(tmp_path: Path) -> None:
    secret_dir = tmp_path / f"secret-{MARKER}"
    secret_dir.mkdir()
    env = {**os.environ, "NSBUILD_PRIVATE_TOKEN": f"token-{MARKER}"}
    r = ok(nsbuild("--bind", f"{secret_dir}:/mnt", "--unsetenv", "NSBUILD_PRIVATE_TOKEN",
                   "--", *READ_PID1, cwd=tmp_path, env=env))
    assert "cmdline: b'nsbuild-init\\x00" in r.stdout, explain(r)
    assert MARKER not in r.stdout, explain(r)
    assert "/home/" not in r.stdout and "PATH=" not in r.stdout, explain(r)


def test_pid1_is_named_nsbuild_init(tmp_path: Path) -> None:
    r = ok(nsbuild("--", "cat", "/proc/1/comm", cwd=tmp_path))
    assert r.stdout == "nsbuild-init\n", explain(r)


@pytest.mark.parametrize("host_argument_length", [10, 3000])
def test_pid1_cmdline_does_not_give_away_the_host_command_line_length(
        tmp_path: Path, host_argument_length: int) -> None:
    """The name alone, however long nsbuild's own command line was: the
    memory it overwrites is as long as that command line."""
    r = ok(nsbuild("--setenv", "PADDING=" + "x" * host_argument_length, "--",
                   *READ_PID1, cwd=tmp_path))
    assert r.stdout.splitlines()[0] == "cmdline: b'nsbuild-init\\x00'", explain(r)
