"""Fixtures for the sandbox runtime tests (`nsbuild run`, nsbuild.sandbox)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandbox_helpers import SubRange, nsbuild_argv, subrange
from waiting import HANG_GUARD

SUBUID = os.environ.get("NSBUILD_SUBUID_FILE", "/etc/subuid")
SUBGID = os.environ.get("NSBUILD_SUBGID_FILE", "/etc/subgid")


@pytest.fixture(scope="session")
def subids() -> tuple[SubRange, SubRange]:
    """The caller's subordinate uid and gid ranges; the tests that need them fail
    (they do not skip) when the user has none: CI gives the test user ranges."""
    uid, gid = subrange(SUBUID, os.getuid()), subrange(SUBGID, os.getuid())
    if uid is None or gid is None or uid.count < 65535 or gid.count < 65535:
        pytest.fail(
            f"uid {os.getuid()} needs ranges of 65536 ids in {SUBUID} and {SUBGID} "
            f"(found {uid}, {gid}); add them with: sudo usermod --add-subuids "
            "START-END --add-subgids START-END USER",
            pytrace=False,
        )
    return uid, gid


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A directory bound into sandboxes, emptied afterwards from *inside* a
    sandbox: files created there under subordinate ids cannot be deleted by the
    caller on the host."""
    d = tmp_path / "scratch"
    d.mkdir()
    d.chmod(0o777)
    yield d
    subprocess.run(
        nsbuild_argv("--bind", f"{d}:/scratch", "--",
                     "/bin/sh", "-c", "rm -rf /scratch/* /scratch/.[!.]*"),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=HANG_GUARD,
        check=False,
    )
