"""nsbuild.sandbox.limits: sizes, refusals, cleanup of the cgroups it makes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nsbuild.cli.exits import exit_status
from nsbuild.sandbox import limits


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096K", 4 << 20), ("512M", 512 << 20), ("2G", 2 << 30), ("1.5GiB", 3 << 29),
     ("2g", 2 << 30), ("64MB", 64 << 20), ("1T", 1 << 40), (str(8 << 20), 8 << 20)],
)
def test_parse_size(text: str, size: int) -> None:
    assert limits.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "-1G", "12X", "1e9", "0", "1K", "2 G B", "0x10M"])
def test_bad_sizes_are_one_line_usage_errors(text: str) -> None:
    with pytest.raises(limits.LimitError) as e:
        limits.parse_size(text)
    assert exit_status(e.value) == 2 and "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["0", "-3", "x", "", "1.5"])
def test_bad_process_counts(text: str) -> None:
    with pytest.raises(limits.LimitError):
        limits.parse_pids(text)


def test_nothing_asked_means_no_cgroup() -> None:
    with limits.prepare() as lim:
        assert lim.path is None and lim.paths == ()
        lim.join()
        lim.leave()


def test_bad_values_are_refused_before_any_cgroup_exists() -> None:
    with pytest.raises(limits.LimitError):
        limits.prepare(pids_max=0)
    with pytest.raises(limits.LimitError):
        limits.prepare(memory_max=1024)


def _limit_cgroups() -> list[str]:
    return [p for p in _walk_roots() if os.path.basename(p).startswith(limits.PREFIX)]


def _walk_roots() -> list[str]:
    found = []
    for root in limits._gc_roots():
        for dirpath, dirnames, _ in os.walk(root):
            found += [os.path.join(dirpath, d) for d in dirnames]
    return found


@pytest.mark.root
def test_close_removes_the_cgroups_and_nsbuild_goes_home() -> None:
    before = open("/proc/self/cgroup").read()
    lim = limits.prepare(pids_max=100, memory_max=64 << 20)
    made = lim.paths
    assert made and all(os.path.isdir(p) for p in made)
    lim.join()
    lim.leave()
    lim.close()
    lim.close()  # idempotent
    assert not any(os.path.exists(p) for p in made)
    assert open("/proc/self/cgroup").read() == before


@pytest.mark.root
def test_gc_removes_the_cgroups_of_a_killed_owner_only() -> None:
    """A process that made limits and was SIGKILLed leaves its cgroups; gc removes
    them, and leaves those of a live owner alone."""
    code = ("import os, sys; from nsbuild.sandbox import limits\n"
            "lim = limits.prepare(pids_max=50, memory_max=64 << 20)\n"
            "print(' '.join(lim.paths), flush=True); sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    dead = p.stdout.readline().split()
    mine = limits.prepare(pids_max=50)
    try:
        assert dead and all(os.path.isdir(x) for x in dead)
        # Owners alive: nothing of theirs goes.
        first = limits.gc()
        assert not [r for r in first for x in (*dead, *mine.paths) if r == f"cgroup {x}"]
        p.kill()
        p.wait()
        removed = limits.gc()
        assert sorted(removed) == sorted(f"cgroup {x}" for x in dead)
        assert not any(os.path.exists(x) for x in dead)
        assert all(os.path.isdir(x) for x in mine.paths)
    finally:
        p.kill()
        mine.close()
    assert [x for x in _limit_cgroups() if str(p.pid) in x] == []
