"""SIGKILL of nsbuild at random moments of `run`, `run --env`, `session begin` and
`build`, then `nsbuild gc`: no process, mount, session, half-made store entry,
cgroup or partial artifact may remain, and the next run must work.

Each trial marks its processes (a unique argument, and NSBUILD_FAULT_TRIAL in
their environment, which forked helpers keep), so leftovers are found even
when they were never exec'd."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from fault_seed import SEED
from sandbox_helpers import mountinfo_mentioning, pids
from security_helpers import NSBUILD, EnvHome, explain, tiny_package
from waiting import wait_for

pytestmark = [pytest.mark.userns, pytest.mark.slow]

RUN_TRIALS = 24
ENV_RUN_TRIALS = 12
SESSION_TRIALS = 12
BUILD_TRIALS = 8


def _marked(marker: str) -> list[int]:
    """Live processes of this trial: by argument or by inherited environment."""
    me = os.getpid()
    found = []
    needle = f"NSBUILD_FAULT_TRIAL={marker}".encode()
    for pid in pids():
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if marker.encode() in cmdline or needle in environ.split(b"\0"):
            found.append(pid)
    return found


def _kill_at(argv: list[str], delay: float, env: dict[str, str], cwd: Path,
             marker: str) -> int | None:
    """Start nsbuild, SIGKILL it after `delay` seconds (unless it ended); its status."""
    p = subprocess.Popen(argv, env={**env, "NSBUILD_FAULT_TRIAL": marker}, cwd=cwd,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        p.wait(timeout=delay)
        return p.returncode
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        p.wait()
        return None
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _gc(home: EnvHome, cwd: Path) -> str:
    r = subprocess.run([*NSBUILD, "gc"], env=home.vars(), cwd=cwd, capture_output=True,
                       text=True, stdin=subprocess.DEVNULL, check=False)
    assert r.returncode == 0, f"seed {SEED}: nsbuild gc failed\n{explain(r)}"
    return r.stdout


def _leftovers(home: EnvHome, marker: str, extra_dirs: tuple[Path, ...] = ()) -> list[str]:
    """What a killed run left behind after gc (empty when all is well)."""
    wait_for(lambda: _marked(marker) == [], f"processes of trial {marker} are gone")
    found = [f"mount: {line}" for line in mountinfo_mentioning(str(home.cache))]
    nsb = home.cache / "nsbuild"
    sessions = nsb / "sessions"
    for name in sorted(os.listdir(sessions)) if sessions.is_dir() else []:
        record = sessions / name / "session.json"
        if name.startswith(".") or not record.is_file():
            found.append(f"half-made or half-deleted session {name}")
        elif json.loads(record.read_text()).get("kind") != "persistent":
            found.append(f"throw-away session {name}")
    for folder in (nsb / "store" / "bases", nsb / "store" / "digests", nsb / "tarballs",
                   nsb / "layers", nsb / "builds", *extra_dirs):
        if folder.is_dir():
            found += [f"leftover {folder / n}" for n in os.listdir(folder)
                      if n.startswith(".tmp-") or n.endswith(".part")]
    found += [f"cgroup {c}" for c in _dead_cgroups()]
    return found


def _dead_cgroups() -> list[str]:
    from nsbuild.sandbox import limits
    from nsbuild.sandbox.cgroupfs import cgroup2_mount, pid_alive

    roots = [r for r in (cgroup2_mount(), *limits._v1_mounts().values()) if r]
    dead = []
    for root in roots:
        for name in os.listdir(root):
            if name.startswith(("nsbuild-net.", limits.PREFIX)):
                pid = name.split(".")[1]
                if pid.isdigit() and not pid_alive(int(pid)):
                    dead.append(os.path.join(root, name))
    return dead


def _end_persistent(home: EnvHome, cwd: Path) -> None:
    sessions = home.cache / "nsbuild" / "sessions"
    ids = [n for n in os.listdir(sessions) if not n.startswith(".")] if sessions.is_dir() else []
    if ids:
        r = subprocess.run([*NSBUILD, "session", "end", *ids], env=home.vars(), cwd=cwd,
                           capture_output=True, text=True, check=False)
        assert r.returncode == 0, explain(r)


def _trial_marker() -> str:
    return str(10**9 + uuid.uuid4().int % 10**8)


def _check(home: EnvHome, cwd: Path, marker: str, what: str, delay: float,
           extra_dirs: tuple[Path, ...] = ()) -> None:
    _gc(home, cwd)
    left = _leftovers(home, marker, extra_dirs)
    assert left == [], (f"seed {SEED}: {what} killed after {delay:.3f}s left, after gc: "
                        f"{left}")


def test_sigkill_during_run(tmp_path: Path, env_home: EnvHome, rng: random.Random) -> None:
    """`nsbuild run`, loopback-only and with the egress proxy, killed anywhere
    from before the sandbox exists to while the command runs."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    for n in range(RUN_TRIALS):
        marker = _trial_marker()
        delay = rng.uniform(0.0, 0.5)
        net = ["--allow", "127.0.0.1:9"] if n % 2 else []
        argv = [*NSBUILD, "run", *net, "--bind", f"{scratch}:/scratch", "--",
                "sh", "-c", f"echo > /scratch/{marker}; exec sleep {marker}"]
        _kill_at(argv, delay, env_home.vars(), tmp_path, marker)
        _check(env_home, tmp_path, marker, f"run trial {n}", delay)
        assert mountinfo_mentioning(str(scratch)) == []


def test_sigkill_during_run_in_an_environment(
    tmp_path: Path, env_home: EnvHome, rng: random.Random
) -> None:
    """`nsbuild run --env`: a throw-away overlay session is made, used, removed."""
    for n in range(ENV_RUN_TRIALS):
        marker = _trial_marker()
        delay = rng.uniform(0.0, 1.2)
        argv = [*NSBUILD, "run", "--env", "bookworm", "--",
                "sh", "-c", f"echo data > /root/{marker}; exec sleep {marker}"]
        _kill_at(argv, delay, env_home.vars(), tmp_path, marker)
        _check(env_home, tmp_path, marker, f"run --env trial {n}", delay)


def test_sigkill_during_session_begin(
    tmp_path: Path, env_home: EnvHome, rng: random.Random
) -> None:
    """A killed `session begin` leaves either nothing or a complete persistent
    session (which `session end` removes), never a half-made one."""
    for n in range(SESSION_TRIALS):
        marker = _trial_marker()
        delay = rng.uniform(0.0, 0.6)
        _kill_at([*NSBUILD, "session", "begin", "bookworm"], delay, env_home.vars(), tmp_path,
                 marker)
        _check(env_home, tmp_path, marker, f"session begin trial {n}", delay)
        _end_persistent(env_home, tmp_path)


def test_sigkill_during_build_then_a_build_works(
    tmp_path: Path, env_home: EnvHome, rng: random.Random
) -> None:
    """`nsbuild build` killed in any phase: nothing in --out, no session, no
    half-stored dependency layer; then a whole build succeeds."""
    tree = tiny_package(tmp_path, "nsbfault")
    out = tmp_path / "out"
    build = [*NSBUILD, "build", "--env", "bookworm", "--out", str(out), str(tree)]
    start = time.monotonic()
    r = subprocess.run(build, env=env_home.vars(), cwd=tmp_path, capture_output=True,
                       text=True, stdin=subprocess.DEVNULL, check=False)
    took = time.monotonic() - start
    assert r.returncode == 0, explain(r)
    complete = set(os.listdir(out))
    for f in out.iterdir():
        f.unlink()
    for n in range(BUILD_TRIALS):
        marker = _trial_marker()
        delay = rng.uniform(0.2, max(took, 1.0))
        status = _kill_at(build, delay, env_home.vars(), tmp_path, marker)
        _check(env_home, tmp_path, marker, f"build trial {n}", delay)
        if status is None:
            # Killed before the results were moved: nothing. Killed while or
            # after they were (the build had succeeded; then the teardown):
            # only results, and with the .changes only all of them.
            left = set(os.listdir(out)) if out.exists() else set()
            whole = any(f.endswith(".changes") for f in left)
            assert left <= complete and (left == complete or not whole), (
                f"seed {SEED}: build killed after {delay:.3f}s left in --out: {sorted(left)}")
            for f in left:
                (out / f).unlink()
        elif out.exists():
            for f in out.iterdir():
                f.unlink()
    r = subprocess.run(build, env=env_home.vars(), cwd=tmp_path, capture_output=True,
                       text=True, stdin=subprocess.DEVNULL, check=False)
    assert r.returncode == 0, explain(r)
    assert (out / "nsbfault_1.0_all.deb").is_file()


def test_sigkill_during_build_leaves_no_temporary_directory(
    tmp_path: Path, env_home: EnvHome, rng: random.Random
) -> None:
    tree = tiny_package(tmp_path, "nsbtmp")
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    marker = _trial_marker()
    build = [*NSBUILD, "build", "--env", "bookworm", "--out", str(tmp_path / "out"), str(tree)]
    delay = rng.uniform(2.0, 3.0)  # well into the build (its rules sleep 2 s)
    builds = env_home.cache / "nsbuild" / "builds"
    status = _kill_at(build, delay, env_home.vars(TMPDIR=str(tmpdir)), tmp_path, marker)
    if status is None:  # killed mid-build: its work directory was left behind...
        assert [n for n in os.listdir(builds) if n.startswith(".tmp-")] != []
    _check(env_home, tmp_path, marker, "build", delay)  # ...and gc removed it
    assert sorted(os.listdir(tmpdir)) == []
    assert [n for n in os.listdir(builds) if n.startswith(".tmp-")] == []


def test_the_next_run_works_after_the_faults(tmp_path: Path, env_home: EnvHome) -> None:
    for argv in (["run", "--", "true"], ["run", "--env", "bookworm", "--", "true"],
                 ["run", "--allow", "127.0.0.1:9", "--", "true"]):
        r = subprocess.run([*NSBUILD, *argv], env=env_home.vars(), cwd=tmp_path,
                           capture_output=True, text=True, stdin=subprocess.DEVNULL,
                           check=False)
        assert r.returncode == 0, explain(r)


ROOT_NFT_TRIALS = 8
ROOT_LIMIT_TRIALS = 6

LIMITED_RUN = """
import sys
from nsbuild.sandbox import Sandbox, caller_idmap, host_view, limits, spawn
lim = limits.prepare(pids_max=64, memory_max=256 << 20)
spec = Sandbox(argv=("sleep", sys.argv[1]), idmap=caller_idmap(), mounts=host_view(),
               cgroup=lim.path)
lim.join()
proc = spawn(spec)
lim.leave()
proc.wait()
lim.close()
"""


@pytest.mark.root
def test_sigkill_with_the_nftables_engine_and_limits_as_root(rng: random.Random) -> None:
    """Root's leftovers: the nftables table and cgroup of the egress engine, the
    cgroups of resource limits. After gc none of a dead run remains."""
    from nsbuild.net import nftables
    from nsbuild.sandbox.cgroupfs import pid_alive

    env = dict(os.environ)
    for n in range(ROOT_NFT_TRIALS + ROOT_LIMIT_TRIALS):
        marker = _trial_marker()
        if n < ROOT_NFT_TRIALS:
            delay = rng.uniform(0.0, 1.0)
            argv = [*NSBUILD, "run", "--allow", "127.0.0.1:9", "--egress-engine", "nftables",
                    "--", "sleep", marker]
        else:
            delay = rng.uniform(0.0, 0.6)
            argv = [sys.executable, "-c", LIMITED_RUN, marker]
        _kill_at(argv, delay, env, Path("/"), marker)
        wait_for(lambda m=marker: _marked(m) == [], f"processes of trial {marker} are gone")
        r = subprocess.run([*NSBUILD, "gc"], cwd="/", capture_output=True, text=True,
                           check=False)
        assert r.returncode == 0, f"seed {SEED}: {explain(r)}"
        dead_tables = [t for t in nftables.list_tables()
                       if (pid := nftables.owner_pid(t)) is not None and not pid_alive(pid)]
        left = [*(f"table {t}" for t in dead_tables), *_dead_cgroups()]
        assert left == [], f"seed {SEED}: root trial {n} killed after {delay:.3f}s left {left}"
