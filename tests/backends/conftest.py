"""Fixtures for the backend and virt-server tests: real clients, real servers.

The environment is the build tests' `bookworm` (tests/debbuild/conftest.py: the
NSBUILD_TEST_TARBALL registered in a private XDG config, one cache per test
session), imported rather than repeated. Real clients (autopkgtest, sbuild)
find `autopkgtest-virt-nsbuild` on PATH: the venv's bin folder goes first.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from debbuild.conftest import bookworm
from virt_helpers import HERE, SYSTEM_PATH, VENV_BIN, Env, alive

__all__ = ["bookworm"]


@pytest.fixture(scope="session")
def tools(bookworm: Env) -> Env:
    """The test session's environment with the venv's programs on PATH, as a
    user who installed nsbuild would have them."""
    env = dict(bookworm.vars)
    env["PATH"] = f"{VENV_BIN}:{SYSTEM_PATH}"
    return Env(env, bookworm.cache)


@pytest.fixture
def server_env(tools: Env, monkeypatch: pytest.MonkeyPatch) -> Env:
    """A server started by the test inherits its environment: the test
    session's XDG folders and PATH."""
    for key in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "PATH"):
        monkeypatch.setenv(key, tools.vars[key])
    return tools


@pytest.fixture
def fake_server(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(program, state dir): `program MODE STATE` is a misbehaving virt server
    named autopkgtest-virt-fake (see fake_virt_server.py)."""
    program = tmp_path / "bin" / "autopkgtest-virt-fake"
    program.parent.mkdir()
    program.write_text(f'#!/bin/sh\nexec {sys.executable} {HERE / "fake_virt_server.py"} "$@"\n')
    program.chmod(0o755)
    state = tmp_path / "state"
    state.mkdir()
    yield program, state
    # Whatever a failed test left running goes, so it cannot disturb the next.
    pids = state / "pids"
    if pids.exists():
        for pid in pids.read_text().split():
            if alive(int(pid)):
                os.kill(int(pid), 9)
