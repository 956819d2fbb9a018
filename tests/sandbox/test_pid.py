"""PID namespace: a PID-1 reaper, signals passed on, nothing outlives the sandbox."""

from __future__ import annotations

import signal
import subprocess
import uuid
from pathlib import Path

import pytest
from sandbox_helpers import (
    PY,
    alive,
    descendants,
    explain,
    kill_all,
    mountinfo_mentioning,
    nsbuild,
    nsbuild_argv,
    ok,
    processes_with_arg,
    py,
    sh,
)
from waiting import HANG_GUARD, wait_for

pytestmark = pytest.mark.userns


def test_command_runs_under_a_pid_1_reaper(tmp_path: Path) -> None:
    r = ok(nsbuild("--", *sh("echo $$ $PPID; test -d /proc/1 && echo has-1"), cwd=tmp_path))
    pid, ppid, has1 = r.stdout.split()
    assert pid != "1" and ppid == "1" and has1 == "has-1"


def test_proc_shows_only_the_sandbox(tmp_path: Path) -> None:
    r = ok(nsbuild("--", *py("""
        import os
        print(*sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
    """), cwd=tmp_path))
    # PID 1 and the command (Python); no host process.
    shown = [int(p) for p in r.stdout.split()]
    assert 1 in shown and len(shown) <= 3, shown


def test_orphans_are_reaped(tmp_path: Path) -> None:
    code = """
    import os, time
    r, w = os.pipe()
    rp, wp = os.pipe()
    child = os.fork()
    if child == 0:
        gchild = os.fork()
        if gchild == 0:
            os.close(w)
            os.read(r, 1)       # EOF once the child (and parent) closed the write end
            os._exit(0)
        os.write(wp, str(gchild).encode())
        os._exit(0)             # the grandchild is an orphan now: PID 1 adopts it
    os.close(r)
    os.waitpid(child, 0)
    gchild = int(os.read(rp, 32))
    os.close(w)                 # let the orphan exit
    deadline = time.monotonic() + 120
    while os.path.exists(f"/proc/{gchild}") and time.monotonic() < deadline:
        time.sleep(0.02)
    if os.path.exists(f"/proc/{gchild}"):
        state = open(f"/proc/{gchild}/stat").read().rsplit(")", 1)[1].split()[0]
        print("left", state)
    else:
        print("reaped")
    """
    r = ok(nsbuild("--", *py(code), cwd=tmp_path))
    assert r.stdout.strip() == "reaped"


def test_background_process_dies_with_the_command(tmp_path: Path) -> None:
    marker = f"nsbuild-test-bg-{uuid.uuid4().hex}"
    code = f"""
    import subprocess, sys
    p = subprocess.Popen([{PY!r}, "-c", "import time; print('up', flush=True); time.sleep(3600)",
                          {marker!r}], stdout=subprocess.PIPE)
    assert p.stdout.readline() == b"up\\n"
    print("background", p.pid, flush=True)
    """
    try:
        # The background process holds nsbuild's stderr: if it survived,
        # this would not return.
        r = ok(nsbuild("--", *py(code), cwd=tmp_path))
        assert r.stdout.startswith("background")
        # Gone by the time nsbuild returns, not some time later.
        assert processes_with_arg(marker) == []
    finally:
        kill_all(processes_with_arg(marker))


def test_sh_background_sleep_dies_with_the_command(tmp_path: Path) -> None:
    marker = f"{uuid.uuid4().int % 10**9 + 10**9}"  # a unique sleep duration
    try:
        r = ok(nsbuild("--", *sh(f"sleep {marker} & echo started"), cwd=tmp_path))
        assert r.stdout.strip() == "started"
        assert processes_with_arg(marker) == []
    finally:
        kill_all(processes_with_arg(marker))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT])
def test_signals_to_nsbuild_reach_the_command(tmp_path: Path, sig: signal.Signals) -> None:
    code = """
    import os, signal, time
    def handler(sig, frame):
        # May run inside print() below: no buffered I/O here.
        os.write(1, f"got {signal.Signals(sig).name}\\n".encode())
        os._exit(7)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(s, handler)
    print("ready", flush=True)
    time.sleep(3600)
    """
    p = subprocess.Popen(nsbuild_argv("--", *py(code)), cwd=tmp_path, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        assert p.stdout.readline() == "ready\n"
        p.send_signal(sig)
        out, err = p.communicate(timeout=HANG_GUARD)
        assert out == f"got {sig.name}\n", (out, err)
        assert p.returncode == 7, (p.returncode, err)
    finally:
        p.kill()
        p.wait()


def test_sigkill_of_nsbuild_leaves_no_process_and_no_mount(tmp_path: Path) -> None:
    marker = f"nsbuild-test-kill-{uuid.uuid4().hex}"
    bound = tmp_path / marker
    bound.mkdir()
    code = f"""
    import subprocess, sys, time
    subprocess.Popen([{PY!r}, "-c", "import time; time.sleep(3600)", {marker!r}])
    subprocess.Popen(["sleep", "3600"], start_new_session=True)
    print("ready", flush=True)
    time.sleep(3600)
    """
    p = subprocess.Popen(
        nsbuild_argv("--bind", f"{bound}:/marker", "--", *py(code, marker)),
        cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert p.stdout is not None
        assert p.stdout.readline() == b"ready\n"
        sandbox = descendants(p.pid)
        # Controls: the sandbox's processes and its mount are visible from here.
        assert len(processes_with_arg(marker)) >= 2
        assert mountinfo_mentioning(marker), "the bind mount should be visible while running"
        p.kill()
        p.wait()
        wait_for(lambda: not alive(sandbox), "every process of the sandbox ends")
        assert processes_with_arg(marker) == []
        assert mountinfo_mentioning(marker) == []
        # The bound directory is an ordinary directory again and can be removed.
        bound.rmdir()
    finally:
        p.kill()
        p.wait()
        kill_all(processes_with_arg(marker))


def test_normal_exit_leaves_no_mount(tmp_path: Path) -> None:
    marker = f"nsbuild-test-mnt-{uuid.uuid4().hex}"
    bound = tmp_path / marker
    bound.mkdir()
    r = nsbuild("--bind", f"{bound}:/marker", "--", *sh("grep -c /marker /proc/self/mountinfo"),
                cwd=tmp_path)
    assert r.returncode == 0 and int(r.stdout) >= 1, explain(r)
    assert mountinfo_mentioning(marker) == []
