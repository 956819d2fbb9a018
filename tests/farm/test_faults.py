"""The farm when things go wrong: a worker killed during a build, a client
without the web password."""

from __future__ import annotations

import json
import os
import re
import signal
import urllib.request
from pathlib import Path

import pytest
from debbuild.conftest import make_package
from waiting import wait_for

from .conftest import WORKERS, Farm, dsc_of, table_rows

pytestmark = [pytest.mark.slow, pytest.mark.userns]

# Buildbot's results.
SUCCESS, RETRY = 0, 5


def _request_id(stderr: str) -> int:
    m = re.search(r": request (\d+) on ", stderr)
    assert m, stderr
    return int(m.group(1))


def _builds(farm: Farm, request: int) -> list[dict[str, object]]:
    found = farm.get(f"buildrequests/{request}/builds?field=buildid&field=workerid"
                     "&field=results&field=complete")  # fmt: skip
    assert isinstance(found, dict)
    return list(found["builds"])


def _building_the_package(farm: Farm, request: int) -> bool:
    """The package's own build (dpkg-buildpackage) has started, as the
    step's log "build" shows: the .build log streams there as it is written."""
    builds = _builds(farm, request)
    if not builds:
        return False
    steps = farm.get(f"builds/{builds[-1]['buildid']}/steps?field=stepid&field=name")
    assert isinstance(steps, dict)
    ids = [s["stepid"] for s in steps["steps"] if s["name"] == "nsbuild build"]
    if not ids:
        return False
    logs = farm.get(f"steps/{ids[0]}/logs?field=logid&field=name")
    assert isinstance(logs, dict)
    build = [x["logid"] for x in logs["logs"] if x["name"] == "build"]
    if not build:
        return False
    with urllib.request.urlopen(f"{farm.url}api/v2/logs/{build[0]}/raw", timeout=30) as r:
        return "dpkg-buildpackage: info: source package" in r.read().decode(errors="replace")


def _worker_names(farm: Farm) -> dict[int, str]:
    found = farm.get("workers?field=workerid&field=name")
    assert isinstance(found, dict)
    return {w["workerid"]: w["name"] for w in found["workers"]}


def _processes_in(folder: Path) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.readlink(f"/proc/{pid}/cwd").startswith(f"{folder}/"):
                    found.append(int(pid))
            except OSError:
                continue
    return found


def test_a_worker_killed_during_a_build_leaves_it_to_the_other(
    farm: Farm, tmp_path: Path
) -> None:
    # Long enough to be killed in; it ends, so nothing waits forever.
    tree = make_package(tmp_path, "nsb-farm-slow", build="sleep 60")
    sub = farm.nsbuild("farm", "submit", str(dsc_of(tree)))
    assert sub.returncode == 0, sub.stderr
    request = _request_id(sub.stderr)
    wait_for(lambda: _building_the_package(farm, request), "the package building on a worker")
    first = _builds(farm, request)[-1]
    victim = _worker_names(farm)[int(str(first["workerid"]))]
    folder = farm.root / victim
    os.kill(int((folder / "twistd.pid").read_text()), signal.SIGKILL)

    def complete() -> bool:
        found = farm.get(f"buildrequests/{request}?field=complete")
        assert isinstance(found, dict)
        return bool(found["buildrequests"][0]["complete"])

    wait_for(complete, "the build request to complete on the other worker", timeout=900)
    builds = _builds(farm, request)
    assert [b["results"] for b in builds] == [RETRY, SUCCESS]
    (other,) = set(WORKERS) - {victim}
    assert _worker_names(farm)[int(str(builds[-1]["workerid"]))] == other

    # Started again, the killed worker ends what it left running and cleans up.
    again = farm.nsbuild("farm", "worker", str(folder), "--master", f"127.0.0.1:{farm.pb_port}",
                         "--name", victim, env=farm.worker_vars(victim))  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert _processes_in(folder) == []
    cache = farm.root / f"cache-{victim}" / "nsbuild"
    for leftover in ("sessions", "builds"):
        d = cache / leftover
        assert not d.is_dir() or os.listdir(d) == [], (leftover, os.listdir(d))


def test_starting_builds_needs_the_web_password(farm: Farm, tmp_path: Path) -> None:
    # Another user's view: not the master's folder, so not its password.
    elsewhere = {**farm.vars, "XDG_CONFIG_HOME": str(tmp_path)}
    args = ("farm", "submit", "--master", farm.url, "--from-archive", "bookworm", "hello")
    anonymous = farm.nsbuild(*args, env=elsewhere)
    assert anonymous.returncode == 2
    assert "403" in anonymous.stderr
    wrong = farm.nsbuild(*args, env={**elsewhere, "NSBUILD_FARM_PASSWORD": "not-the-password"})
    assert wrong.returncode == 2
    assert "refused the login" in wrong.stderr
    # Reading needs no password.
    status = farm.nsbuild("farm", "status", "--master", farm.url, env=elsewhere)
    assert status.returncode == 0, status.stderr
    password = json.loads((farm.master / "nsbuild-master.json").read_text())["password"]
    assert (farm.master / "nsbuild-master.json").stat().st_mode & 0o777 == 0o600
    assert len(password) >= 24
    right = farm.nsbuild(*args, "--wait", "--out", str(tmp_path / "out"),
                         env={**elsewhere, "NSBUILD_FARM_PASSWORD": password})  # fmt: skip
    assert right.returncode == 0, right.stderr
    assert table_rows(right.stdout)["hello"][2] == "built"


def test_a_master_stopped_during_a_build_builds_it_again_once_back(
    farm: Farm, tmp_path: Path
) -> None:
    tree = make_package(tmp_path, "nsb-farm-restart", build="sleep 30")
    sub = farm.nsbuild("farm", "submit", str(dsc_of(tree)))
    assert sub.returncode == 0, sub.stderr
    request = _request_id(sub.stderr)
    wait_for(lambda: _building_the_package(farm, request), "the package building on a worker")
    stop = farm.nsbuild("farm", "stop", str(farm.master))
    assert stop.returncode == 0, stop.stderr
    start = farm.nsbuild("farm", "master", str(farm.master))
    assert start.returncode == 0, start.stderr

    def complete() -> bool:
        found = farm.get(f"buildrequests/{request}?field=complete")
        assert isinstance(found, dict)
        return bool(found["buildrequests"][0]["complete"])

    wait_for(complete, "the build request to complete after the restart", timeout=900)
    # The interrupted build is Buildbot's RETRY, not a failure; the request ran again.
    assert [b["results"] for b in _builds(farm, request)] == [RETRY, SUCCESS]
