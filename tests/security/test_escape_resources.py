"""Resource exhaustion: a fork bomb and a memory hog inside a sandbox with limits
(nsbuild.sandbox.limits, behind `--pids-max` and `--memory-max`) are stopped,
and the host keeps working. Where limits cannot be had (an unprivileged user
without a delegated cgroup), nsbuild says so in one line instead."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from security_helpers import PY

from nsbuild.sandbox import Sandbox, caller_idmap, host_view, limits, spawn

FORK_BOMB = """
import os, sys, time
n = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(3600)
            os._exit(0)
        n += 1
except OSError as e:
    print("forks", n, e.strerror, flush=True)
"""

MEMORY_HOG = """
chunks = []
try:
    while len(chunks) < 256:                 # up to 4 GiB, touched page by page
        chunks.append(bytearray(16 << 20))
        print(len(chunks) * 16, flush=True)
except MemoryError:
    print("MemoryError", flush=True)
"""


def _run_limited(lim: limits.Limits, code: str, out: Path) -> int:
    spec = Sandbox(argv=(PY, "-c", code), idmap=caller_idmap(), mounts=host_view(),
                   cgroup=lim.path)
    with open(out, "w") as f:
        lim.join()
        try:
            proc = spawn(spec, stdout=f.fileno())
        finally:
            lim.leave()
        return proc.wait()


def _host_still_forks() -> None:
    assert subprocess.run(["true"], check=False).returncode == 0


@pytest.fixture
def reason() -> str | None:
    return limits.unavailable_reason()


@pytest.fixture
def available(reason: str | None) -> Iterator[None]:
    if reason is not None:
        pytest.skip(f"resource limits are not available to uid {os.getuid()} here: {reason}")
    yield


def _fork_bomb(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with limits.prepare(pids_max=32) as lim:
        status = _run_limited(lim, FORK_BOMB, out)
        _host_still_forks()
    text = out.read_text()
    assert status == 0, text
    (line,) = [ln for ln in text.splitlines() if ln.startswith("forks ")]
    assert int(line.split()[1]) < 32, line
    assert "Resource temporarily unavailable" in line


def _memory_hog(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with limits.prepare(memory_max=limits.parse_size("128M")) as lim:
        status = _run_limited(lim, MEMORY_HOG, out)
        _host_still_forks()
    lines = out.read_text().splitlines()
    # Killed by the OOM killer (SIGKILL) or refused an allocation; never 4 GiB.
    assert status == 128 + 9 or lines[-1:] == ["MemoryError"], (status, lines[-3:])
    reached = max((int(x) for x in lines if x.isdigit()), default=0)
    assert reached <= 128, reached


@pytest.mark.root
def test_fork_bomb_is_stopped_by_the_pids_limit_as_root(tmp_path: Path) -> None:
    _fork_bomb(tmp_path)


@pytest.mark.root
def test_memory_hog_is_stopped_by_the_memory_limit_as_root(tmp_path: Path) -> None:
    _memory_hog(tmp_path)


@pytest.mark.userns
def test_fork_bomb_is_stopped_by_the_pids_limit(tmp_path: Path, available: None) -> None:
    _fork_bomb(tmp_path)


@pytest.mark.userns
def test_memory_hog_is_stopped_by_the_memory_limit(tmp_path: Path, available: None) -> None:
    _memory_hog(tmp_path)


@pytest.mark.userns
def test_without_a_delegated_cgroup_limits_fail_in_one_clear_line(reason: str | None) -> None:
    if reason is None:
        pytest.skip("limits are available to this user here (a delegated cgroup)")
    with pytest.raises(limits.LimitsUnavailable) as e:
        limits.prepare(pids_max=10, memory_max=64 << 20)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("--pids-max/--memory-max cannot be enforced here: ")
    assert "delegated" in message or "controller" in message, message
