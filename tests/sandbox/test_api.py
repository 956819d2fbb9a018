"""The Python API the layers above use: nsbuild.sandbox.run and spawn."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nsbuild.sandbox import (
    PIPE,
    Bind,
    Proc,
    Sandbox,
    SandboxError,
    SpecError,
    caller_idmap,
    host_view,
    run,
    spawn,
)

pytestmark = pytest.mark.userns


def spec(tmp_path: Path, *argv: str, **kw: object) -> Sandbox:
    kw.setdefault("cwd", str(tmp_path))
    return Sandbox(argv=argv, idmap=caller_idmap(), mounts=host_view(str(tmp_path)),
                   **kw)  # type: ignore[arg-type]


def in_child(fn_src: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run API code in a fresh interpreter, so the test process's own fds
    (pytest's capture files) do not stand in for a caller's stdio."""
    return subprocess.run([sys.executable, "-c", fn_src], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, check=False)


def test_run_returns_the_exit_status(tmp_path: Path) -> None:
    assert run(spec(tmp_path, "/bin/sh", "-c", "exit 7")) == 7
    assert run(spec(tmp_path, "true")) == 0


def test_run_returns_128_plus_signal(tmp_path: Path) -> None:
    assert run(spec(tmp_path, "/bin/sh", "-c", "kill -TERM $$")) == 128 + signal.SIGTERM


def test_spawn_streams_through_pipes(tmp_path: Path) -> None:
    p = spawn(spec(tmp_path, "/bin/sh", "-c", "tr a-z A-Z; echo err >&2; exit 3"),
              stdin=PIPE, stdout=PIPE, stderr=PIPE)
    assert p.stdin is not None and p.stdout is not None and p.stderr is not None
    assert p.pid > 0
    p.stdin.write(b"hello sandbox\n")
    p.stdin.close()
    assert p.stdout.read() == b"HELLO SANDBOX\n"
    assert p.stderr.read() == b"err\n"
    assert p.wait() == 3
    assert p.poll() == 3


def test_spawn_poll_and_send_signal(tmp_path: Path) -> None:
    p = spawn(spec(tmp_path, "/usr/bin/python3", "-c",
                   "import signal, sys, time\n"
                   "signal.signal(signal.SIGTERM, lambda *a: sys.exit(9))\n"
                   "print('ready', flush=True)\ntime.sleep(3600)"),
              stdout=PIPE)
    assert p.stdout is not None
    assert p.stdout.readline() == b"ready\n"
    assert p.poll() is None
    p.send_signal(signal.SIGTERM)
    assert p.wait() == 9


def test_a_signal_sent_while_the_sandbox_starts_is_not_lost(tmp_path: Path) -> None:
    # PID 1 ignores signals it has no handler for: one that arrives before the
    # command runs must still reach the command, at whatever moment it comes.
    from waiting import wait_for

    for _ in range(20):
        p = spawn(spec(tmp_path, "sleep", "3600"))
        p.send_signal(signal.SIGTERM)
        wait_for(lambda p=p: p.poll() is not None, "the sandbox to end after SIGTERM", 60)
        assert p.returncode == 128 + signal.SIGTERM


def test_spawn_kill(tmp_path: Path) -> None:
    p = spawn(spec(tmp_path, "sleep", "3600"), stdout=PIPE)
    assert p.poll() is None
    p.kill()
    p.wait()
    assert p.stdout is not None and p.stdout.read() == b""


def test_extra_bind_mount(tmp_path: Path) -> None:
    d = tmp_path / "data"
    d.mkdir()
    s = Sandbox(argv=("/bin/sh", "-c", "echo api > /data/out"), idmap=caller_idmap(),
                mounts=(*host_view(str(tmp_path)), Bind(str(d), "/data")), cwd="/")
    assert run(s) == 0
    assert (d / "out").read_text() == "api\n"


def test_spec_is_frozen_and_validated(tmp_path: Path) -> None:
    s = spec(tmp_path, "true")
    with pytest.raises(AttributeError):
        s.argv = ("false",)  # type: ignore[misc]
    with pytest.raises(SpecError):
        run(Sandbox(argv=(), idmap=caller_idmap()))
    with pytest.raises(SpecError):
        run(spec(tmp_path, "true", cwd="relative"))
    with pytest.raises(SpecError):
        run(Sandbox(argv=("true",), idmap=caller_idmap(), mounts=(Bind("/usr", "../x"),)))


def test_setup_failure_raises_sandbox_error(tmp_path: Path) -> None:
    with pytest.raises(SandboxError) as e:
        run(Sandbox(argv=("true",), idmap=caller_idmap(), root=Bind(str(tmp_path / "nope"), "/"),
                    mounts=(Proc(),)))
    assert str(tmp_path / "nope") in str(e.value)


def test_run_uses_the_callers_stdio(tmp_path: Path) -> None:
    r = in_child(
        "import sys\n"
        "from nsbuild.sandbox import Sandbox, caller_idmap, host_view, run\n"
        f"s = Sandbox(argv=('/bin/sh', '-c', 'echo out; echo err >&2; exit 4'), "
        f"idmap=caller_idmap(), mounts=host_view({str(tmp_path)!r}), cwd={str(tmp_path)!r})\n"
        "sys.exit(run(s))\n",
        tmp_path,
    )
    assert (r.returncode, r.stdout, r.stderr) == (4, "out\n", "err\n")


def test_no_fd_of_the_caller_leaks_through_the_api(tmp_path: Path) -> None:
    f = os.open(tmp_path, os.O_RDONLY)
    os.set_inheritable(f, True)
    try:
        p = spawn(spec(tmp_path, "/bin/ls", "/proc/self/fd"), stdout=PIPE)
        assert p.stdout is not None
        fds = sorted(int(x) for x in p.stdout.read().split())
        assert p.wait() == 0
        assert fds[:3] == [0, 1, 2] and len(fds) <= 4, fds
    finally:
        os.close(f)


def test_overlay_layers_may_have_any_name(tmp_path: Path) -> None:
    from nsbuild.sandbox import Overlay

    odd = tmp_path / "a,b:c\\d"
    lower, upper, work = odd / "lower", odd / "up,per", odd / "wo:rk"
    for d in (lower, upper, work):
        d.mkdir(parents=True)
    (lower / "hello").write_text("from the lower layer\n")
    out = tmp_path / "out"
    out.mkdir()
    s = spec(tmp_path, "sh", "-c", "cat /ov/hello > /out/seen && echo new > /ov/made")
    s = s.replace(mounts=(*s.mounts, Overlay((str(lower),), str(upper), str(work), "/ov"),
                          Bind(str(out), "/out")))  # fmt: skip
    assert run(s) == 0
    assert (out / "seen").read_text() == "from the lower layer\n"
    assert (upper / "made").read_text() == "new\n"


@pytest.mark.parametrize("told", [True, False], ids=["status told", "helper failed"])
def test_a_helper_that_fails_after_the_start_is_an_error_not_a_status(told: bool) -> None:
    # The helper writes the command's status on its pipe, then exits with it:
    # a command's own 125 is a status; the helper's 125 alone is its failure.
    from nsbuild.sandbox import Process

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        if told:
            os.write(w, b"125")
        os._exit(125)
    os.close(w)
    proc = Process(pid, None, None, None, [], None, r)
    if told:
        assert proc.wait() == 125
    else:
        with pytest.raises(SandboxError, match="helper failed"):
            proc.wait()
