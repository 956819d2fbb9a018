"""nsbuild.sandbox.enter: more commands in a running sandbox, as a user of the API sees them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandbox_helpers import processes_with_arg
from waiting import HANG_GUARD, wait_for

from nsbuild.sandbox import Process, Sandbox, caller_idmap, host_view, spawn
from nsbuild.sandbox.enter import sandbox_pids, start, start_time
from nsbuild.sandbox.errors import NotRunning

pytestmark = pytest.mark.userns

PY = "/usr/bin/python3"


class Running:
    """A sandbox over a read-only host view, its command a sleeper to enter."""

    def __init__(self, proc: Process, work: Path) -> None:
        self.proc = proc
        self.init, self.pid = sandbox_pids(proc)
        self.work = work

    def run(self, *argv: str, **kw: object) -> tuple[int, str]:
        """(status, stdout) of argv entered into the sandbox."""
        out = self.work / "out"
        with open(out, "wb") as f:
            proc = start(self.pid, argv, stdin=_null(), stdout=f.fileno(), **kw)  # type: ignore[arg-type]
        return proc.wait(), out.read_text()


def _null() -> int:
    return os.open(os.devnull, os.O_RDONLY)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Running]:
    spec = Sandbox(argv=("sleep", "infinity"), idmap=caller_idmap(),
                   mounts=host_view(str(tmp_path)), cwd=str(tmp_path),
                   env=(("PATH", "/usr/bin:/bin"), ("MARK", "from-the-sandbox")))  # fmt: skip
    proc = spawn(spec, stdin=_null(), stdout=_null())
    try:
        yield Running(proc, tmp_path)
    finally:
        proc.kill()
        proc.wait()


def test_commands_share_files_and_processes(sandbox: Running) -> None:
    # /tmp is the sandbox's own tmpfs: only a command inside can see it.
    status, _ = sandbox.run("sh", "-c", "echo kept > /tmp/f; sleep 86421 >/dev/null 2>&1 &"
                                        " echo $! > /tmp/bg")  # fmt: skip
    assert status == 0
    status, out = sandbox.run("sh", "-c", 'cat /tmp/f; kill -0 "$(cat /tmp/bg)" && echo alive')
    assert (status, out) == (0, "kept\nalive\n")
    # The background process runs in the sandbox's PID namespace, under its init.
    assert len(processes_with_arg("86421")) == 1
    status, out = sandbox.run("sh", "-c", "cat /proc/$(cat /tmp/bg)/cmdline | tr '\\0' ' '")
    assert out == "sleep 86421 "


def test_processes_inside_cannot_read_the_callers_memory_before_exec(sandbox: Running) -> None:
    # A root process left running in the sandbox watches every new process's
    # environ: an entered command must not show it the caller's own variables
    # in the moment between the fork and its exec.
    spy = ("import os\n"
           "seen = set()\n"
           "while True:\n"
           "    for p in set(os.listdir('/proc')) - seen:\n"
           "        try:\n"
           "            data = open(f'/proc/{p}/environ', 'rb').read()\n"
           "        except OSError:\n"
           "            continue\n"
           "        seen.add(p)\n"
           "        if b'CALLER_SECRET' in data:\n"
           "            open('/tmp/stolen', 'ab').write(b'x')\n")  # fmt: skip
    (sandbox.work / "spy.py").write_text(spy)
    status, _ = sandbox.run("sh", "-c", f"{PY} {sandbox.work}/spy.py >/dev/null 2>&1 &")
    assert status == 0
    # The caller: a process whose own environment holds the secret.
    caller = ("import os, sys\n"
              "from nsbuild.sandbox.enter import start\n"
              "null = os.open(os.devnull, os.O_RDWR)\n"
              "for _ in range(60):\n"
              "    proc = start(int(sys.argv[1]), ['true'], env=(('PATH', '/usr/bin:/bin'),),\n"
              "                 stdin=null, stdout=null)\n"
              "    assert proc.wait() == 0\n")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", caller, str(sandbox.pid)], capture_output=True,
                       text=True, timeout=HANG_GUARD, check=False,
                       env={**os.environ, "CALLER_SECRET": "hunter2"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    status, out = sandbox.run("sh", "-c", "cat /tmp/stolen 2>/dev/null | wc -c")
    assert out.strip() == "0", "the caller's environment was read from inside"


def test_the_command_gets_the_sandboxs_environment_and_root(sandbox: Running) -> None:
    status, out = sandbox.run("sh", "-c", 'echo "$MARK $(id -u) $(pwd)"')
    assert (status, out) == (0, "from-the-sandbox 0 /\n")
    status, out = sandbox.run("sh", "-c", 'echo "$MARK $(pwd)"', env=(("MARK", "given"),),
                              cwd="/usr")  # fmt: skip
    assert out == "given /usr\n"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("true",), 0),
        (("sh", "-c", "exit 7"), 7),
        (("no-such-command-anywhere",), 127),
        (("sh", "-c", "kill -KILL $$"), 128 + signal.SIGKILL),
        (("sh", "-c", "kill -TERM $$"), 128 + signal.SIGTERM),
    ],
)
def test_exit_status(sandbox: Running, argv: tuple[str, ...], expected: int) -> None:
    assert sandbox.run(*argv)[0] == expected


def test_a_missing_command_is_named(sandbox: Running) -> None:
    proc = start(sandbox.pid, ["no-such-command-anywhere"], stdin=_null())
    assert proc.wait() == 127
    assert proc.exec_error == "no-such-command-anywhere: command not found"


def test_hardening_before_exec(sandbox: Running, tmp_path: Path) -> None:
    leaked = os.open(tmp_path / "leak", os.O_RDWR | os.O_CREAT)  # inheritable on purpose
    os.set_inheritable(leaked, True)
    try:
        status, out = sandbox.run(
            PY,
            "-c",
            """if True:
            import os
            print(sorted(int(fd) for fd in os.listdir('/proc/self/fd')))
            print(os.getsid(0) == os.getpid())
            status = dict(l.split(':', 1) for l in open('/proc/self/status'))
            print(status['NoNewPrivs'].strip(), status['Seccomp'].strip())
        """,
        )
    finally:
        os.close(leaked)
    fds, leader, flags = out.splitlines()
    assert status == 0
    assert fds == "[0, 1, 2, 3]"  # 3: the listing's own
    assert leader == "True"  # a new session: TIOCSTI cannot reach the caller's terminal
    assert flags == "1 2"  # no_new_privs; a seccomp filter (the keyring calls)


def test_mounts_stay_locked(sandbox: Running) -> None:
    escape = "mount -o remount,bind,rw /usr; umount -l /usr; touch /usr/nsbuild-enter"
    status, _ = sandbox.run("sh", "-c", escape)
    assert status != 0
    assert not Path("/usr/nsbuild-enter").exists()


def test_network_of_the_sandbox_or_a_fresh_one(sandbox: Running) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=5)"
        assert sandbox.run(PY, "-c", probe)[0] != 0
        assert sandbox.run(PY, "-c", probe, new_net=True)[0] != 0
        listener.settimeout(0)
        with pytest.raises(BlockingIOError):
            listener.accept()
    # A server on the sandbox's loopback: reachable when joining its network,
    # not from a fresh network namespace (which has lo only, up).
    serve = "import socket,time; s=socket.socket(); s.bind(('127.0.0.1', 4711)); s.listen(); time.sleep(1000)"  # noqa: E501
    proc = start(sandbox.pid, [PY, "-c", serve, "86422"], stdin=_null())
    try:
        connect = "import socket; socket.create_connection(('127.0.0.1', 4711), timeout=5)"
        wait_for(lambda: sandbox.run(PY, "-c", connect)[0] == 0, "the server listens")
        assert sandbox.run(PY, "-c", connect, new_net=True)[0] != 0
        _, out = sandbox.run("cat", "/proc/net/dev", new_net=True)
        assert [line.split(":")[0].strip() for line in out.splitlines()[2:]] == ["lo"]
    finally:
        proc.kill()
        proc.wait()


def test_killing_the_caller_kills_the_command(sandbox: Running, tmp_path: Path) -> None:
    code = (f"from nsbuild.sandbox.enter import start; "
            f"start({sandbox.pid}, ['sleep', '86423']).wait_relaying()")  # fmt: skip
    caller = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL)
    wait_for(lambda: bool(processes_with_arg("86423")), "the command runs")
    caller.kill()
    caller.wait()
    wait_for(lambda: not processes_with_arg("86423"), "the command is gone")


def test_signals_reach_the_command(sandbox: Running) -> None:
    code = (f"import sys; from nsbuild.sandbox.enter import start; "
            f"sys.exit(start({sandbox.pid}, ['sleep', '86424']).wait_relaying())")  # fmt: skip
    caller = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL)
    wait_for(lambda: bool(processes_with_arg("86424")) and catches(caller.pid, signal.SIGTERM),
             "the command runs and the caller relays SIGTERM")  # fmt: skip
    caller.send_signal(signal.SIGTERM)
    assert caller.wait(timeout=HANG_GUARD) == 128 + signal.SIGTERM


def test_the_end_of_the_sandbox_ends_what_was_entered(sandbox: Running) -> None:
    status, _ = sandbox.run("sh", "-c", "setsid sleep 86425 >/dev/null 2>&1 &")
    assert status == 0
    running = start(sandbox.pid, ["sleep", "86426"], stdin=_null())
    wait_for(lambda: bool(processes_with_arg("86426")), "the command runs")
    assert processes_with_arg("86425")
    sandbox.proc.kill()
    assert running.wait() == 128 + signal.SIGKILL
    wait_for(lambda: not processes_with_arg("86425") and not processes_with_arg("86426"),
             "every process of the sandbox is gone")  # fmt: skip


def test_a_gone_or_reused_pid_is_not_entered(sandbox: Running) -> None:
    with pytest.raises(NotRunning):
        start(sandbox.pid, ["true"], expect_start=start_time(sandbox.pid) + 1)
    assert start(sandbox.pid, ["true"], expect_start=start_time(sandbox.pid)).wait_relaying() == 0
    sandbox.proc.kill()
    sandbox.proc.wait()
    wait_for(lambda: start_failed(sandbox.pid), "the sandbox is gone")


def catches(pid: int, sig: int) -> bool:
    """True once `pid` has a handler for `sig` (SigCgt in its status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    return False


def start_failed(pid: int) -> bool:
    try:
        start(pid, ["true"], stdin=_null()).wait()
    except NotRunning:
        return True
    return False
