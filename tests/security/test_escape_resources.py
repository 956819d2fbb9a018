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
    """None when limits can be made for this caller, else why not."""
    try:
        limits.prepare(pids_max=1 << 20).close()
    except limits.LimitError as e:
        return str(e)
    except OSError as e:
        return f"{e.filename or 'cgroup'}: {e.strerror}"
    return None


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


def _nsbuild(*args: str) -> subprocess.CompletedProcess[str]:
    import sys

    return subprocess.run([sys.executable, "-m", "nsbuild", *args], cwd="/",
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)


@pytest.mark.root
@pytest.mark.parametrize("net", [[], ["--allow", "127.0.0.1:9", "--egress-engine", "nftables"]])
def test_run_pids_and_memory_max_stop_a_fork_bomb_and_a_hog_as_root(net: list[str]) -> None:
    """The command line, as a user types it (also with the nftables engine's own
    cgroup in play)."""
    r = _nsbuild("run", *net, "--pids-max", "32", "--", PY, "-c", FORK_BOMB)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[1]) < 32, r.stdout
    r = _nsbuild("run", *net, "--memory-max", "128M", "--", PY, "-c", MEMORY_HOG)
    reached = max((int(x) for x in r.stdout.split() if x.isdigit()), default=0)
    assert r.returncode == 137 or "MemoryError" in r.stdout, (r.returncode, r.stderr)
    assert reached <= 128
    _host_still_forks()


@pytest.mark.userns
@pytest.mark.parametrize(
    "args", [["--pids-max", "0"], ["--pids-max", "x"], ["--memory-max", "12X"],
             ["--memory-max", "1K"]])
def test_bad_limit_values_are_one_line_usage_errors(args: list[str]) -> None:
    r = _nsbuild("run", *args, "--", "true")
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("nsbuild"), r.stderr


@pytest.mark.userns
def test_run_without_a_delegated_cgroup_refuses_limits_in_one_line(reason: str | None) -> None:
    if reason is None:
        pytest.skip("limits are available to this user here (a delegated cgroup)")
    r = _nsbuild("run", "--pids-max", "10", "--", "true")
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "cannot be enforced here" in r.stderr, r.stderr


@pytest.mark.root
def test_pids_max_counts_the_command_not_the_sandbox_machinery() -> None:
    """`--pids-max 1`: the command runs (nsbuild's helper and init do not use up
    the limit), and cannot start a second process; never a traceback."""
    r = _nsbuild("run", "--pids-max", "1", "--", "sh", "-c", "echo alone")
    assert (r.returncode, r.stdout) == (0, "alone\n"), r.stderr
    r = _nsbuild("run", "--pids-max", "1", "--", "sh", "-c", "/bin/true; echo after")
    assert r.returncode != 0 and "after" not in r.stdout, (r.returncode, r.stdout)
    assert "Traceback" not in r.stderr and "fork" in r.stderr.lower(), r.stderr
    r = _nsbuild("run", "--pids-max", "2", "--", "sh", "-c", "/bin/true; echo after")
    assert (r.returncode, r.stdout) == (0, "after\n"), r.stderr
